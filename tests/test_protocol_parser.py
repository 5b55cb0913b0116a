"""RequestParser: golden requests from Exim 4.96 and spamc, every chunking, every framing edge."""
from __future__ import annotations

import itertools
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exim_policy.model import ProtocolError, Request
from exim_policy.protocol.parser import (MAX_HEADER_LINES, MAX_REQUEST_LINE, NEED_DATA,
                                         RequestParser, version_tuple)




from golden import captures as cap  # noqa: E402 (tests/ is on sys.path, see conftest)

CHUNK_SIZES = [None, 4096, 128, 16, 1]


def parse(data: bytes, chunk: int | None = None, eof: bool = False, **limits):
    """Feed ``data`` (whole or in chunks), optionally EOF; return the parser's event."""
    parser = RequestParser(**limits)
    step = chunk or max(len(data), 1)
    for i in range(0, len(data), step):
        parser.feed(data[i:i + step])
    if eof:
        parser.feed_eof()
    return parser.next_event()


def error_text(event) -> str:
    assert isinstance(event, ProtocolError), event
    assert event.code == 76
    return event.text


# ------------------------------------------------------------------------------ golden --
GOLDEN = {
    "exim-rspamc-auth": (cap.EXIM_RSPAMC_AUTH, "rspamc", "CHECK", "1.3", cap.EXIM_MBOX_484, 10),
    "exim-rspamc-0001": (cap.EXIM_RSPAMC_0001, "rspamc", "CHECK", "1.3", cap.EXIM_MBOX_0001, 7),
    "exim-rspamc-0003": (cap.EXIM_RSPAMC_0003, "rspamc", "CHECK", "1.3", cap.EXIM_MBOX_0003, 8),
    "exim-sa": (cap.EXIM_SA, "spamc", "REPORT", "1.2", cap.EXIM_MBOX_484, 2),
    "spamc-check": (cap.SPAMC_CHECK, "spamc", "CHECK", "1.5", cap.SPAMC_MESSAGE, 2),
    "spamc-report": (cap.SPAMC_REPORT, "spamc", "REPORT", "1.5", cap.SPAMC_MESSAGE, 2),
    "spamc-symbols": (cap.SPAMC_SYMBOLS, "spamc", "SYMBOLS", "1.5", cap.SPAMC_MESSAGE, 2),
    "spamc-process": (cap.SPAMC_PROCESS, "spamc", "PROCESS", "1.5", cap.SPAMC_MESSAGE, 2),
    "spamc-headers": (cap.SPAMC_HEADERS, "spamc", "HEADERS", "1.5", cap.SPAMC_MESSAGE, 2),
    "spamc-ping": (cap.SPAMC_PING, "spamc", "PING", "1.5", b"", 0),
}


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_request_in_any_chunking(name, chunk):
    data, protocol, command, version, body, n_headers = GOLDEN[name]
    # no EOF: every golden request carries its length, so it must complete without one
    # (Exim never half-closes in the rspamd variant)
    event = parse(data, chunk)
    assert isinstance(event, Request), event
    assert (event.protocol, event.command, event.version) == (protocol, command, version)
    assert event.body == body
    assert len(event.headers) == n_headers
    assert event == parse(data)  # identical Request whatever the chunking


def test_exim_rspamc_headers_verbatim():
    event = parse(cap.EXIM_RSPAMC_AUTH)
    assert event.headers == (
        ("Content-length", "484"), ("Queue-Id", "1xV0ZC-0003TR-0m"),
        ("From", "<sender@example.org>"), ("Recipient-Number", "2"),
        ("Rcpt", "<rcpt1@example.com>"), ("Rcpt", "<Rcpt2@Example.COM>"),
        ("Helo", "helo.client.example"), ("Hostname", "client.example.net"),
        ("IP", "192.0.2.10"), ("User", "alice@example.com"))


def test_complete_before_body_is_only_partly_there_is_not_reported():
    data = cap.EXIM_RSPAMC_AUTH
    parser = RequestParser()
    parser.feed(data[:-1])
    assert parser.next_event() is NEED_DATA
    parser.feed(data[-1:])
    assert isinstance(parser.next_event(), Request)


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_bytes_after_the_request_are_ignored(chunk):
    event = parse(cap.EXIM_RSPAMC_AUTH + b"GARBAGE AFTER THE BODY\r\n" * 10, chunk, eof=True)
    assert event == parse(cap.EXIM_RSPAMC_AUTH)


