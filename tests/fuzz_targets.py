"""Fuzz targets for every codec: bytes in (split anywhere), a checked outcome out.

Shared by the bounded lane in the normal suite (tests/test_fuzz_codecs.py, hypothesis) and
the long run (bench/bench_fuzz.py, a seeded mutator over the same corpus). A target is a
function ``Case -> outcome``; it raises :class:`PropertyViolation` when a property breaks,
and any other exception it lets out is a finding as well (the property says "never an
exception"). Every target checks, for any input and any split points:

* the outcome is a complete request, a protocol error, or "need more data"; after the end
  of the input (EOF) never "need more data" again;
* what the codec holds stays within its configured limit plus one read chunk;
* a parsed request is taken through the real downstream code (the envelope, the HTTP head
  :func:`exim_policy.scanner.rspamd.request_head` would send to Rspamd, the reply): that
  head carries no CR/LF/NUL inside a value and no ``File``/``Path``/``Shm*`` header;
* the outcome does not depend on where the input was split (incremental feeding).

Nothing here opens a socket: the asyncio protocols (query helper, quarantine receiver) are
driven with an in-memory transport. The golden captures (tests/golden) seed the spamd,
rspamc and HTTP codecs; the other codecs have no captures, their seeds are the shapes the
docs and the existing tests use (see ``_seeds_*``).
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import traceback
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from exim_policy.config import Config, QuarantineConfig, from_dict
from exim_policy.forwarding import lsearch, redirect, sqlite_source
from exim_policy.forwarding.addresses import ForwardingSourceError
from exim_policy.forwarding.mapfile import ForwardingMap
from exim_policy.model import (NO_ACTION, REJECT, SOFT_REJECT, Decision, ProtocolError,
                               Request, ScanResult, Symbol, Traffic)
from exim_policy.protocol import checkv2, spamc
from exim_policy.protocol.mbox import strip_mbox_from_line
from exim_policy.protocol.parser import COMMANDS, MAX_HEADER_LINES, NEED_DATA, RequestParser
from exim_policy.protocol.smtp_data import DataDecoder, DataEncoder
from exim_policy.quarantine import headers as qheaders
from exim_policy.quarantine import receiver as qreceiver
from exim_policy.quarantine.evidence import from_fields
from exim_policy.scanner.rspamd import request_head
from exim_policy.transport import helper
from exim_policy.transport import spamd as spamd_transport
from exim_policy.transport.limits import ConnectionTable

from golden import captures

GOLDEN_HTTP = Path(__file__).resolve().parent / "golden" / "http"


class PropertyViolation(AssertionError):
    """A fuzz property does not hold for this case."""


def check(condition: object, message: str) -> None:
    if not condition:
        raise PropertyViolation(message)


@dataclass(frozen=True)
class Case:
    """One fuzz input: the bytes, where to split them, and spare random bits (``flags``)
    a target uses for its own choices (limits, refused reservations, a decision)."""

    data: bytes
    cuts: tuple[int, ...] = ()
    flags: int = 0


def chunks(case: Case) -> list[bytes]:
    """``case.data`` cut at ``case.cuts`` (taken modulo the length, so any ints do)."""
    data = case.data
    points = sorted({c % (len(data) + 1) for c in case.cuts})
    out, last = [], 0
    for point in points:
        if point > last:
            out.append(data[last:point])
            last = point
    out.append(data[last:])
    return [c for c in out if c] or [b""]


# ================================================================== mutation ==
#: fuzz dictionary: bytes that mean something to one codec or another
TOKENS: tuple[bytes, ...] = (
    b"\r", b"\n", b"\x00", b"\r\n", b"\r\n\r\n", b"\n\n", b":", b" ", b"\t", b"\xff", b"\x7f",
    b"\x85", b"File: /etc/passwd\r\n", b"Path: /etc/shadow\r\n", b"Shm: x\r\n",
    b"Content-length: 99999999999999999999\r\n", b"Content-Length: 0\r\n",
    b"Content-length: -1\r\n", b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n",
    b"Compress: zlib\r\n", b"Expect: 100-continue\r\n", b"Connection: close\r\n",
    b"Connection: keep-alive\r\n", b"Flags: milter\r\n", b"0\r\n\r\n", b"0\r\nX-T: 1\r\n",
    b"Rcpt: <a\rb@x.test>\r\n", b"User: \x00root\r\n", b"IP: fe80::1%eth0\r\n",
    b"IP: [2001:db8::1]:25\r\n", b"From: <>\r\n", b"MTA-Tag: a\x01b\r\n",
    b"\r\n.\r\n", b"\r\n..", b"\n.\n", b".\r\n", b"=?utf-8?b?", b"=?utf-8?q?", b"?=", b'"',
    b"<", b">", b",", b"@", b"#", b"\\", b"(", b")", b":include:", b":fail:", b":blackhole:",
    b"|/bin/sh", b"/var/mail/x", b"*@x.test", b"X-Exim-Policy-Quarantine: reason=x\r\n",
    b"X-Envelope-From: <forged@x>\n", b"Received: from [10.0.0.1] (helo=h) by m with esmtpa\n",
    b"PING SPAMC/1.2\r\n", b"CHECK RSPAMC/1.3\r\n", b"GET /ping HTTP/1.1\r\n\r\n",
    b"POST /checkv2 HTTP/1.0\r\n", b"DATA\r\n", b"RSET\r\n", b"QUIT\r\n",
    b"MAIL FROM:<a@b> SIZE=999999999999\r\n", b"RCPT TO:<x@y>\r\n", b"BDAT 10\r\n",
    b"\xc3\xa9", b"\xed\xa0\x80", b"forwarding ", b"account ",
)
INTERESTING_NUMBERS: tuple[bytes, ...] = (
    b"0", b"1", b"-1", b"255", b"256", b"1023", b"1024", b"1025", b"4096", b"65535", b"65536",
    b"2147483647", b"2147483648", b"4294967296", b"18446744073709551616", b"99999999999",
    b"00000000000000000000001", b"1.5", b"1e3", b"ff", b"0x10",
)
#: the largest case a mutation may build (a longer one is cut); each codec has its own
#: (``Codec.max_bytes``), above the limits its target configures
MAX_CASE_BYTES = 48 * 1024
#: how often a "duplicate this line" mutation may repeat it
MAX_REPEAT = 2048

FLIP, SET, INSERT, DELETE, DUP_RANGE, TRUNCATE, DUP_LINE, SPLICE, NUMBER, CASE_SWAP = range(10)
N_OPS = 10
#: one mutation: (kind, a, b, c), ints the mutation reads modulo what it needs
Op = tuple[int, int, int, int]


def mutate(seed: bytes, ops: Sequence[Op], others: Sequence[bytes] = (),
           max_bytes: int = MAX_CASE_BYTES) -> bytes:
    """``seed`` with ``ops`` applied in order (``others``: the corpus, for splices), cut
    to ``max_bytes``."""
    data = bytearray(seed[:max_bytes])
    for kind, a, b, c in ops:
        _apply(data, kind % N_OPS, a, b, c, others, max_bytes)
        if len(data) > max_bytes:
            del data[max_bytes:]
    return bytes(data)


def _apply(data: bytearray, kind: int, a: int, b: int, c: int,
           others: Sequence[bytes], max_bytes: int) -> None:
    n = len(data)
    if kind == INSERT:
        data[a % (n + 1):a % (n + 1)] = TOKENS[b % len(TOKENS)]
    elif kind == TRUNCATE:
        del data[a % (n + 1):]
    elif kind == SPLICE and others:
        other = others[c % len(others)]
        data[a % (n + 1):] = other[b % (len(other) + 1):]
    elif n == 0:
        return
    elif kind == FLIP:
        data[a % n] ^= 1 << (b % 8)
    elif kind == SET:
        data[a % n] = b & 0xFF
    elif kind == DELETE:
        del data[a % n:a % n + b % 64 + 1]
    elif kind == DUP_RANGE:
        start = a % n
        piece = data[start:start + b % 64 + 1]
        data[c % (n + 1):c % (n + 1)] = piece
    elif kind == DUP_LINE:  # "duplicated headers", and a line repeated into a long block
        pos = a % n
        start = data.rfind(b"\n", 0, pos) + 1
        end = data.find(b"\n", pos)
        end = n if end < 0 else end + 1
        times = 1 + (b % 4 if c % 3 else b % MAX_REPEAT)
        times = min(times, max_bytes // max(end - start, 1) + 1)
        data[end:end] = bytes(data[start:end]) * times
    elif kind == NUMBER:
        match = re.compile(rb"[0-9]+").search(data, a % n)
        if match is not None:
            data[match.start():match.end()] = INTERESTING_NUMBERS[b % len(INTERESTING_NUMBERS)]
    elif kind == CASE_SWAP:
        data[a % n:a % n + b % 16 + 1] = bytes(data[a % n:a % n + b % 16 + 1]).swapcase()


# ======================================================= what goes to Rspamd ==
CONFIG = from_dict({})
#: header names the shim may send to Rspamd: the envelope's, its own, the passthrough list
RSPAMD_HEADERS = frozenset({"host", "content-length", "from", "rcpt", "ip", "helo",
                            "hostname", "user", "queue-id", "settings-id"}
                           | {n.lower() for n in checkv2.PASSTHROUGH_HEADERS})
#: headers that make Rspamd read local files, whatever else changes
FORBIDDEN_HEADERS = ("file", "path", "shm")


def check_rspamd_head(request: Request, envelope_of: Callable[[Request], object]) -> None:
    """The HTTP head the scanner would send to Rspamd for ``request``, built by the real
    :func:`request_head` (no network): one ``Name: value`` line per header, no CR, LF or
    NUL inside a line, no ``File``/``Path``/``Shm*`` header, only the known names."""
    envelope = envelope_of(request)
    message = strip_mbox_from_line(request.body)
    for settings_id in ("", CONFIG.rspamd.settings_id.outbound):
        head = request_head(len(message), envelope, host="127.0.0.1:11333",
                            settings_id=settings_id)
        check(head.startswith(b"POST /checkv2 HTTP/1.1\r\n") and head.endswith(b"\r\n\r\n"),
              f"request head framing: {head[:80]!r}")
        lines = head[:-4].split(b"\r\n")[1:]
        for line in lines:
            check(b"\r" not in line and b"\n" not in line and b"\x00" not in line,
                  f"CR/LF/NUL inside a header line sent to Rspamd: {line!r}")
            name, sep, _value = line.partition(b": ")
            low = name.decode("latin-1").lower()
            check(sep and low in RSPAMD_HEADERS, f"unexpected header to Rspamd: {line!r}")
            check(not low.startswith(FORBIDDEN_HEADERS), f"file header to Rspamd: {line!r}")


def _decisions() -> tuple[Decision, ...]:
    scan = ScanResult(
        action=REJECT, score=15.0, required_score=15.0,
        symbols=(Symbol("GTUBE", 0.0, ("x",), "Gtube pattern"), Symbol("R\r\nX", 1.5)),
        messages=(("smtp_message", "Gtube pattern"), ("other", "a\nb")),
        message_id="probe-1@example.org", add_headers=(("X-Spam", "yes\n\tfolded"),),
        raw={"action": "reject", "score": 15.0, "symbols": {}, "messages": {}})
    return (
        Decision(action=REJECT, traffic=Traffic.OUTBOUND, reason="outbound spam", scan=scan,
                 symbols=(Symbol("EXIM_POLICY_OUTBOUND"),), message="Spam message rejected"),
        Decision(action=NO_ACTION, traffic=Traffic.INBOUND, reason="ham",
                 scan=dataclasses.replace(scan, action=NO_ACTION, score=-0.1)),
        Decision(action=SOFT_REJECT, traffic=Traffic.FORWARDING, reason="try later",
                 message="Try again"),
        Decision(action=NO_ACTION, traffic=Traffic.INBOUND, reason="scanner down", defer=True),
    )


DECISIONS = _decisions()


def outcome(kind: str, detail: str = "") -> str:
    """``kind`` (request / error / need_data / ...), then ``:`` and ``detail`` with its
    numbers blanked: the bench keeps an input that gives an outcome not seen before."""
    return f"{kind}:{re.sub(r'[0-9]+', '#', detail)[:48]}" if detail else kind


def _kind(event: object) -> str:
    if isinstance(event, (Request, tuple)):  # (a tuple: a request's _signature)
        return "request"
    if isinstance(event, ProtocolError):
        return "error"
    return "need_data"


def _signature(event: object) -> object:
    """What must not depend on the split points."""
    if isinstance(event, Request):
        return (event.protocol, event.command, event.version, event.headers, bytes(event.body))
    return event


# ================================================= spamd parser: RSPAMC, SPAMC ==
#: (max_header_bytes, max_body_bytes): small ones, so that mutated inputs reach them, and
#: the transports' own header limit
SPAMD_LIMITS = ((1024, 8192), (4096, 16384))


def spamd_target(case: Case) -> str:
    """``RequestParser`` as transport/spamd.py drives it: fed chunk by chunk, with body
    reservations refused at random (the parser is held; the grant resumes it before the
    next chunk, as the transport pauses reading meanwhile), then EOF."""
    max_header, max_body = SPAMD_LIMITS[case.flags & 1]
    refusals = case.flags >> 8 if case.flags & 2 else 0
    asked = [0]

    def reserve(amount: int) -> bool:
        asked[0] += 1
        return not (refusals >> (asked[0] % 24)) & 1

    parser = RequestParser(max_header_bytes=max_header, max_body_bytes=max_body,
                           reserve=reserve if case.flags & 2 else None)
    first = None
    for chunk in chunks(case):
        parser.feed(chunk)
        _check_parser_memory(parser, max_header, max_body, len(chunk))
        if parser.held:
            parser.resume()
            _check_parser_memory(parser, max_header, max_body, len(chunk))
        event = parser.next_event()
        if first is None and event is not NEED_DATA:
            first = event
        check(first is None or event is first, "the event changed after it was returned")
    before_eof = _kind(parser.next_event())
    parser.feed_eof()
    if parser.held:
        parser.resume()
    event = parser.next_event()
    check(event is not NEED_DATA, "still NEED_DATA after EOF")
    if case.cuts or case.flags & 2:
        whole = RequestParser(max_header_bytes=max_header, max_body_bytes=max_body)
        whole.feed(case.data)
        whole.feed_eof()
        check(_signature(whole.next_event()) == _signature(event),
              f"the split points changed the outcome: {_signature(event)!r:.200}")
    if isinstance(event, Request):
        _check_spamd_request(event, max_header, max_body, case.flags)
    else:
        _check_spamd_error(event)
    return outcome(f"{before_eof}/{_kind(event)}",
                   event.text if isinstance(event, ProtocolError) else "")


def _check_parser_memory(parser: RequestParser, max_header: int, max_body: int,
                         chunk: int) -> None:
    held = len(parser._buf) + len(parser._body) + len(parser._held)
    check(held <= max_header + max_body + chunk,
          f"parser holds {held} bytes (limits {max_header} + {max_body}, chunk {chunk})")
    check(len(parser._buf) <= max_header, f"header buffer {len(parser._buf)} > {max_header}")


def _check_spamd_request(request: Request, max_header: int, max_body: int,
                         flags: int) -> None:
    check(request.command in COMMANDS[request.protocol], f"command {request.command!r}")
    check(len(request.body) <= max_body, f"body {len(request.body)} > {max_body}")
    check(len(request.headers) <= MAX_HEADER_LINES, "too many headers")
    for name, value in request.headers:
        check("\n" not in name + value, f"LF inside a header: {name!r}: {value!r}")
        check(name and ":" not in name, f"header name {name!r}")
    lengths = request.header_values("Content-length")
    if lengths and request.command not in ("PING", "SKIP"):  # (those never have a body)
        check(len(request.body) == int(lengths[0]), "body length is not Content-length")
    codec = spamd_transport.CODECS[request.protocol]
    check_rspamd_head(request, lambda r: codec.envelope(r, CONFIG))
    answer = codec.answer_at_once(request)
    if answer is None:
        answer = codec.reply(request, DECISIONS[(flags >> 4) % len(DECISIONS)], CONFIG)
    if answer:  # None: defer (closed unanswered); b"": SKIP
        check(answer.startswith((b"SPAMD/", b"RSPAMD/")), f"reply {answer[:40]!r}")
        status = answer[:answer.index(b"\r\n") + 2] if b"\r\n" in answer else b""
        check(status and b"\n" not in status[:-1], f"reply status line {answer[:80]!r}")


def _check_spamd_error(error: ProtocolError) -> None:
    line = spamc.build_error(error.code, error.text)
    check(line.endswith(b"\r\n") and line.count(b"\n") == 1 and b"\r" not in line[:-2]
          and b"\x00" not in line, f"error line {line[:100]!r}")


# ============================================================ HTTP: /checkv2 ==
HTTP_LIMITS = ((1024, 8192), (4096, 16384))
HTTP_PATHS = ((checkv2.CHECK_PATH, checkv2.PING_PATH),
              (checkv2.CHECK_PATH, checkv2.PING_PATH, checkv2.METRICS_PATH))
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_REPLY = checkv2.Reply(200, b'{"action": "no action"}')


class _Watched(checkv2.CheckV2Connection):
    """The connection, with a note of where httptools is: in a head (``head``), in the
    trailer section of a chunked body (``trailers``: after the last chunk's size line), or
    elsewhere. Only observes: every callback goes on to the real one."""

    where = "idle"
    heads = 0  # bytes fed while in a head or trailers (what llhttp may keep unparsed)

    def on_message_begin(self) -> None:
        self.where, self.heads = "head", 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self.where = "body"
        super().on_headers_complete()

    def on_chunk_header(self) -> None:
        self.where, self.heads = "trailers", 0  # a data chunk: on_body comes next
        getattr(super(), "on_chunk_header", lambda: None)()

    def on_body(self, body: bytes) -> None:
        self.where = "body"
        super().on_body(body)

    def on_chunk_complete(self) -> None:
        self.where = "body"
        getattr(super(), "on_chunk_complete", lambda: None)()

    def on_message_complete(self) -> None:
        self.where = "idle"
        super().on_message_complete()


def http_target(case: Case) -> str:
    """``CheckV2Connection`` as transport/http.py drives it: each complete request is
    answered (reading stops meanwhile) and the next one read if the connection stays
    open; an error ends it; then EOF."""
    max_header, max_body = HTTP_LIMITS[case.flags & 1]
    paths = HTTP_PATHS[(case.flags >> 1) & 1]
    split = _http_run(case, chunks(case), max_header, max_body, paths)
    if case.cuts:
        whole = _http_run(case, [case.data], max_header, max_body, paths)
        over = [e for e in split + whole if isinstance(e, ProtocolError) and e.code == 431]
        # the head limit counts whole chunks (transport/http.py says so): a 431 may come
        # a chunk earlier or later; everything else must not depend on the split
        check(over or split == whole, f"the split points changed the outcome: {split!r:.300}")
    last = split[-1]
    return outcome("/".join(_kind(e) if e is not checkv2.CLOSED else "closed"
                            for e in split[-2:]),
                   f"{last.code} {last.text}" if isinstance(last, ProtocolError) else "")


def _http_run(case: Case, pieces: list[bytes], max_header: int, max_body: int,
              paths: tuple[str, ...]) -> list[object]:
    conn = _Watched(max_header_bytes=max_header, max_body_bytes=max_body, paths=paths)
    events: list[object] = []
    for piece in pieces:
        conn.receive_data(piece)
        _check_http_memory(conn, max_header, max_body, len(piece))
        if _http_events(conn, events, case.flags):
            return events
    events.append(NEED_DATA)  # what the connection said before EOF
    conn.receive_data(b"")
    if not _http_events(conn, events, case.flags):
        raise PropertyViolation("still NEED_DATA after EOF")
    return events


def _check_http_memory(conn: _Watched, max_header: int, max_body: int, chunk: int) -> None:
    """What the connection holds of the current request (its URL, headers, body), and what
    llhttp may hold unparsed (the bytes fed in a head or in trailers), within the limits
    plus one chunk."""
    if conn._failed:
        return
    if conn.where in ("head", "trailers"):
        conn.heads += chunk
        check(conn.heads <= max_header + chunk,
              f"{conn.heads} bytes of {conn.where} read without a 431 (limit {max_header})")
    held = len(conn._url) + sum(len(n) + len(v) for n, v in conn._headers) + len(conn._body)
    check(held <= max_header + max_body + chunk,
          f"connection holds {held} bytes of a request (limits {max_header} + {max_body})")


def _http_events(conn: _Watched, events: list[object], flags: int) -> bool:
    """Answer what is ready; True when the connection is done (error, close, EOF)."""
    while True:
        event = conn.next_event()
        out = conn.data_to_send()
        check(out == _CONTINUE * (len(out) // len(_CONTINUE)), f"interim reply {out[:60]!r}")
        if event is NEED_DATA:
            return False
        events.append(_signature(event) if isinstance(event, Request) else event)
        if event is checkv2.CLOSED:
            return True
        if isinstance(event, ProtocolError):
            check(400 <= event.code < 600, f"error status {event.code}")
            reply = conn.send_error(event)
            check(reply.startswith(b"HTTP/1.1 %d " % event.code), f"error reply {reply[:60]!r}")
            return True
        check(isinstance(event, Request), f"unexpected event {event!r}")
        _check_http_request(event, conn, flags)
        reply = conn.send_reply(_REPLY, close=bool(flags & 4))
        check(reply.startswith(b"HTTP/1.1 200 OK\r\n"), f"reply {reply[:60]!r}")
        if not conn.keep_alive:
            return True
        conn.next_request()


def _check_http_request(request: Request, conn: _Watched, flags: int) -> None:
    check(len(request.body) <= conn.max_body_bytes, f"body {len(request.body)} too large")
    for name, value in request.headers:
        check(not re.search(r"[\r\n\x00]", name + value), f"header {name!r}: {value!r}")
    if request.command == "METRICS":
        return
    check_rspamd_head(request, checkv2.envelope)
    checkv2.from_milter(request)
    answer = checkv2.CODEC.answer_at_once(request)
    if answer is None:
        answer = checkv2.CODEC.reply(request, DECISIONS[(flags >> 4) % len(DECISIONS)], CONFIG)
    check(isinstance(answer, checkv2.Reply), f"answer {answer!r}")


# =================================================== the query helper (${readsocket}) ==
FORWARDING_MAP = ForwardingMap.parse("fwd@example.com\n@old.example\n")
HELPER_REPLIES = frozenset({b"yes", b"no", b"pong", b"ok", b"error unknown request",
                            b"error request too long", b"error usage: account USER",
                            b"error usage: forwarding LOCALPART@DOMAIN"})


class _Transport:
    """An in-memory asyncio transport: what the protocol writes, and whether it closed."""

    def __init__(self, protocol: object = None, loop: asyncio.AbstractEventLoop | None = None
                 ) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.paused = False
        self._protocol, self._loop = protocol, loop

    def write(self, data: bytes) -> None:
        if not self.closed:  # (asyncio's transports drop a write after close, too)
            self.written.append(bytes(data))

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._protocol is not None and self._loop is not None:
                self._loop.call_soon(self._protocol.connection_lost, None)

    abort = close

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default


class _Timer:
    def cancel(self) -> None:
        pass


def helper_target(case: Case) -> str:
    """``_QueryConnection`` fed chunk by chunk, then EOF: exactly one answer, one line, from
    the known set, the connection closed; at most ``MAX_LINE`` plus a chunk buffered. (The
    allowed-clients check and the read timer are the transport's: the timer is a stub.)"""
    split = _helper_run(chunks(case))
    if case.cuts:
        check(_helper_run([case.data]) == split, f"the split points changed the answer: {split}")
    return outcome(split[0].split(b" ")[0].decode(), split[0].decode())


def _helper_run(pieces: list[bytes]) -> tuple[bytes, ...]:
    server = types.SimpleNamespace(forwards=FORWARDING_MAP.forwards, accounts=None,
                                   _tasks=set(), connections=ConnectionTable(1))
    conn = helper._QueryConnection(server)
    transport = _Transport()
    conn.transport, conn.timer = transport, _Timer()
    for piece in pieces:
        conn.data_received(piece)
        if conn.timer is not None:
            check(b"\n" not in conn.buffer and len(conn.buffer) <= helper.MAX_LINE,
                  f"helper holds {len(conn.buffer)} bytes unanswered")
    conn.eof_received()
    written = tuple(transport.written)
    check(len(written) == 1 and written[0] in HELPER_REPLIES and transport.closed,
          f"helper answered {written!r}")
    return written


# =================================== SMTP DATA transparency and the header split ==
def reference_data(data: bytes) -> tuple[bytes, bool, bytes]:
    """RFC 5321 4.5.2 in one pass: (message, ended, bytes after the end marker)."""
    wire = b"\r\n" + data
    end = wire.find(b"\r\n.\r\n")
    if end < 0:
        return wire.replace(b"\r\n.", b"\r\n")[2:], False, b""
    return wire[:end + 2].replace(b"\r\n.", b"\r\n")[2:], True, wire[end + 5:]


def smtp_data_target(case: Case) -> str:
    """DataDecoder against :func:`reference_data` for any split, holding at most four
    bytes; DataEncoder's output decoded back to the message; HeaderSplitter's output and
    fields the same for any split, our ``X-Exim-Policy-*`` fields left out, the evidence
    read from them without an exception."""
    pieces = chunks(case)
    decoder, out = DataDecoder(), bytearray()
    for piece in pieces:
        if decoder.done:
            break
        out += decoder.feed(piece)
        check(len(decoder._tail) <= 4, f"DataDecoder holds {len(decoder._tail)} bytes")
    message, ended, _rest = reference_data(case.data)
    check(decoder.done == ended, f"end marker: decoder {decoder.done}, reference {ended}")
    if ended:
        check(bytes(out) == message, "DataDecoder output differs from the reference")
    else:
        check(message.startswith(bytes(out)) and len(message) - len(out) <= 4,
              "DataDecoder output is not the reference so far")
    _check_encoder(message if ended else case.data, pieces)
    _check_splitter(message if ended else case.data, pieces)
    return outcome("message" if ended else "need_data",
                   "dot-stuffed" if b"\r\n.." in b"\r\n" + case.data else "")


def _check_encoder(message: bytes, pieces: list[bytes]) -> None:
    encoder, wire, at = DataEncoder(), bytearray(), 0
    for piece in pieces:  # the same split sizes, applied to the message
        wire += encoder.feed(message[at:at + len(piece)])
        at += len(piece)
    wire += encoder.feed(message[at:]) + encoder.end()
    decoded, ended, rest = reference_data(bytes(wire))
    expected = message if not message or message.endswith(b"\r\n") else message + b"\r\n"
    check(ended and not rest and decoded == expected, "DataEncoder output does not decode back")


def _split_headers(message: bytes, pieces: list[bytes]) -> tuple[bytes, list]:
    splitter, out, at = qheaders.HeaderSplitter(), bytearray(), 0
    for piece in pieces:
        out += splitter.feed(message[at:at + len(piece)])
        check(len(splitter._held) <= qheaders.MAX_HEADER_BYTES + len(piece),
              f"HeaderSplitter holds {len(splitter._held)} bytes")
        at += len(piece)
    out += splitter.feed(message[at:]) + splitter.close()
    return bytes(out), splitter.fields


def _check_splitter(message: bytes, pieces: list[bytes]) -> None:
    stored, fields = _split_headers(message, pieces)
    check((stored, fields) == _split_headers(message, [message]),
          "HeaderSplitter: the split points changed the result")
    check(len(stored) <= len(message), "HeaderSplitter added bytes")
    if len(message) <= qheaders.MAX_HEADER_BYTES:
        check(not _our_fields(stored), "an X-Exim-Policy-* field was stored")
    _evidence(fields)


_BLANK_LINE = re.compile(rb"\n\r?\n")


def _our_fields(stored: bytes) -> list[bytes]:
    """The ``X-Exim-Policy-*`` fields in the header block of ``stored`` as a mail reader
    finds it: lines end at LF, the block at the first line that is empty or a lone CR.
    (HeaderSplitter does not take ``LF CR LF`` for the end: with mixed line ends, which
    Exim never sends, it may strip more, never less.)"""
    match = _BLANK_LINE.search(b"\n" + stored)  # (the LF before: the first line's start)
    head = stored if match is None else stored[:match.start()]
    return [f for f in qheaders._fields(head) if f.lower().startswith(qheaders.OURS)]


def _evidence(fields: list[tuple[str, bytes]]) -> None:
    """What the receiver reads from the fields (receiver._receive): never an exception."""
    from_fields(fields, "tester@lab.test", CONFIG)
    for name in ("Subject", "From", "Message-ID"):
        qheaders.decoded(qheaders.first(fields, name) or b"")


# ============================================ the quarantine receiver (aiosmtpd) ==
QUARANTINE_MAX_MESSAGE = 1024
_QUARANTINE_CONFIG = Config(quarantine=QuarantineConfig(
    listen=(), max_message_size=QUARANTINE_MAX_MESSAGE, max_recipients=8, min_free_bytes=0))
#: (aiosmtpd echoes an unknown verb into its 500 reply, a bare CR included: its own affair)
_REPLY_LINE = re.compile(rb"[2-5][0-9][0-9][ -][^\n]*\r\n")


class _MemoryPath:
    def __init__(self, store: _MemoryStore) -> None:
        self.store, self.data = store, bytearray()

    def unlink(self, missing_ok: bool = False) -> None:
        self.store.discarded += 1


class _MemoryFile:
    def __init__(self, path: _MemoryPath) -> None:
        self.path = path

    def write(self, data: bytes) -> int:
        self.path.data += data
        return len(data)

    def close(self) -> None:
        pass


class _MemoryStore:
    """QuarantineStore's interface as the receiver uses it, in memory (no disk, no fsync:
    a million sessions; the store has tests of its own)."""

    root = tmp = "<memory>"

    def __init__(self) -> None:
        self.held: list[tuple[object, bytes]] = []
        self.discarded = 0

    def temp_path(self) -> _MemoryPath:
        return _MemoryPath(self)

    def temp_file(self, path: _MemoryPath) -> tuple[_MemoryPath, _MemoryFile]:
        return path, _MemoryFile(path)

    def commit(self, path: _MemoryPath, message: object) -> tuple[str, bool]:
        self.held.append((message, bytes(path.data)))
        return f"q{len(self.held)}", False

    def free_bytes(self) -> int:
        return 1 << 40


class _InlineThread:
    """StoreThread's ``call`` without the thread: the future is done at once."""

    def call(self, fn, *args) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def stop(self) -> None:
        pass


_LOOP: asyncio.AbstractEventLoop | None = None


def _loop() -> asyncio.AbstractEventLoop:
    global _LOOP
    if _LOOP is None or _LOOP.is_closed():
        try:  # uvloop (the test extras have it): the sessions cost a third less
            import uvloop
            _LOOP = uvloop.new_event_loop()
        except ImportError:
            _LOOP = asyncio.new_event_loop()
    return _LOOP


def quarantine_target(case: Case) -> str:
    """One SMTP session of the real receiver (aiosmtpd + the receiver's DATA) over an
    in-memory transport, fed chunk by chunk (only while it reads: flow control is
    honoured), then EOF. No exception reaches aiosmtpd's handler, every reply is a
    well-formed SMTP line, the reader holds at most twice its limit plus a chunk, a held
    message has none of our fields and fits the size limit, the session is forgotten."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # the receiver logs every refusal
    try:
        return _loop().run_until_complete(_quarantine_session(chunks(case)))
    finally:
        logging.disable(previous)


_RECEIVER: qreceiver.QuarantineReceiver | None = None


def _receiver() -> qreceiver.QuarantineReceiver:
    """One receiver for all sessions (its StoreThread replaced once: no thread per case)."""
    global _RECEIVER
    if _RECEIVER is None:
        _RECEIVER = qreceiver.QuarantineReceiver(_QUARANTINE_CONFIG, _MemoryStore())
        _RECEIVER.thread.stop()
        _RECEIVER.thread = _InlineThread()  # type: ignore[assignment]
    return _RECEIVER


async def _quarantine_session(pieces: list[bytes]) -> str:
    store = _MemoryStore()
    receiver = _receiver()
    receiver.store = store  # type: ignore[assignment]
    session = receiver._session()
    errors: list[BaseException] = []
    library: list[str] = []

    async def handle_exception(error: Exception) -> str:
        if _ours(error):
            errors.append(error)
        else:  # aiosmtpd's own (its address parser's IndexError on "MAIL FROM:<"):
            library.append(type(error).__name__)  # answered 500, as aiosmtpd does
        return f"500 Error: ({type(error).__name__}) {error}"

    session.event_handler.handle_exception = handle_exception
    transport = _Transport(session, asyncio.get_running_loop())
    session.connection_made(transport)
    limit = session._reader._limit
    try:
        for piece in pieces:
            if not await _settle(session, transport):
                break
            session.data_received(piece)
            check(len(session._reader._buffer) <= 2 * limit + len(piece),
                  f"reader holds {len(session._reader._buffer)} bytes (limit {limit})")
        await _settle(session, transport)
        if not transport.closed:
            session.eof_received()
            transport.close()
        for _ in range(8):
            await asyncio.sleep(0)
    finally:
        if not transport.closed:
            transport.close()
            await asyncio.sleep(0)
    check(not errors, f"exception in the SMTP session: {errors[:1]!r}")
    check(receiver.sessions == 0, f"{receiver.sessions} sessions still counted")
    kind = _quarantine_outcome(b"".join(transport.written), store)
    return kind + "".join(f" ({name} in aiosmtpd)" for name in sorted(set(library)))


def _ours(error: BaseException) -> bool:
    """Whether ``error`` was raised in exim-policy's code (else in aiosmtpd or the standard
    library it calls, with no frame of ours in between)."""
    frames = traceback.extract_tb(error.__traceback__)
    return isinstance(error, PropertyViolation) or any(
        f"{os.sep}exim_policy{os.sep}" in frame.filename for frame in frames)


async def _settle(session, transport: _Transport) -> bool:
    """Run the session until it waits for input (True) or the connection closed (False)."""
    for _ in range(10000):
        await asyncio.sleep(0)
        if transport.closed:
            return False
        if session._reader._waiter is not None and not transport.paused:
            return True
    raise PropertyViolation("the SMTP session neither reads nor closes (stuck)")


def _quarantine_outcome(written: bytes, store: _MemoryStore) -> str:
    replies = _REPLY_LINE.findall(written)
    check(b"".join(replies) == written, f"malformed SMTP reply in {written[-200:]!r}")
    for message, stored in store.held:
        check(len(stored) <= QUARANTINE_MAX_MESSAGE, f"held {len(stored)} bytes")
        check(message.sha256 == hashlib.sha256(stored).hexdigest(), "held digest")
        check(not _our_fields(stored), "an X-Exim-Policy-* field was held")
    codes = " ".join(sorted({r[:3].decode() for r in replies}))  # (kept: they are the detail)
    if store.held:
        return f"held:{codes}"
    if any(r[:1] in b"45" for r in replies[1:]):
        return f"refused:{codes}"
    return f"need_data:{codes}"


# ================================================== forwarding: lsearch, sqlite ==
LOCAL_DOMAINS = frozenset({"x.test", "y.test", "z.test"})
#: the forwarding sources' files (in memory where /dev/shm is: a file per case)
_SANDBOX = Path(tempfile.mkdtemp(prefix="exim-policy-fuzz-",
                                 dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
_SANDBOX_OWNER = os.getpid()
# (only in this process: a child forked by another test that exits through atexit must
# not remove it under the tests still to run)
atexit.register(lambda: os.getpid() == _SANDBOX_OWNER and shutil.rmtree(_SANDBOX, True))
INCLUDE_FILE = _SANDBOX / "included"
INCLUDE_FILE.write_bytes(b"inc1@x.test, out@gmail.example\n# comment\n\\local\n")
_real_read_text = redirect.read_text


def _sandboxed_read_text(path: str, raw: bytes | None = None, first: int = 0) -> str:
    """``:include:`` reads only files in the fuzz sandbox (a mutated path must not read
    /dev/zero); any other path is a missing file, as redirect.py reports one."""
    if raw is None and os.path.dirname(os.path.abspath(path)) != str(_SANDBOX):
        raise ForwardingSourceError(path, "No such file or directory")
    return _real_read_text(path, raw, first)


@contextlib.contextmanager
def _sandboxed():
    """redirect.py's ``:include:`` confined to the sandbox while a target reads (only
    then: the other tests include files where they like)."""
    redirect.read_text = _sandboxed_read_text  # type: ignore[assignment]
    try:
        yield
    finally:
        redirect.read_text = _real_read_text


def _source_summary(src) -> tuple:
    """A Source as the graph reads it, independent of how its chunks were cut."""
    targets = []
    for items, owners in src.chunks:
        names = (items.split(",") if items else []) if isinstance(items, str) else items
        targets.extend(zip(owners, names, strict=True))
    return (tuple(src.keys), tuple(sorted(targets)), src.count, tuple(src.wildcards),
            tuple(src.end_targets), tuple(src.end_owners))


def _lsearch_read(path: str, case_sensitive: bool, domain: str, **constants) -> tuple:
    """lsearch.read's result in comparable form, with lsearch's ``constants`` set."""
    saved = {name: getattr(lsearch, name) for name in constants}
    warnings: list[str] = []
    try:
        for name, value in constants.items():
            setattr(lsearch, name, value)
        with _sandboxed():
            src = lsearch.read(path, LOCAL_DOMAINS, domain=domain,
                               case_sensitive=case_sensitive, warn=warnings.append)
    except ForwardingSourceError as exc:
        return ("error", str(exc), exc.origin)
    finally:
        for name, value in saved.items():
            setattr(lsearch, name, value)
    return ("source", _source_summary(src), tuple(warnings))


def lsearch_target(case: Case) -> str:
    """lsearch.read on the case as a file: a Source, or ForwardingSourceError naming
    ``file:line`` of a line the file has, never another exception; the bulk path, the
    redirect.py path (``_PLAIN`` empty) and tiny pieces (``PIECE_BYTES``) agree."""
    path = str(_SANDBOX / f"virtual-{os.getpid()}")
    _SANDBOX.mkdir(exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(case.data)
    case_sensitive, domain = bool(case.flags & 1), ("x.test" if case.flags & 2 else "")
    result = _lsearch_read(path, case_sensitive, domain)
    if result[0] == "error":
        _check_origin(result[2], path, case.data.count(b"\n") + 1)
    general = _lsearch_read(path, case_sensitive, domain, _PLAIN=b"")
    check(_agree(general, result),
          f"the bulk path and redirect.py disagree: {_diff(result, general)}")
    pieces = _lsearch_read(path, case_sensitive, domain, PIECE_BYTES=16 + case.flags % 64)
    check(_agree(pieces, result),
          f"the pieces and the whole file disagree: {_diff(result, pieces)}")
    return outcome(result[0], str(result[1]).partition(": ")[2] if result[0] == "error"
                   else "")


def _agree(a: tuple, b: tuple) -> bool:
    """Two reads of one file agree: the same Source, or both an error (which line is
    reported first depends on the order the lines are read in: a bad byte on line 3 is
    found before a bad address on line 1 when they are in one piece)."""
    return a[0] == b[0] == "error" or a == b


def _diff(a: object, b: object) -> str:
    """Where two results first differ (both sides), for a short failure message."""
    while isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        at = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        if at is None:
            break
        a, b = a[at], b[at]
    return f"{a!r:.150} != {b!r:.150}"


def _check_origin(origin: str, path: str, lines: int, rows: bool = False) -> None:
    match = re.fullmatch(re.escape(path) + (r":row " if rows else ":") + r"(\d+)"
                         r"(?: \(:include:.*\))?", origin, re.S)
    check(match and 1 <= int(match[1]) <= lines, f"error origin {origin!r} ({lines} lines)")


SQLITE_DB = str(_SANDBOX / "forwardings.db")
with sqlite3.connect(SQLITE_DB) as _conn:
    _conn.execute("CREATE TABLE IF NOT EXISTS forwardings (source TEXT, destination TEXT)")
_conn.close()


def _sql_value(cell: bytes) -> str:
    """A cell of the case as an SQL literal: a type marker first, else text with any
    bytes (invalid UTF-8 and NUL included, through a hex blob cast to TEXT)."""
    if cell == b"NULL":
        return "NULL"
    if cell[:1] == b"#" and re.fullmatch(rb"#-?[0-9]{1,18}", cell):
        return cell[1:].decode()
    if cell[:1] == b"%" and re.fullmatch(rb"%-?[0-9]{1,9}\.[0-9]{1,9}", cell):
        return cell[1:].decode()
    if cell[:1] == b"!":
        return f"x'{cell[1:].hex()}'"
    return f"CAST(x'{cell.hex()}' AS TEXT)"


def sqlite_query(data: bytes) -> tuple[str, int]:
    """The case as the rows of a query: rows split at LF, columns at TAB (one to three).
    (The query itself is configuration, not data: only the rows are fuzzed.)"""
    rows = [line.split(b"\t")[:3] for line in data.split(b"\n")[:2000]]
    width = max(len(r) for r in rows)
    values = []
    for row in rows:  # (VALUES has no limit on its rows; a compound SELECT has 500)
        cells = [_sql_value(c) for c in row] + ["NULL"] * (width - len(row))
        values.append("(" + ", ".join(cells) + ")")
    return "VALUES " + ", ".join(values), len(rows)


def sqlite_target(case: Case) -> str:
    """sqlite_source.read with the case's rows: a Source, or ForwardingSourceError naming
    ``path:row N`` of a row the query returns (or the query), never another exception."""
    query, n_rows = sqlite_query(case.data)
    case_sensitive, domain = bool(case.flags & 1), ("x.test" if case.flags & 2 else "")
    try:
        with _sandboxed():
            sqlite_source.read(SQLITE_DB, query, LOCAL_DOMAINS, domain=domain,
                               case_sensitive=case_sensitive, warn=lambda _message: None)
    except ForwardingSourceError as exc:
        if exc.origin != SQLITE_DB:  # (the query as a whole failed)
            _check_origin(exc.origin, SQLITE_DB, n_rows, rows=True)
        return outcome("error", exc.message)
    return "source"


# ======================================================================= seeds ==
def _http_seeds() -> list[bytes]:
    raw = [p.read_bytes() for p in sorted(GOLDEN_HTTP.glob("*.raw"))]
    return raw + [b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n",
                  b"GET /metrics HTTP/1.0\r\n\r\n",
                  b"POST /checkv2 HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
                  b"IP: 192.0.2.1:25\r\nMTA-Tag: out\r\nFile: /etc/passwd\r\n\r\nhello"]


def _spamd_seeds() -> list[bytes]:
    return [captures.EXIM_RSPAMC_AUTH, captures.EXIM_RSPAMC_0001, captures.EXIM_RSPAMC_0003,
            captures.EXIM_SA, captures.EXIM_SA_0003, captures.SPAMC_CHECK,
            captures.SPAMC_REPORT, captures.SPAMC_SYMBOLS, captures.SPAMC_PROCESS,
            captures.SPAMC_HEADERS, captures.SPAMC_PING, b"PING SPAMC/1.2\r\n",
            b"SKIP SPAMC/1.5\r\n\r\n", b"TELL SPAMC/1.5\r\nContent-length: 0\r\n\r\n",
            b"SYMBOLS RSPAMC/1.3\nContent-length: 6\nFrom: <>\nRcpt: a@x, \"b,c\"@y\n\nbody\r\n",
            b"REPORT SPAMC/1.2\r\nUser: nobody\r\n\r\n" + captures.EXIM_MBOX_484]


def _helper_seeds() -> list[bytes]:
    return [b"forwarding fwd@example.com\n", b"FORWARDING <Fwd@Example.COM>\r\n",
            b"forwarding anyone@old.example", b"forwarding bob@example.com\n",
            b"account alice\n", b"account\n", b"ping\n", b"ping", b"nonsense\n",
            b"forwarding " + b"a" * 1000 + b"@example.com\n", b"x" * 1030]


def _quarantine_message() -> bytes:
    return (b"From: tester@lab.test\r\nTo: x@example.com\r\n"
            b"Subject: =?utf-8?b?SGVsbG8gd29ybGQ=?=\r\nMessage-ID: <r1@lab.test>\r\n"
            b'X-Exim-Policy-Quarantine: reason="Gtube pattern"; auth=tester; ip=192.0.2.5;'
            b"\r\n\thelo=client.test; queue=1abcde-000001-AB; host=mx1; score=15.0; "
            b"action=reject\r\n"
            b"X-Exim-Policy-Report: Action: reject\r\n Symbol: GTUBE(0.00)\r\n"
            b"X-Exim-Policy-Recipients: x@example.com, bcc@example.org\r\n"
            b"\r\n.leading dot\r\nspam\r\n")


def _quarantine_seeds() -> list[bytes]:
    message = _quarantine_message().replace(b"\r\n.", b"\r\n..")
    session = (b"EHLO mx1.test\r\nMAIL FROM:<tester@lab.test>\r\nRCPT TO:<x@example.com>\r\n"
               b"RCPT TO:<bcc@example.org>\r\nDATA\r\n" + message + b".\r\n")
    return [session + b"QUIT\r\n", session + session[14:] + b"QUIT\r\n",
            b"HELO mx1\r\nMAIL FROM:<>\r\nRCPT TO:<a@b>\r\nDATA\r\n.\r\nRSET\r\nNOOP\r\n",
            b"EHLO mx1\r\nDATA\r\nMAIL FROM:<a@b> SMTPUTF8\r\nRCPT TO:<\xc3\xa9@b>\r\nDATA x\r\n",
            b"EHLO mx1\r\nMAIL FROM:<a@b>\r\nRCPT TO:<a@b>\r\nDATA\r\n"
            + b"x" * 1100 + b"\r\n.\r\nQUIT\r\n"]


def _smtp_data_seeds() -> list[bytes]:
    message = _quarantine_message()
    return [message.replace(b"\r\n.", b"\r\n..") + b".\r\nQUIT\r\n",
            b".\r\n", b"..\r\n.\r\n", b"a\r\n.\r\n", b"a\n.\nb\r\n.\r\n",
            b"Subject: =?utf-8?q?caf=C3=A9?=\r\n\r\nx\r\n.\r\n", message]


def _lsearch_seeds() -> list[bytes]:
    block = (
        "# a comment\n"
        "a@x.test: b@x.test, out@gmail.example\n"
        "b@x.test: c@y.test\n"
        "C@Z.TEST: Far@Gmail.EXAMPLE ,  mbox@y.test\n"
        "d@x.test: mbox@x.test,\n  e@x.test,\n\tf@x.test\n"
        "e@x.test: |/usr/bin/ticket, /var/mail/archive\n"
        "f@x.test: :blackhole:, out@gmail.example\n"
        "g@x.test: out@gmail.example, :fail: gone for good\n"
        'h@x.test: "quoted"@gmail.example, Some One <one@gmail.example>\n'
        "i@x.test: \\i, \\out@gmail.example\n"
        "o@x.test : bare, p@x.test \t\n"
        "p@x.test  out@gmail.example\n"
        "\n   ignored@gmail.example (an indented line after an empty one)\n"
        '"quoted@x.test": l@x.test, c@y.test\n'
        "q@y.test: x.@gmail.example, .y@x.test, z..@x.test, /x=y/@gate.example\n"
        "*@z.test: catch@gmail.example\n"
        "r@x.test: @relay.example,@r2:user@gmail.example, (comment) <s@x.test>\n"
        f"s@x.test: :include:{INCLUDE_FILE}\n"
        "bare: t@x.test\n*: everyone@gmail.example\n")
    return [block.encode(), block.replace("\n", "\r\n").encode(),
            b"k@x.test: caf\xc3\xa9@gmail.example\n", b"a@x.test: b@x.test\na@x.test: c@x.test\n"]


def _sqlite_seeds() -> list[bytes]:
    return [b"a@x.test\tb@ext.example\nb@x.test\tc@y.test, d@gmail.example\n@y.test\tout@g.example",
            b"a@x.test\t:blackhole:\nc@x.test\t|/bin/cat\n*@z.test\tcatch@g.example",
            b"a@x.test\n", b"NULL\tb@x.test\n#5\t%1.5\n!00ff\tx@y.test",
            b"a@x.test\tb@x.test\tc@x.test\n\xff\xfe\tx@y.test"]


@dataclass(frozen=True)
class Codec:
    """One codec's target and seed corpus."""

    name: str
    target: Callable[[Case], str]
    seeds: Callable[[], list[bytes]]
    #: inputs at most this long (a target that writes a file or runs a session is slower)
    max_bytes: int = MAX_CASE_BYTES


CODECS: dict[str, Codec] = {c.name: c for c in (
    Codec("rspamc", spamd_target, lambda: [s for s in _spamd_seeds() if b"RSPAMC" in s[:40]],
          24 * 1024),
    Codec("spamc", spamd_target, lambda: [s for s in _spamd_seeds() if b" SPAMC/" in s[:40]],
          24 * 1024),
    Codec("http", http_target, _http_seeds, 24 * 1024),
    Codec("helper", helper_target, _helper_seeds, 4096),
    Codec("smtp_data", smtp_data_target, _smtp_data_seeds, 8192),
    Codec("quarantine", quarantine_target, _quarantine_seeds, 3072),
    Codec("lsearch", lsearch_target, _lsearch_seeds, 3072),
    Codec("sqlite", sqlite_target, _sqlite_seeds, 2048),
)}
