"""Sans-IO request parser for both spamd-style protocols: bytes in, one event out.

Exim's ``variant=rspamd`` sends ``CHECK RSPAMC/1.3``; Exim's default variant and ``spamc``
send ``<CMD> SPAMC/1.x``. Both share one framing: a command line, ``Name: value`` header
lines, a blank line, then the body. The first line decides the protocol. Usage::

    parser = RequestParser()
    parser.feed(chunk)           # as bytes arrive
    parser.feed_eof()            # when the peer half-closes or closes
    event = parser.next_event()  # Request | ProtocolError | NEED_DATA

Once a :class:`Request` or :class:`ProtocolError` has been returned, it is returned again on
every later call; further bytes are ignored (one request per connection). Memory is
bounded: never more than ``max_header_bytes`` of header data and ``max_body_bytes`` of body
are kept, whatever the peer sends.

Body memory can be gated: with ``reserve``, the parser asks ``reserve(n)`` before it holds
``n`` more body bytes (the whole ``Content-length`` at the end of the headers, or each
chunk of a body that runs to EOF). When that returns False the parser is :attr:`held`: it
keeps what it was fed since (the caller should stop reading) and goes on with
:meth:`resume` once the caller has reserved :attr:`wanted` bytes itself. The body is
built in place, in one buffer of the declared length: ``Request.body`` is that buffer,
never a copy.
"""
from __future__ import annotations

import enum
import re
from collections.abc import Callable

from ..model import ProtocolError, Request

EX_PROTOCOL = 76


