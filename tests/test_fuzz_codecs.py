"""Every codec fuzzed (the bounded lane), and the defects the fuzzer found, one test each.

The properties and the targets are in tests/fuzz_targets.py; bench/bench_fuzz.py runs a
million cases per codec. Here hypothesis draws a few hundred cases per codec from the same
seed corpus (the golden captures where there are any) and the same mutations, derandomized
so the lane is the same on every run, and shrinks a failure to a small input.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_targets as ft
from exim_policy.model import Envelope, Request
from exim_policy.protocol import checkv2
from exim_policy.quarantine import headers as qheaders

#: cases per codec in the normal suite; the slow ones (a session, three file reads) fewer
EXAMPLES = {"rspamc": 200, "spamc": 200, "http": 200, "helper": 200, "smtp_data": 200,
            "quarantine": 80, "lsearch": 100, "sqlite": 150}
KINDS = {"request", "error", "need_data", "closed", "yes", "no", "ok", "pong", "message",
         "held", "refused", "source"}


def _ops() -> st.SearchStrategy:
    return st.lists(st.tuples(st.integers(0, ft.N_OPS - 1), st.integers(0, 1 << 20),
                              st.integers(0, 1 << 16), st.integers(0, 1 << 16)), max_size=5)


@st.composite
def cases(draw, codec: ft.Codec) -> ft.Case:
    """A seed of the codec mutated (or, now and then, bytes from nowhere), random cuts."""
    seeds = codec.seeds()
    if draw(st.integers(0, 9)) == 0:
        data = draw(st.binary(max_size=600))
    else:
        data = ft.mutate(draw(st.sampled_from(seeds)), draw(_ops()), seeds, codec.max_bytes)
    cuts = tuple(draw(st.lists(st.integers(0, 1 << 20), max_size=8)))
    return ft.Case(data, cuts, draw(st.integers(0, (1 << 32) - 1)))


def _lane(name: str):
    codec = ft.CODECS[name]

    @settings(max_examples=EXAMPLES[name], deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=cases(codec))
    def test(case: ft.Case) -> None:
        outcome = codec.target(case)  # raises on a broken property
        assert outcome.split(":")[0].split("/")[-1] in KINDS, outcome

    test.__name__ = f"test_fuzz_{name}"
    return test


for _name in ft.CODECS:
    globals()[f"test_fuzz_{_name}"] = _lane(_name)


@pytest.mark.parametrize("name", list(ft.CODECS))
def test_every_seed_whole_and_byte_by_byte(name):
    """The unmutated corpus passes, fed at once and one byte at a time (the property
    checks run on the golden captures as they are)."""
    codec = ft.CODECS[name]
    for seed in codec.seeds():
        codec.target(ft.Case(seed))
        if name not in ("quarantine", "lsearch"):  # (a session, a file per cut: slow)
            codec.target(ft.Case(seed, tuple(range(1, len(seed)))))


# -------------------------------------------------------------- the checks work --
def test_the_rspamd_head_check_catches_a_file_header_and_an_injected_line(monkeypatch):
    """With a request_head that passed values on unchecked, the check would see it."""
    def unchecked(length, envelope, **_keys):
        return (b"POST /checkv2 HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in envelope.passthrough).encode("latin-1") + b"\r\n")

    monkeypatch.setattr(ft, "request_head", unchecked)
    request = Request("rspamc", "CHECK", "1.3")
    for value, complaint in (("a\rb", "CR/LF/NUL"), ("a\x00b", "CR/LF/NUL"),
                             ("a\r\nFile: /etc/passwd", "unexpected header")):
        with pytest.raises(ft.PropertyViolation, match=complaint):
            ft.check_rspamd_head(request, lambda r, v=value: Envelope(
                passthrough=(("MTA-Tag", v),)))
    monkeypatch.setattr(ft, "RSPAMD_HEADERS", ft.RSPAMD_HEADERS | {"file"})
    with pytest.raises(ft.PropertyViolation, match="file header"):
        ft.check_rspamd_head(request, lambda r: Envelope(passthrough=(("File", "/etc/x"),)))


def test_the_mutator_is_deterministic_and_bounded():
    seed = ft.captures.EXIM_RSPAMC_AUTH
    ops = [(ft.DUP_LINE, 40, 2047, 3), (ft.INSERT, 7, 13, 0), (ft.SPLICE, 100, 5, 1)]
    once = ft.mutate(seed, ops, [seed, b"xyz"], 4096)
    assert once == ft.mutate(seed, ops, [seed, b"xyz"], 4096) and len(once) <= 4096
    assert b"".join(ft.chunks(ft.Case(once, (5, 5, 99999, 0)))) == once


# ------------------------------------------------- regressions: found by fuzzing --
def test_http_chunked_trailers_count_against_the_header_limit():
    """Trailer fields after the last chunk were never counted: 200 of them (24 kB with a
    1 kB limit), or one endless trailer line, were held without a 431."""
    head = b"POST /checkv2 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
    data = head + (b"File: /etc/passwd" + b"x" * 100 + b"\r\n") * 200 + b"\r\n"
    ft.http_target(ft.Case(data, tuple(range(len(head), len(data), 119))))
    conn = checkv2.CheckV2Connection(max_header_bytes=1024, max_body_bytes=1024)
    conn.receive_data(head + b"X-Trailer: ")
    for _ in range(50):
        conn.receive_data(b"y" * 100)
    event = conn.next_event()
    assert isinstance(event, ft.ProtocolError) and event.code == 431, event


def test_http_chunk_size_lines_split_from_their_data_do_not_add_up():
    """The trailer count must not catch a long body whose chunk size lines arrive apart
    from their data (one chunk per line, as Haraka sends them)."""
    head = b"POST /checkv2 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    pieces = [head]
    for _ in range(400):
        pieces += [b"5\r\n", b"line\n\r\n"]
    pieces.append(b"0\r\n\r\n")
    conn = checkv2.CheckV2Connection(max_header_bytes=1024, max_body_bytes=8192)
    for piece in pieces:
        conn.receive_data(piece)
    event = conn.next_event()
    assert isinstance(event, Request) and len(event.body) == 2000, event


@pytest.mark.parametrize("subject", [b"=?utf-8?b?x?=", b"=?utf-8?b?AAAAA?=",
                                     b"=?utf-\xc0?q?caf=C3=A9?=", b"=?\xaatf-8?q?x?="])
def test_quarantine_holds_a_message_whose_subject_has_a_broken_encoded_word(subject):
    """headers.decoded() let email's HeaderParseError (bad base64) and CharsetError (a
    charset name that is not ASCII) out: the receiver answered DATA with aiosmtpd's 500,
    a permanent error for a message Exim was quarantining, and left the file behind."""
    assert qheaders.decoded(subject) is not None
    session = (b"EHLO mx1\r\nMAIL FROM:<a@lab.test>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n"
               b"Subject: " + subject + b"\r\n\r\nspam\r\n.\r\nQUIT\r\n")
    assert ft.quarantine_target(ft.Case(session)).startswith("held:")


def test_quarantine_holds_a_message_whose_report_has_a_bad_score():
    """evidence.from_fields() took ``Symbol: NAME(1.5.0)`` for a score and float() raised:
    DATA answered 500 again."""
    session = (b"EHLO mx1\r\nMAIL FROM:<a@lab.test>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n"
               b"X-Exim-Policy-Report: Action: reject\r\n Symbol: E(1.5.0)\r\n Symbol: F(.)"
               b"\r\n Symbol: G(2.5)\r\n\r\nspam\r\n.\r\nQUIT\r\n")
    assert ft.quarantine_target(ft.Case(session)).startswith("held:")
    fields = [("X-Exim-Policy-Report", b" Symbol: E(1.5.0)\r\n Symbol: G(2.5)")]
    assert ft.from_fields(fields, "a@lab.test", ft.CONFIG).symbols == (("G", 2.5),)


def test_the_header_block_ends_at_its_first_blank_line_however_it_is_split():
    """HeaderSplitter looked for CRLF CRLF before LF LF: fed at once, ``a\\n\\n...\\r\\n\\r\\n``
    had a header block up to the CRLF pair; fed in two pieces, up to the LF pair. Which
    fields were read, and which X-Exim-Policy-* ones stripped, depended on the segments."""
    message = b"a: 1\n\nX-Exim-Policy-Recipients: bcc@example.org\r\n\r\nbody"
    whole = ft._split_headers(message, [message])
    assert whole == ft._split_headers(message, [message[:6], message[6:]])
    assert whole[1] == [("a", b" 1\n")]
    ft.smtp_data_target(ft.Case(b"a\n\n\r\n\r\n", (3,)))


def test_helper_answer_does_not_depend_on_how_the_line_was_segmented():
    """A request line longer than MAX_LINE got ``error request too long`` when its first
    segment had no newline, and an answer when the whole line came in one segment."""
    line = b"forwarding " + b"a" * (1025 - 11 - len(b"@example.com")) + b"@example.com"
    assert len(line) == 1025
    for data in (line + b"\n", line):
        ft.helper_target(ft.Case(data, (1025,)))  # the check: split == whole
        assert ft._helper_run([data]) == (b"error request too long",)
    short = line.replace(b"aa", b"a", 1)  # MAX_LINE exactly: answered
    assert ft._helper_run([short + b"\n"]) == (b"no",) == ft._helper_run([short])


def test_lsearch_case_sensitive_bare_local_part_keeps_its_case():
    """lsearch._fold lower-cased the whole of a bare local part (no "@", no domain to
    fold): with case_sensitive the bulk path read ``a@x.test: Bob`` as bob@x.test, while
    redirect.py (and Exim) keep Bob@x.test."""
    ft.lsearch_target(ft.Case(b"a@x.test: bAx.test\na@x.test: c@x.test\n", (), 1))
    ft.lsearch_target(ft.Case(b"a: Bob\n", (), 3))


def test_lsearch_address_starting_with_a_slash_is_read_alike(tmp_path):
    """Found by the fuzzer: redirect.py reads /x=y/@gate.example as an address (as Exim
    does), the graph then dropped it as a file, where a bulk line keeps it an address."""
    path = tmp_path / "virtual"
    path.write_bytes(b"e: /x=y/@gate.example\ne t@x.test\n")
    bulk = ft._lsearch_read(str(path), False, "x.test")
    general = ft._lsearch_read(str(path), False, "x.test", _PLAIN=b"")
    assert bulk == general


def test_a_bare_cr_does_not_end_a_header_line():
    """HeaderSplitter cut fields with splitlines(), which ends a line at a bare CR too (Exim
    ends one at LF): ``X-A: a<CR>X-Exim-Policy-Quarantine: ...`` inside one field became a
    field of ours, read as the evidence (the first one wins: a sender could name another
    account) and dropped from the copy; dropping ``m<CR>``'s neighbour could also merge
    ``<CR>`` with the blank line, so the stored copy's body became headers."""
    forged = (b"X-A: a\rX-Exim-Policy-Quarantine: reason=\"forged\"; auth=mallory\r\n"
              b"X-Exim-Policy-Quarantine: reason=\"Gtube pattern\"; auth=tester\r\n\r\nbody\r\n")
    stored, fields = ft._split_headers(forged, [forged])
    evidence = ft.from_fields(fields, "tester@lab.test", ft.CONFIG)
    assert (evidence.account, evidence.reason) == ("tester", "Gtube pattern")
    assert stored.startswith(b"X-A: a\rX-Exim-Policy-Quarantine: reason=\"forged\"")
    ft.smtp_data_target(ft.Case(b"m\rX-Exim-Policy-\n\nb\nX-Exim-Policy-"))


def test_an_include_path_with_a_nul_byte_is_a_source_error():
    """open() raises ValueError (not OSError) for a path with a NUL byte: an lsearch line
    ``:include:/path<NUL>x`` ended the build with a ValueError instead of ``file:line``."""
    include = str(ft.INCLUDE_FILE).encode()
    data = b"a@x.test: b@x.test\ns@x.test: :include:" + include + b"\x00x\n"
    assert ft.lsearch_target(ft.Case(data)).startswith("error:")
    assert ft.sqlite_target(ft.Case(b"s@x.test\t:include:" + include + b"\x00x")) \
        .startswith("error:")