def test_event_is_sticky():
    parser = RequestParser()
    parser.feed(cap.SPAMC_CHECK)
    first = parser.next_event()
    parser.feed(b"more")
    parser.feed_eof()
    assert parser.next_event() is first
    bad = RequestParser()
    bad.feed(b"check RSPAMC/1.3\r\n")
    error = bad.next_event()
    bad.feed(cap.SPAMC_CHECK)
    assert bad.next_event() is error


# ----------------------------------------------------------------------- line endings --
@pytest.mark.parametrize("name", ["exim-rspamc-auth", "exim-sa", "spamc-check", "spamc-ping"])
def test_bare_lf_gives_the_same_request(name):
    data, *_ = GOLDEN[name]
    head, sep, body = data.partition(b"\r\n\r\n")
    lf = head.replace(b"\r\n", b"\n") + b"\n\n" + body
    assert parse(lf) == parse(data)


def test_mixed_line_endings():
    data = b"CHECK RSPAMC/1.3\nContent-length: 3\r\nFrom: <a@b>\n\r\nabc"
    event = parse(data)
    assert event.headers == (("Content-length", "3"), ("From", "<a@b>"))
    assert event.body == b"abc"


# -------------------------------------------------------------------------- headers --
@pytest.mark.parametrize("name", ["Content-length", "content-length", "CONTENT-LENGTH",
                                  "Content-Length", "cOnTeNt-LeNgTh"])
def test_content_length_any_case(name):
    event = parse(b"CHECK RSPAMC/1.3\r\n" + name.encode() + b": 2\r\n\r\nhi")
    assert isinstance(event, Request) and event.body == b"hi"
    assert event.header("content-length") == "2"


def test_header_value_whitespace_and_8bit():
    event = parse(b"CHECK RSPAMC/1.3\r\nContent-length:0\r\nHelo:   h\xe9lo \xff \t\r\n"
                  b"User: alice smith\r\nX-Unknown: whatever: with colon\r\n\r\n")
    assert event.headers == (("Content-length", "0"), ("Helo", "h\xe9lo \xff"),
                             ("User", "alice smith"), ("X-Unknown", "whatever: with colon"))
    # latin-1 round trip keeps the raw bytes
    assert event.header("helo").encode("latin-1") == b"h\xe9lo \xff"


@pytest.mark.parametrize("line", [b"no colon here", b": empty name", b"   "])
def test_header_line_without_name_or_colon(line):
    text = error_text(parse(b"CHECK RSPAMC/1.3\r\nContent-length: 0\r\n" + line + b"\r\n\r\n"))
    assert text.startswith("Bad header line: ")


def test_exactly_max_header_lines_is_fine_one_more_is_refused():
    base = b"CHECK SPAMC/1.5\r\n"
    ok = base + b"X-H: v\r\n" * (MAX_HEADER_LINES - 1) + b"Content-length: 0\r\n\r\n"
    assert isinstance(parse(ok), Request)
    too_many = base + b"X-H: v\r\n" * MAX_HEADER_LINES + b"Content-length: 0\r\n\r\n"
    assert error_text(parse(too_many)) == "Bad header line: (too many headers)"


def test_header_block_larger_than_limit():
    data = b"CHECK SPAMC/1.5\r\nX-Big: " + b"a" * 2000 + b"\r\nContent-length: 0\r\n\r\n"
    assert "exceeds 1024 bytes" in error_text(parse(data, max_header_bytes=1024))
    assert isinstance(parse(data, max_header_bytes=4096), Request)


def test_endless_header_line_is_refused_without_waiting_for_newline():
    parser = RequestParser(max_header_bytes=1024)
    parser.feed(b"CHECK SPAMC/1.5\r\nX-Big: ")
    for _ in range(100):
        parser.feed(b"a" * 100)
        if parser.next_event() is not NEED_DATA:
            break
    assert "exceeds 1024 bytes" in error_text(parser.next_event())


def test_compress_is_refused():
    data = b"PROCESS SPAMC/1.5\r\nCompress: zlib\r\nContent-length: 3\r\n\r\nabc"
    assert "Compress" in error_text(parse(data))