class _NeedData:
    """Type of :data:`NEED_DATA` (a singleton, compare with ``is``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: what next_event() returns while the request is incomplete
NEED_DATA = _NeedData()

#: spamd's own limit (spamd.raw parse_headers: "too many headers")
MAX_HEADER_LINES = 256

#: a command line is ~25 bytes ("REPORT_IFSPAM SPAMC/1.5"); anything this long is garbage
MAX_REQUEST_LINE = 256

COMMANDS = {
    # Rspamd's legacy mode understands only these two
    # (docs/wire-formats.md, "Rspamd's legacy protocol")
    "rspamc": frozenset({"CHECK", "SYMBOLS"}),
    # spamd.raw command dispatch (docs/wire-formats.md, "SpamAssassin's spamd protocol")
    "spamc": frozenset({"CHECK", "SYMBOLS", "REPORT", "REPORT_IFSPAM", "PROCESS",
                        "HEADERS", "PING", "SKIP", "TELL"}),
}

#: commands that never carry a body (complete after the command line, or from protocol 1.5
#: after the blank line that ends the header block)
_BODYLESS = frozenset({"PING", "SKIP"})

_REQUEST_LINE = re.compile(
    rb"(?P<cmd>[A-Za-z_]+) (?P<proto>RSPAMC|SPAMC)/(?P<ver>[0-9]{1,3}(?:\.[0-9]{1,3})?)[ \t]*")
_DECIMAL = re.compile(r"[0-9]{1,20}")


def version_tuple(version: str) -> tuple[int, int]:
    """``"1.5"`` -> ``(1, 5)``, ``"2"`` -> ``(2, 0)``; the parser only lets such strings through."""
    major, _, minor = version.partition(".")
    return int(major), int(minor or 0)


def _show(line: bytes, limit: int = 80) -> str:
    """A request line as safe one-line text for an error message."""
    text = line[:limit].decode("latin-1")
    text = "".join(ch if " " <= ch <= "~" or ch >= "\xa0" else "?" for ch in text)
    return text + ("..." if len(line) > limit else "")


class _State(enum.Enum):
    REQUEST_LINE = "request line"
    HEADERS = "headers"
    HELD = "held body"  # waiting for the caller to reserve room for body bytes
    BODY = "body"
    DONE = "done"


class RequestParser:
    """Incremental parser for one request; see the module docstring for the contract.

    Framing rules (docs/wire-formats.md: "Exim's request: SpamAssassin variant", "Exim's
    request: variant=rspamd", "SpamAssassin's spamd protocol", "Rules for a
    spamd-compatible server"):

    * RSPAMC requires ``Content-length`` and the request is complete as soon as that many
      body bytes arrived: Exim never half-closes in this variant, so waiting for EOF would
      deadlock until Exim's timeout.
    * SPAMC: with ``Content-length`` the request is complete after that many bytes (fewer at
      EOF is SpamAssassin's "Content-Length mismatch" error); without it the body runs to EOF.
    * ``PING``/``SKIP``: complete after the command line for protocol < 1.5, after the
      (usually empty) header block from 1.5 on. Consuming exactly what the client sends
      matters: closing a socket with unread bytes sends RST, which can destroy our reply.
    """

    def __init__(self, *, max_header_bytes: int = 65536,
                 max_body_bytes: int = 50 * 1024 * 1024,
                 reserve: Callable[[int], bool] | None = None) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self._reserve = reserve
        #: body bytes reserve() agreed to (or the caller reserved after a refusal)
        self.reserved = 0
        #: the amount reserve() refused while :attr:`held`
        self.wanted = 0
        self._held = bytearray()  # bytes fed while held
        self._state = _State.REQUEST_LINE
        self._buf = bytearray()   # unparsed bytes of the request line / header block
        self._pos = 0             # start of the first unparsed line in _buf
        self._scan = 0            # where to continue searching for b"\n" in _buf
        self._header_bytes = 0    # bytes of complete lines consumed so far (incl. request line)
        self._received = 0
        self._command = ""
        self._protocol = ""
        self._version = ""
        self._headers: list[tuple[str, str]] = []
        self._length: int | None = None
        self._body = bytearray()
        self._filled = 0          # body bytes received so far when the length is known
        self._eof_while_held = False
        self._event: Request | ProtocolError | None = None

    # ------------------------------------------------------------------------- public API --
    def feed(self, data: bytes) -> None:
        """Append received bytes; bytes after a complete request (or an error) are ignored."""
        if self._event is not None or not data:
            return
        self._received += len(data)
        if self._state is _State.HELD:
            self._held += data
            return
        if self._state is _State.BODY:
            self._take_body(data)
            return
        self._buf += data
        self._parse_lines()

    def feed_eof(self) -> None:
        """The peer half-closed or closed: finish a to-EOF body, or fail an incomplete request."""
        if self._event is not None:
            return
        if self._state is _State.HELD:
            self._eof_while_held = True
            return
        if self._state is _State.BODY:
            got = len(self._body) if self._length is None else self._filled
            if self._length is None:
                self._complete()
            elif self._protocol == "spamc":
                # SpamAssassin's wording, so spamc users see a familiar message
                self._fail(f"Bad header line: (Content-Length mismatch: Expected {self._length}"
                           f" bytes, got {got} bytes)")
            else:
                self._fail(f"connection closed after {self._received} bytes: body has {got}"
                           f" of {self._length} bytes (Content-length)")
            return
        self._fail(f"connection closed after {self._received} bytes, in the {self._state.value}")

    def next_event(self) -> Request | ProtocolError | _NeedData:
        """The complete :class:`Request`, a :class:`ProtocolError`, or :data:`NEED_DATA`."""
        return self._event if self._event is not None else NEED_DATA

    @property
    def body_progress(self) -> tuple[int, int | None]:
        """(body bytes received so far, the declared ``Content-length`` or None)."""
        return (self._filled if self._length is not None else len(self._body)), self._length

    @property
    def held(self) -> bool:
        """True while ``reserve`` refused room and :meth:`resume` was not called yet."""
        return self._state is _State.HELD

    def resume(self) -> None:
        """The caller reserved :attr:`wanted` bytes after ``reserve`` refused them: go on
        with the bytes fed meanwhile."""
        if self._state is not _State.HELD:
            raise RuntimeError("resume() without a refused reservation")
        granted, self.wanted = self.wanted, 0
        self.reserved += granted
        self._state = _State.BODY
        pending, self._held = bytes(self._held), bytearray()
        if self._length is not None:
            self._body = bytearray(self._length)
            self._take_body(pending)
        else:  # what came after the refused chunk asks for its own room
            self._body += pending[:granted]
            if len(pending) > granted:
                self._take_body(pending[granted:])
        if self._event is None and self._eof_while_held and not self.held:
            self.feed_eof()

    # -------------------------------------------------------------------------- internals --
    def _fail(self, text: str, code: int = EX_PROTOCOL) -> None:
        self._event = ProtocolError(code, text)
        self._finish()

    def _finish(self) -> None:
        self._state = _State.DONE
        self._buf = bytearray()
        self._body = bytearray()
        self._held = bytearray()
        self._headers = []

    def _complete(self) -> None:
        self._event = Request(protocol=self._protocol, command=self._command,
                              version=self._version, headers=tuple(self._headers),
                              body=self._body)
        self._finish()

    def _ask(self, amount: int) -> bool:
        """May the parser hold ``amount`` more body bytes? If not, it is now held."""
        if self._reserve is None or self._reserve(amount):
            self.reserved += amount
            return True
        self.wanted = amount
        self._state = _State.HELD
        return False

    def _parse_lines(self) -> None:
        """Consume complete lines from _buf while in the request line / header states."""
        buf = self._buf
        while self._state in (_State.REQUEST_LINE, _State.HEADERS):
            newline = buf.find(b"\n", self._scan)
            limit = (MAX_REQUEST_LINE if self._state is _State.REQUEST_LINE
                     else self.max_header_bytes - self._header_bytes)
            end = len(buf) if newline < 0 else newline + 1
            if end - self._pos > limit:
                self._fail_oversize()
                return
            if newline < 0:
                self._scan = len(buf)
                return
            line = bytes(buf[self._pos:newline])
            self._header_bytes += newline + 1 - self._pos
            self._pos = self._scan = newline + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._state is _State.REQUEST_LINE:
                self._request_line(line)
            else:
                self._header_line(line)
        if self._state in (_State.BODY, _State.HELD):
            rest = bytes(buf[self._pos:])
            self._buf = bytearray()
            self._pos = self._scan = 0
            if self._state is _State.HELD:
                self._held += rest
            else:
                self._take_body(rest)

    def _fail_oversize(self) -> None:
        if self._state is _State.REQUEST_LINE:
            self._fail(f"Bad header line: request line longer than {MAX_REQUEST_LINE} bytes:"
                       f" {_show(bytes(self._buf[:MAX_REQUEST_LINE]))}")
        else:
            self._fail(f"Bad header line: (header block exceeds {self.max_header_bytes} bytes)")

    def _request_line(self, line: bytes) -> None:
        match = _REQUEST_LINE.fullmatch(line)
        command = match.group("cmd").decode("ascii") if match else ""
        protocol = match.group("proto").decode("ascii").lower() if match else ""
        # commands are case-sensitive in both servers: "check RSPAMC/1.3" is refused
        if not match or command not in COMMANDS[protocol]:
            self._fail(f"Bad header line: unsupported request line: {_show(line)}")
            return
        self._command, self._protocol = command, protocol
        self._version = match.group("ver").decode("ascii")
        if command in _BODYLESS and version_tuple(self._version) < (1, 5):
            self._complete()
            return
        self._state = _State.HEADERS

    def _header_line(self, line: bytes) -> None:
        if line == b"":
            self._end_of_headers()
            return
        if len(self._headers) >= MAX_HEADER_LINES:
            self._fail("Bad header line: (too many headers)")
            return
        name, colon, value = line.partition(b":")
        name = name.strip()
        if not colon or not name:
            self._fail(f"Bad header line: {_show(line)}")
            return
        self._headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))

    def _end_of_headers(self) -> None:
        if self._command in _BODYLESS:
            self._complete()
            return
        compress = [v for k, v in self._headers if k.lower() == "compress"]
        if compress:
            # spamc -z: the body would be zlib data; forwarding it to Rspamd as a message
            # would scan garbage, so refuse rather than pretend
            self._fail(f"Bad header line: Compress: {_show(compress[0].encode('latin-1'))}"
                       " is not supported")
            return
        lengths = [v for k, v in self._headers if k.lower() == "content-length"]
        if not lengths:
            if self._protocol == "rspamc":
                # Exim never half-closes in the rspamd variant: without a length the body
                # would have no end (and Rspamd itself would scan an empty message)
                self._fail("Bad header line: Content-length required for RSPAMC")
                return
            self._length = None
        else:
            if not all(_DECIMAL.fullmatch(v) for v in lengths) or len(set(map(int, lengths))) > 1:
                self._fail(f"Bad header line: bad Content-length: "
                           f"{_show(', '.join(lengths).encode('latin-1'))}")
                return
            self._length = int(lengths[0])
            if self._length > self.max_body_bytes:
                self._fail(f"message too big: {self._length} bytes, limit {self.max_body_bytes}")
                return
        if self._length == 0:
            self._complete()
            return
        self._state = _State.BODY
        if self._length is not None and self._ask(self._length):
            self._body = bytearray(self._length)  # filled in place: no copy at the end

    def _take_body(self, data: bytes) -> None:
        if self._length is not None:
            take = min(len(data), self._length - self._filled)
            self._body[self._filled:self._filled + take] = memoryview(data)[:take]
            self._filled += take
            if self._filled >= self._length:
                self._complete()
            return
        if len(self._body) + len(data) > self.max_body_bytes:
            self._fail(f"message too big: more than {self.max_body_bytes} bytes")
            return
        if not data or self._ask(len(data)):
            self._body += data
        else:
            self._held += data
