"""asyncio transport for the HTTP front (Rspamd's ``/checkv2``, keep-alive).

The same limits as the spamd listener (transport/spamd.py): ``allowed_clients`` before a
byte is read, a place in the shared connection table (a connection waiting for its next
request, or still sending one, may be shed to make room), a read deadline and a
whole-request deadline counted from the request's first byte, and the shared body budget.

The budget is reserved for the bytes as they arrive, before the codec sees them (a chunked
body has no length to reserve up front); a request that does not fit waits with reading
paused, and after ``queue_timeout`` gets a 503. The reservation is given back once the
reply is written. A connection that waits for its next request longer than
``read_timeout`` is closed without a word: the client opens a new one (Haraka's Node agent
drops idle connections after 5 s itself, so the default 30 s never races it).

Errors are answered with a 4xx/5xx JSON ``{"error": ...}`` and the connection is closed;
a request the handler could not answer (a bug) gets a 500.
"""
from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from collections.abc import Awaitable, Callable

from ..config import ListenAddress, ServerConfig
from ..model import ProtocolError, Request
from ..protocol.checkv2 import (CHECK_PATH, CLOSED, CODEC, METRICS_PATH, PING_PATH,
                                CheckV2Connection, Reply)
from ..protocol.codec import Codec
from ..protocol.parser import NEED_DATA
from .limits import Limits
from .listeners import Connection, StreamServer

log = logging.getLogger(__name__)

Handler = Callable[[Codec, Request], Awaitable[Reply]]
Scrape = Callable[[Request], Awaitable[Reply]]
MAX_HEADER_BYTES = 64 * 1024


class HttpServer(StreamServer):
    name = "http"

    def __init__(self, config: ServerConfig, handler: Handler | None,
                 limits: Limits | None = None, *,
                 addresses: tuple[ListenAddress, ...] | None = None,
                 scrape: Scrape | None = None) -> None:
        """``handler`` answers /checkv2 and /ping (None: neither route); ``scrape``
        answers /metrics (None: no such route); ``addresses``: other than
        ``config.http_listen`` (the metrics listener's)."""
        super().__init__(config, handler, limits)  # type: ignore[arg-type]
        self.addresses = config.http_listen if addresses is None else addresses
        self.scrape = scrape

    @property
    def paths(self) -> tuple[str, ...]:
        """The routes served (``scrape`` may be set after construction)."""
        return ((CHECK_PATH, PING_PATH) if self.handler is not None else ()) + \
            ((METRICS_PATH,) if self.scrape is not None else ())

    def connection(self) -> asyncio.Protocol:
        return _HttpConnection(self)

    def stopping(self) -> None:
        for conn in list(self._connections):
            conn.stopping()  # type: ignore[attr-defined]