# ------------------------------------------------------------------------- commands --
@pytest.mark.parametrize("line", [
    b"check RSPAMC/1.3",          # lower-case command: both servers are case-sensitive
    b"Check SPAMC/1.2",
    b"REPORT RSPAMC/1.3",         # Rspamd's legacy mode knows only CHECK and SYMBOLS
    b"PING RSPAMC/1.3",
    b"FOO SPAMC/1.5",
    b"POST / HTTP/1.1",
    b"GET /checkv2 HTTP/1.0",
    b"CHECK spamc/1.5",
    b"CHECK SPAMC/",
    b"CHECK SPAMC/x.y",
    b"CHECK SPAMC 1.5",
    b"CHECK  SPAMC/1.5",
    b"",
    b"\x00\x01\x02",
])
def test_bad_request_line_refused_as_soon_as_line_is_complete(line):
    parser = RequestParser()
    parser.feed(line)
    assert parser.next_event() is NEED_DATA
    parser.feed(b"\r\n")
    assert error_text(parser.next_event()).startswith("Bad header line: unsupported request")


def test_request_line_without_newline_is_refused_after_a_sane_length():
    parser = RequestParser()
    parser.feed(b"x" * MAX_REQUEST_LINE)
    assert parser.next_event() is NEED_DATA
    parser.feed(b"x")
    assert "request line longer" in error_text(parser.next_event())


@pytest.mark.parametrize("command", ["CHECK", "SYMBOLS", "REPORT", "REPORT_IFSPAM", "PROCESS",
                                     "HEADERS", "TELL"])
def test_all_spamc_body_commands(command):
    event = parse(f"{command} SPAMC/1.5\r\nContent-length: 1\r\n\r\nx".encode())
    assert (event.protocol, event.command, event.body) == ("spamc", command, b"x")


@pytest.mark.parametrize("command", ["CHECK", "SYMBOLS"])
def test_both_rspamc_commands(command):
    event = parse(f"{command} RSPAMC/1.3\r\nContent-length: 1\r\n\r\nx".encode())
    assert (event.protocol, event.command) == ("rspamc", command)


@pytest.mark.parametrize("command", ["PING", "SKIP"])
@pytest.mark.parametrize("version", ["1.0", "1.2", "1.4"])
def test_ping_skip_before_1_5_complete_after_command_line(command, version):
    parser = RequestParser()
    parser.feed(f"{command} SPAMC/{version}\r\n".encode())
    event = parser.next_event()
    assert isinstance(event, Request) and event.command == command and event.body == b""


@pytest.mark.parametrize("command", ["PING", "SKIP"])
def test_ping_skip_from_1_5_need_the_blank_line(command):
    parser = RequestParser()
    parser.feed(f"{command} SPAMC/1.5\r\n".encode())
    assert parser.next_event() is NEED_DATA
    parser.feed(b"User: x\r\n")
    assert parser.next_event() is NEED_DATA
    parser.feed(b"\r\n")
    event = parser.next_event()
    assert isinstance(event, Request) and event.headers == (("User", "x"),)


def test_version_tuple():
    assert version_tuple("1.2") < (1, 3) <= version_tuple("1.5")
    assert version_tuple("2") == (2, 0)
    assert version_tuple("1.10") > version_tuple("1.5")


# -------------------------------------------------------------------------- framing --
def test_rspamc_without_content_length_is_refused():
    assert "Content-length required" in error_text(parse(b"CHECK RSPAMC/1.3\r\nFrom: <a@b>\r\n\r\n"))


def test_rspamc_body_ends_at_content_length_without_eof():
    parser = RequestParser()
    parser.feed(b"CHECK RSPAMC/1.3\r\nContent-length: 5\r\n\r\nhel")
    assert parser.next_event() is NEED_DATA
    parser.feed(b"lo")
    assert parser.next_event().body == b"hello"


def test_zero_content_length_completes_at_blank_line():
    event = parse(b"CHECK RSPAMC/1.3\r\nContent-length: 0\r\n\r\n")
    assert isinstance(event, Request) and event.body == b""


def test_spamc_without_content_length_reads_to_eof():
    parser = RequestParser()
    parser.feed(b"REPORT SPAMC/1.2\r\nUser: nobody\r\n\r\nbody ")
    parser.feed(b"more")
    assert parser.next_event() is NEED_DATA
    parser.feed_eof()
    assert parser.next_event().body == b"body more"


