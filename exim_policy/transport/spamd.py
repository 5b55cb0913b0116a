"""asyncio transport for the spamd-compatible listener.

Per connection: refuse clients outside ``allowed_clients`` before reading a byte; take a
place in the shared :class:`~.limits.ConnectionTable` (when it is full, the connection that
has been sending its request longest is shed); feed the sans-IO parser as bytes arrive,
under a read deadline and a whole-request deadline counted from the connect; reserve the
body's bytes in the shared :class:`~.limits.ByteBudget` before the parser holds them
(reading pauses while a request waits for room); hand the complete request to the handler;
write the reply; close. Closing after every reply is part of the protocol: Exim reads to
EOF and DEFERs after ``tmo`` on an open socket.

Nothing here waits for a scan slot: a connection that is still sending holds no slot that a
complete request needs (the handler bounds concurrent scans itself).

``stop()`` (:class:`~.listeners.StreamServer`) lets every open connection finish.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ..config import ServerConfig
from ..model import ProtocolError, Request
from ..protocol import rspamc, spamc
from ..protocol.codec import Codec
from ..protocol.parser import NEED_DATA, RequestParser
from .limits import Limits
from .listeners import Connection, StreamServer

log = logging.getLogger(__name__)

Handler = Callable[[Codec, Request], Awaitable["bytes | None"]]
#: the codecs of the two protocols this listener's parser tells apart by the request line
CODECS: dict[str, Codec] = {"rspamc": rspamc.CODEC, "spamc": spamc.CODEC}
MAX_HEADER_BYTES = 64 * 1024
#: a body's rate is judged after this long; waiting requests look again this often
SLOW_GRACE = 0.5
RECLAIM_EVERY = 0.5


class SpamdServer(StreamServer):
    name = "spamd"

    def __init__(self, config: ServerConfig, handler: Handler,
                 limits: Limits | None = None) -> None:
        super().__init__(config, handler, limits)
        self.addresses = config.listen
        self._reclaim_timer: asyncio.TimerHandle | None = None

    def connection(self) -> asyncio.Protocol:
        return _Connection(self)

    def stopping(self) -> None:
        if self._reclaim_timer is not None:
            self._reclaim_timer.cancel()
            self._reclaim_timer = None

    def reclaim(self) -> None:
        """While requests wait for the body budget: close the holders whose bodies are too
        slow to be complete in time (see _Connection), now and every
        :data:`RECLAIM_EVERY` (one timer for the listener, however many wait)."""
        self._reclaim_timer = None
        if not self.limits.budget.waiting:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in self.connections:
            if isinstance(conn, _Connection) and conn.too_slow(now):
                conn.give_up_room()
        self._reclaim_timer = loop.call_later(RECLAIM_EVERY, self.reclaim)

    def reclaiming(self) -> bool:
        return self._reclaim_timer is not None


class _Connection(Connection):
    """One client connection: one request, one reply, close."""

    def __init__(self, server: SpamdServer) -> None:
        super().__init__(server)
        self.server: SpamdServer = server
        self.parser: RequestParser | None = None
        self.received = False
        self.granted_at = 0.0  # when its body's room was reserved

    # ------------------------------------------------------------- asyncio events --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.admitted(transport):
            return
        self.parser = RequestParser(max_header_bytes=MAX_HEADER_BYTES,
                                    max_body_bytes=self.config.max_message_size,
                                    reserve=self._reserve)
        self.deadline = self.loop.time() + self.config.request_timeout
        self._arm_read_timer()

    def data_received(self, data: bytes) -> None:
        if self.parser is None:
            return
        self.received = True
        self.parser.feed(data)
        self._advance()

    def eof_received(self) -> bool:
        if self.parser is not None:
            self.parser.feed_eof()
            self._advance()
        return True  # keep the write side open: the SA variant half-closes, then reads

    def connection_lost(self, exc: Exception | None) -> None:
        self.parser = None
        super().connection_lost(exc)

    def shed(self) -> None:
        """The connection table needs this connection's place: it is still sending."""
        self.parser = None
        self.shed_now(sending=True)

    # -------------------------------------------------------------- body budget --
    # A declared Content-length is reserved whole, at the end of the headers (a burst of
    # large messages then never deadlocks on half-reserved bodies). Its room must not be
    # held by a body that trickles in: while a request waits for room (SpamdServer.reclaim), a
    # holder whose body, at the rate it arrives, cannot be complete before its
    # request_timeout is closed (it would fail anyway) and its room goes to the waiters.
    # (The HTTP front reserves bytes as they arrive: a trickle there holds only itself.)
    def _reserve(self, amount: int) -> bool:
        """The parser is about to hold ``amount`` body bytes: reserve them, or queue."""
        if self.server.limits.budget.take(amount):
            self.reserved += amount
            self.granted_at = self.loop.time()
            return True
        self.wait_for_budget(amount, lambda: self._budget_granted(amount))
        if not self.server.reclaiming():
            self.server.reclaim()
        return False

    def _budget_granted(self, amount: int) -> None:
        self.budget_wait = None
        self.cancel_timer()
        if self.parser is None:  # shed or timed out meanwhile: hand the bytes on
            self.server.limits.budget.give_back(amount)
            return
        self.reserved += amount
        self.granted_at = self.loop.time()
        self.parser.resume()
        if not self.transport.is_closing():
            self.transport.resume_reading()
        self._advance()

    def budget_expired(self) -> None:
        self.parser = None
        self._fail(ProtocolError(spamc.EX_TEMPFAIL, "Service Unavailable: too many bytes in "
                                              "flight, try again later"), counted=False)

    def too_slow(self, now: float) -> bool:
        """Holding room for a declared body that, arriving at its rate so far, cannot be
        complete before this request's deadline (judged after :data:`SLOW_GRACE`)."""
        parser = self.parser
        if parser is None or parser.held or not self.reserved:
            return False
        elapsed = now - self.granted_at
        got, length = parser.body_progress
        if length is None or elapsed < SLOW_GRACE:  # (a body to EOF holds what arrived)
            return False
        return got / elapsed * max(self.deadline - now, 0.0) < length - got

    def give_up_room(self) -> None:
        got, length = self.parser.body_progress if self.parser is not None else (0, 0)
        self.server.slow_bodies.hit(
            self.loop.time(), "closed the connection from %s: its body (%d of %d bytes in "
            "%.0fs) could not be complete within server.request_timeout, and other "
            "requests wait for its room in server.max_bytes_in_flight", self.peer, got,
            length or 0, self.loop.time() - self.granted_at)
        if self.server.metrics is not None:
            self.server.metrics.shed(self.server.name)
        self.parser = None
        self._fail(ProtocolError(spamc.EX_TEMPFAIL, "Service Unavailable: the message arrives "
                                 "too slowly, try again later"), counted=False)

    # ------------------------------------------------------------------- requests --
    def _advance(self) -> None:
        parser = self.parser
        if parser is None or parser.held:
            return
        event = parser.next_event()
        if event is NEED_DATA:
            self._arm_read_timer()
            return
        self.cancel_timer()
        self.parser = None  # one request per connection: later bytes are not ours
        self.server.limits.connections.read_done(self)
        self.transport.pause_reading()
        if isinstance(event, ProtocolError):
            if not self.received:  # connect and close: a health check, not an error
                log.debug("connection from %s closed without a request", self.peer)
                self.transport.close()
                return
            self._fail(event)
            return
        self.server.spawn(self._respond(event))

    async def _respond(self, request: Request) -> None:
        try:
            reply = await self.server.handler(CODECS[request.protocol], request)
        except Exception:  # a bug: log it; the client sees a close, Exim DEFERs
            log.exception("error while handling a request from %s", self.peer)
            if self.server.metrics is not None:
                self.server.metrics.handler_error(self.server.name)
            reply = None
        del request  # the body's bytes go as soon as the answer is known
        if reply and not self.transport.is_closing():
            self.transport.write(reply)
        self.transport.close()  # flushes the reply first

    def _fail(self, error: ProtocolError, counted: bool = True) -> None:
        """Answer ``error`` and close; ``counted``: a protocol error (not a limit)."""
        if counted and self.server.metrics is not None:
            self.server.metrics.protocol_error(self.server.name)
        self.server.protocol_errors.hit(self.loop.time(), "protocol error from %s: %s",
                                        self.peer, error.text)
        self.transport.write(spamc.build_error(error.code, error.text))
        self.transport.close()

    # --------------------------------------------------------------------- timers --
    def _arm_read_timer(self) -> None:
        self.cancel_timer()
        delay = min(self.config.read_timeout, self.deadline - self.loop.time())
        self.timer = self.loop.call_later(max(delay, 0.0), self._read_expired)

    def _read_expired(self) -> None:
        self.timer = None
        if self.parser is None:
            return
        self.parser = None
        if self.loop.time() >= self.deadline:
            why = f"Timeout: request not complete in {self.config.request_timeout:g}s"
        else:
            why = f"Timeout: no data for {self.config.read_timeout:g}s"
        if not self.received:  # a client that never said anything gets no error line
            log.debug("closing connection from %s: nothing received in %gs", self.peer,
                      self.config.read_timeout)
            self.transport.close()
            return
        self._fail(ProtocolError(spamc.EX_TIMEOUT, why))
