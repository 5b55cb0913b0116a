"""Rspamd over HTTP ``/checkv2``: a sans-IO request builder / reply parser and a thin
asyncio client.

Why not a general HTTP library: Rspamd 3.4 answers every request with ``Connection:
close``, so one request per connection and "read to EOF" is the whole protocol; a few lines
of asyncio keep the shim's CPU per message small next to Rspamd's. Two traps from Rspamd
3.4 shape the client: the request must carry ``Content-Length`` and must NOT be half-closed
(Rspamd drops a ``/checkv2`` task whose peer shuts down its write side).
"""
from __future__ import annotations

import asyncio
import sys
import urllib.parse

from ..config import RspamdConfig, SettingsIds
from ..model import Envelope, ScanResult, Traffic
from ..protocol.text import has_line_breaker
from . import BAD_REPLY, CONNECT, HTTP_STATUS, TIMEOUT, Message, ScannerError
from .rspamd_json import loads, result_from_json

DEFAULT_SETTINGS_IDS = SettingsIds()
#: Rspamd's JSON for a message is small; anything far larger is not a reply we can use
MAX_REPLY_BYTES = 16 * 1024 * 1024


def _clean(value: str | None) -> str | None:
    """A header value that is safe to forward, or None (CR/LF/NUL would let an Exim-side
    value inject headers such as ``File:``, which makes Rspamd read a local file)."""
    if value is None or has_line_breaker(value):
        return None
    return value


def request_head(length: int, envelope: Envelope, *, host: str, settings_id: str = "",
                 path: str = "/checkv2") -> bytes:
    """The HTTP request head for a message of ``length`` bytes (headers from the envelope
    only); the message itself follows it unchanged."""
    headers = [("Host", host), ("Content-Length", str(length))]
    if envelope.sender is not None and _clean(envelope.sender) is not None:
        headers.append(("From", f"<{envelope.sender}>"))
    for rcpt in envelope.recipients:
        if _clean(rcpt) is not None:
            headers.append(("Rcpt", f"<{rcpt}>"))
    for name, value in (("IP", envelope.ip), ("Helo", envelope.helo),
                        ("Hostname", envelope.hostname), ("User", envelope.user),
                        ("Queue-Id", envelope.queue_id), ("Settings-ID", settings_id)):
        value = _clean(value)
        if value:  # an empty User must not make the task "authenticated"
            headers.append((name, value))
    for name, value in envelope.passthrough:
        # the shim's own Settings-ID for the traffic class wins over a client's
        if _clean(value) is not None and not (settings_id and name == "Settings-ID"):
            headers.append((name, value))
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    # latin-1 round-trips the raw bytes the codecs decoded (8-bit HELO, SMTPUTF8 addresses)
    return head.encode("latin-1")