def test_spamc_content_length_with_eof_right_after():
    event = parse(cap.EXIM_SA, eof=True)  # Exim half-closes after the body
    assert event.body == cap.EXIM_MBOX_484


def test_spamc_content_length_mismatch_at_eof():
    event = parse(b"REPORT SPAMC/1.2\r\nContent-length: 10\r\n\r\nabc", eof=True)
    assert error_text(event) == ("Bad header line: (Content-Length mismatch: "
                                 "Expected 10 bytes, got 3 bytes)")


def test_rspamc_eof_mid_body():
    event = parse(b"CHECK RSPAMC/1.3\r\nContent-length: 10\r\n\r\nabc", eof=True)
    assert "connection closed" in error_text(event)


@pytest.mark.parametrize("data", [
    b"", b"CHE", b"CHECK RSPAMC/1.3", b"CHECK RSPAMC/1.3\r\nContent-len",
    b"CHECK RSPAMC/1.3\r\nContent-length: 3\r\n", b"PING SPAMC/1.5\r\n",
])
def test_eof_before_complete_request(data):
    assert error_text(parse(data, eof=True)).startswith(f"connection closed after {len(data)} bytes")


@pytest.mark.parametrize("value", ["12a", "-1", "+1", "0x10", "", "1 2", "1.0", "9" * 21, "١٢"])
def test_content_length_not_plain_decimal(value):
    data = b"CHECK SPAMC/1.5\r\nContent-length: " + value.encode() + b"\r\n\r\nx"
    assert "bad Content-length" in error_text(parse(data))


def test_conflicting_content_lengths_refused_equal_ones_accepted():
    assert "bad Content-length" in error_text(
        parse(b"CHECK SPAMC/1.5\r\nContent-length: 1\r\ncontent-length: 2\r\n\r\nxx"))
    assert parse(b"CHECK SPAMC/1.5\r\nContent-length: 1\r\ncontent-length: 1\r\n\r\nx").body == b"x"


def test_absurd_content_length_refused_before_any_body_byte():
    parser = RequestParser(max_body_bytes=1000)
    parser.feed(b"CHECK RSPAMC/1.3\r\nContent-length: 1001\r\n\r\n")
    assert error_text(parser.next_event()) == "message too big: 1001 bytes, limit 1000"
    huge = RequestParser()
    huge.feed(b"CHECK RSPAMC/1.3\r\nContent-length: 99999999999999\r\n\r\n")
    assert error_text(huge.next_event()).startswith("message too big: 99999999999999 bytes")


def test_content_length_at_the_limit_is_fine():
    event = parse(b"CHECK RSPAMC/1.3\r\nContent-length: 1000\r\n\r\n" + b"x" * 1000,
                  max_body_bytes=1000)
    assert isinstance(event, Request) and len(event.body) == 1000


def test_to_eof_body_beyond_limit_is_refused():
    parser = RequestParser(max_body_bytes=1000)
    parser.feed(b"REPORT SPAMC/1.2\r\n\r\n")
    parser.feed(b"x" * 1000)
    assert parser.next_event() is NEED_DATA
    parser.feed(b"x")
    assert "message too big" in error_text(parser.next_event())


def test_memory_stays_bounded_whatever_the_peer_sends():
    """Feeding 64 MiB after the limits were hit must not grow the parser's memory."""
    chunk = b"y" * (1 << 20)
    tracemalloc.start()
    try:
        parsers = [RequestParser(max_body_bytes=1 << 20), RequestParser(max_body_bytes=1 << 20)]
        parsers[0].feed(b"REPORT SPAMC/1.2\r\n\r\n")                       # to-EOF body
        parsers[1].feed(b"CHECK RSPAMC/1.3\r\nContent-length: 10\r\n\r\n")  # framed body
        base, _ = tracemalloc.get_traced_memory()
        for _ in range(32):
            for parser in parsers:
                parser.feed(chunk)
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(parsers[0].next_event(), ProtocolError)
    assert parsers[1].next_event().body == b"y" * 10
    assert current - base < 256 * 1024, current - base