class _HttpConnection(Connection):
    kind = "HTTP connection"
    request_name = "an HTTP request"
    budget_answer = "503"

    def __init__(self, server: HttpServer) -> None:
        super().__init__(server)
        self.server: HttpServer = server
        self.codec: CheckV2Connection | None = None
        #: bytes of the current request have arrived (a request is under way)
        self.started = False
        self.busy = False  # a request is being answered
        self.waiting: bytes = b""  # arrived, not yet fed: waits for budget

    # ------------------------------------------------------------- asyncio events --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.admitted(transport):
            return
        self.codec = CheckV2Connection(max_header_bytes=MAX_HEADER_BYTES,
                                       max_body_bytes=self.config.max_message_size,
                                       paths=self.server.paths)
        self._arm_read_timer()

    def data_received(self, data: bytes) -> None:
        if self.codec is None or not data:
            return
        if not self.started:
            self.started = True
            self.deadline = self.loop.time() + self.config.request_timeout
        budget = self.server.limits.budget
        if budget.take(len(data)):
            self.reserved += len(data)
            self._feed(data)
            return
        self.waiting = data
        amount = min(len(data), budget.capacity)
        self.wait_for_budget(amount, lambda: self._budget_granted(amount))

    def eof_received(self) -> bool:
        if self.codec is not None and not self.busy:
            self._feed(b"")
        return True  # answer a request that ended with the client's half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.codec = None
        super().connection_lost(exc)

    def shed(self) -> None:
        """The connection table needs this place: this connection is idle or sending."""
        self.codec = None
        self.shed_now(sending=self.started)

    def stopping(self) -> None:
        """The server stops: an idle keep-alive connection ends now, a busy one after its
        reply (``keep_alive`` is then not honoured)."""
        if not self.started and not self.busy and self.codec is not None:
            self.codec = None
            self.transport.close()

    # --------------------------------------------------------------- requests --
    def _feed(self, data: bytes) -> None:
        assert self.codec is not None
        self.codec.receive_data(data)
        self._advance()

    def _advance(self) -> None:
        codec = self.codec
        if codec is None or self.busy:
            return
        event = codec.next_event()
        out = codec.data_to_send()  # "100 Continue" for a client that waits for it
        if out:
            self.transport.write(out)
        if event is NEED_DATA:
            self._arm_read_timer()
            return
        self.cancel_timer()
        if event is CLOSED:
            self.codec = None
            self.transport.close()
            return
        if isinstance(event, ProtocolError):
            self._fail(event)
            return
        assert isinstance(event, Request)
        self.busy = True
        self.server.limits.connections.read_done(self)
        self.transport.pause_reading()
        self.server.spawn(self._respond(event))

    async def _respond(self, request: Request) -> None:
        server = self.server
        try:
            if request.command == "METRICS":
                reply = await server.scrape(request)  # type: ignore[misc]
            else:
                reply = await server.handler(CODEC, request)
        except Exception:  # a bug: log it, answer 500, close
            log.exception("error while handling an HTTP request from %s", self.peer)
            if server.metrics is not None:
                server.metrics.handler_error(server.name)
            self._fail(ProtocolError(HTTPStatus.INTERNAL_SERVER_ERROR,
                                     "internal error (see the exim-policy log)"), quiet=True)
            return
        finally:
            del request  # the body's bytes go as soon as the answer is known
        codec = self.codec
        if codec is None or self.transport.is_closing():
            return
        self.transport.write(codec.send_reply(reply, close=self.server.closing))
        self.busy = False
        self.started = False
        self.give_back()
        if not codec.keep_alive:
            self.codec = None
            self.transport.close()  # flushes the reply first
            return
        codec.next_request()
        self.server.limits.connections.reading_again(self)
        self.transport.resume_reading()
        self._advance()  # a pipelined request may already be in the codec

    def _fail(self, error: ProtocolError, quiet: bool = False) -> None:
        """Answer ``error`` and close; ``quiet``: not a protocol error (a bug, a limit),
        logged and counted elsewhere."""
        if not quiet:
            if self.server.metrics is not None:
                self.server.metrics.protocol_error(self.server.name)
            self.server.protocol_errors.hit(self.loop.time(), "HTTP protocol error from %s: "
                                            "%s %s", self.peer, error.code, error.text)
        self.codec = None
        self.transport.write(CheckV2Connection.send_error(error))
        self.transport.close()

    # ------------------------------------------------------------------ budget --
    def _budget_granted(self, amount: int) -> None:
        self.budget_wait = None
        self.cancel_timer()
        data, self.waiting = self.waiting, b""
        self.reserved += amount
        if self.codec is None:
            self.give_back()
            return
        self.transport.resume_reading()
        self._feed(data)

    def budget_expired(self) -> None:
        self._fail(ProtocolError(HTTPStatus.SERVICE_UNAVAILABLE, "too many bytes in flight, try "
                                             "again later"), quiet=True)

    # ------------------------------------------------------------------ timers --
    def _arm_read_timer(self) -> None:
        self.cancel_timer()
        delay = self.config.read_timeout
        if self.started:
            delay = min(delay, self.deadline - self.loop.time())
        self.timer = self.loop.call_later(max(delay, 0.0), self._read_expired)

    def _read_expired(self) -> None:
        self.timer = None
        if self.codec is None or self.busy:
            return
        if not self.started:  # idle between requests (or never said anything)
            log.debug("closing idle HTTP connection from %s", self.peer)
            self.codec = None
            self.transport.close()
            return
        if self.loop.time() >= self.deadline:
            why = f"request not complete in {self.config.request_timeout:g}s"
        else:
            why = f"no data for {self.config.read_timeout:g}s"
        self._fail(ProtocolError(HTTPStatus.REQUEST_TIMEOUT, why))