def parse_reply(data: bytes) -> ScanResult:
    """Parse a complete HTTP reply (read to EOF); raise ScannerError when unusable."""
    head, sep, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = lines[0].split(None, 2)
    if data and not data.startswith(b"HTTP/"[:len(data)]):
        raise ScannerError(f"not an HTTP reply from Rspamd: {lines[0][:80]!r}", BAD_REPLY)
    if not sep or len(status) < 2 or not status[1].isdigit():
        raise ScannerError(f"incomplete HTTP reply from Rspamd ({len(data)} bytes)", BAD_REPLY)
    code = int(status[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            length = int(value.strip())
    if length is not None:
        if len(body) < length:
            raise ScannerError(f"Rspamd reply cut short ({len(body)} of {length} bytes)",
                               BAD_REPLY)
        body = body[:length]
    try:
        doc = loads(body)
    except ValueError:
        raise ScannerError(f"HTTP {code} from Rspamd with a body that is not JSON",
                           BAD_REPLY if code == 200 else HTTP_STATUS) from None
    if code != 200:
        detail = doc.get("error") if isinstance(doc, dict) else None
        raise ScannerError(f"HTTP {code} from Rspamd: {detail or 'no detail'}", HTTP_STATUS)
    return result_from_json(doc)


#: a message is written in slices of this size, each once the previous one has left:
#: the transport then never holds a copy of more than one slice of a large message
WRITE_SLICE = 256 * 1024
#: below this the head and the message go in one write (one syscall, a small copy)
SMALL_MESSAGE = 64 * 1024


class _Exchange(asyncio.Protocol):
    """Write one request, collect the reply until Rspamd closes (it always does)."""

    def __init__(self, head: bytes, message: memoryview, done: asyncio.Future) -> None:
        self.head = head
        self.message = message
        self.sent = 0
        self.paused = False
        self.done = done
        self.chunks: list[bytes] = []
        self.size = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # no write_eof() afterwards: Rspamd 3.4 drops a half-closed /checkv2 request
        if len(self.message) <= SMALL_MESSAGE:
            transport.write(self.head + self.message)
            self.sent = len(self.message)
            return
        transport.write(self.head)
        self._write_more()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._write_more()

    def _write_more(self) -> None:
        while not self.paused and self.sent < len(self.message):
            piece = self.message[self.sent:self.sent + WRITE_SLICE]  # a view, not a copy
            self.sent += len(piece)
            self.transport.write(piece)

    def data_received(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_REPLY_BYTES:
            self._finish(ScannerError("Rspamd reply larger than 16 MiB", BAD_REPLY))
            self.transport.abort()
            return
        self.chunks.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc if exc is not None else b"".join(self.chunks))

    def _finish(self, outcome: bytes | BaseException) -> None:
        if self.done.done():
            return
        if isinstance(outcome, BaseException):
            self.done.set_exception(outcome)
        else:
            self.done.set_result(outcome)


class RspamdScanner:
    """POST each message to Rspamd's ``/checkv2`` on a fresh connection, with the
    ``Settings-ID`` of its traffic class (``rspamd.settings_id``)."""

    @classmethod
    def for_config(cls, config: RspamdConfig) -> RspamdScanner:
        return cls(config.url, config.timeout, config.settings_id)

    def __init__(self, url: str, timeout: float,
                 settings_ids: SettingsIds = DEFAULT_SETTINGS_IDS) -> None:
        """``url``: ``http://host:port[/prefix]``, or ``unix:/path`` (Rspamd's socket)."""
        #: the unix socket's path; None: TCP to host, port
        self.socket_path = url[5:] if url.startswith("unix:") else None
        parts = urllib.parse.urlsplit("http://localhost" if self.socket_path else url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 11333
        self.path = (parts.path.rstrip("/") or "") + "/checkv2"
        self.host_header = parts.netloc
        self.where = self.socket_path or f"{self.host}:{self.port}"  # (for errors)
        self.timeout = timeout
        self.settings_ids = settings_ids

    async def scan(self, message: Message, envelope: Envelope,
                   traffic: Traffic | None = None) -> ScanResult:
        """The verdict; ``traffic`` None: no Settings-ID (Rspamd's defaults)."""
        view = memoryview(message)
        settings_id = self.settings_ids.for_traffic(traffic) if traffic is not None else ""
        head = request_head(len(view), envelope, host=self.host_header,
                            settings_id=settings_id, path=self.path)
        try:
            data = await within(self.timeout, self._exchange(head, view))
        except asyncio.TimeoutError:
            raise ScannerError(f"no reply from Rspamd within {self.timeout:g}s",
                               TIMEOUT) from None
        except OSError as exc:
            raise ScannerError(f"cannot reach Rspamd at {self.where}: "
                               f"{exc.strerror or exc}", CONNECT) from None
        return parse_reply(data)

    async def _exchange(self, head: bytes, message: memoryview) -> bytes:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        def exchange() -> _Exchange:
            return _Exchange(head, message, done)

        if self.socket_path is not None:
            transport, _ = await loop.create_unix_connection(exchange, self.socket_path)
        else:
            transport, _ = await loop.create_connection(exchange, self.host, self.port)
        try:
            return await done
        finally:
            transport.close()


if sys.version_info >= (3, 11):
    async def within(seconds: float, coro):
        """Await ``coro`` with a deadline; asyncio.timeout needs no extra task."""
        async with asyncio.timeout(seconds):
            return await coro
else:  # pragma: no cover - Python 3.10
    async def within(seconds: float, coro):
        return await asyncio.wait_for(coro, seconds)