# ------------------------------------------------------------------- body reservation --
class Gate:
    """A reserve() callback: grants while ``open``, records every amount asked."""

    def __init__(self, open_: bool = True) -> None:
        self.open = open_
        self.asked: list[int] = []

    def __call__(self, amount: int) -> bool:
        self.asked.append(amount)
        return self.open


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_the_declared_length_is_reserved_once_before_the_body_is_held(chunk):
    gate = Gate()
    data = cap.EXIM_RSPAMC_AUTH
    event = parse(data, chunk, reserve=gate)
    assert isinstance(event, Request) and event.body == cap.EXIM_MBOX_484
    assert gate.asked == [len(cap.EXIM_MBOX_484)]
    assert isinstance(event.body, bytearray)  # the buffer itself, not a copy of it


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_a_refused_reservation_holds_the_parser_until_resume(chunk):
    gate = Gate(open_=False)
    parser = RequestParser(reserve=gate)
    data = cap.EXIM_RSPAMC_AUTH
    step = chunk or len(data)
    for i in range(0, len(data), step):
        parser.feed(data[i:i + step])
    assert parser.held and parser.next_event() is NEED_DATA
    assert parser.wanted == len(cap.EXIM_MBOX_484) and parser.reserved == 0
    parser.resume()  # the caller reserved the bytes itself
    event = parser.next_event()
    assert isinstance(event, Request) and event.body == cap.EXIM_MBOX_484
    assert parser.reserved == len(cap.EXIM_MBOX_484) and not parser.held


def test_a_body_to_eof_reserves_each_chunk_and_can_be_held_midway():
    gate = Gate()
    parser = RequestParser(reserve=gate)
    parser.feed(b"REPORT SPAMC/1.2\r\n\r\nabc")
    gate.open = False
    parser.feed(b"defg")
    assert parser.held and parser.wanted == 4
    parser.feed(b"hi")      # arrives while held: kept, asked for after the resume
    parser.feed_eof()       # EOF while held ends the body only after the resume
    assert parser.next_event() is NEED_DATA
    gate.open = True
    parser.resume()
    event = parser.next_event()
    assert isinstance(event, Request) and event.body == b"abcdefghi"
    assert gate.asked == [3, 4, 2] and parser.reserved == 9


def test_an_empty_body_asks_for_nothing():
    gate = Gate(open_=False)
    event = parse(b"CHECK RSPAMC/1.3\r\nContent-length: 0\r\n\r\n", reserve=gate)
    assert isinstance(event, Request) and event.body == b"" and gate.asked == []


def test_resume_without_a_refusal_is_a_bug():
    with pytest.raises(RuntimeError):
        RequestParser().resume()


# ------------------------------------------------------------------------ hypothesis --
def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(
           st.binary(max_size=600),
           st.sampled_from([g[0] for g in GOLDEN.values()]).flatmap(
               lambda d: st.tuples(st.just(d), st.integers(0, len(d)), st.binary(max_size=20))
           ).map(lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:])),
       cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
       eof=st.booleans())
def test_random_bytes_never_raise(data, cuts, eof):
    parser = RequestParser(max_header_bytes=512, max_body_bytes=2048)
    for piece in _chunks(data, cuts):
        parser.feed(piece)
        assert parser.next_event() is NEED_DATA or isinstance(
            parser.next_event(), (Request, ProtocolError))
    if eof:
        parser.feed_eof()
        assert isinstance(parser.next_event(), (Request, ProtocolError))


_token = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-", min_size=1,
                 max_size=12).filter(lambda n: n.lower() not in ("content-length", "compress"))
_value = st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"").strip())


@settings(max_examples=200, deadline=None)
@given(protocol=st.sampled_from(["RSPAMC", "SPAMC"]),
       headers=st.lists(st.tuples(_token, _value), max_size=8),
       body=st.binary(max_size=300),
       crlf=st.booleans(),
       cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_valid_requests_parse_identically_in_any_chunking(protocol, headers, body, crlf, cuts):
    eol = b"\r\n" if crlf else b"\n"
    data = b"CHECK " + protocol.encode() + b"/1.3" + eol
    for name, value in headers:
        data += name.encode() + b": " + value + eol
    data += b"Content-length: %d" % len(body) + eol + eol + body
    whole = parse(data)
    assert isinstance(whole, Request)
    assert whole.body == body
    assert whole.headers[:-1] == tuple((n, v.decode("latin-1")) for n, v in headers)
    parser = RequestParser()
    for piece in _chunks(data, cuts):
        parser.feed(piece)
    assert parser.next_event() == whole
