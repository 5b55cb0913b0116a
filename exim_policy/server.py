"""asyncio transport for the spamd-compatible listener.

Per connection: refuse clients outside ``allowed_clients`` before reading a byte, wait for
a slot (connection limit; reading stays paused meanwhile, so a waiting connection costs no
buffer), feed the sans-IO parser as bytes arrive under a per-read and a per-request
deadline, hand the complete request to the service, write the reply, close. Closing after
every reply is part of the protocol: Exim reads to EOF and DEFERs after ``tmo`` on an open
socket.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import socket
from typing import Awaitable, Callable

from .config import ServerConfig
from .listeners import client_allowed, start_listeners
from .model import ProtocolError, Request
from .protocol import spamc
from .protocol.parser import NEED_DATA, RequestParser

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable["bytes | None"]]
MAX_HEADER_BYTES = 64 * 1024


class SpamdServer:
    def __init__(self, config: ServerConfig, handler: Handler) -> None:
        self.config = config
        self.handler = handler
        self._servers: list[asyncio.AbstractServer] = []
        self._active = 0
        self._waiting: collections.deque[_Connection] = collections.deque()
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task] = set()

    @property
    def sockets(self) -> list[socket.socket]:
        return [s for server in self._servers for s in server.sockets]

    async def start(self) -> None:
        self._servers = await start_listeners(
            self.config.listen, lambda: _Connection(self), self.config.unix_socket_mode)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish (up to ``grace`` s), then cut."""
        for server in self._servers:
            server.close()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        for conn in list(self._connections):
            conn.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()

    # ----------------------------------------------------------- connection slots --
    def _admit(self, conn: "_Connection") -> bool:
        if self._active < self.config.max_connections:
            self._active += 1
            return True
        self._waiting.append(conn)
        return False

    def _release(self) -> None:
        while self._waiting:
            conn = self._waiting.popleft()
            if conn.waiting:  # skip connections that gave up or went away meanwhile
                conn.admitted()
                return
        self._active -= 1


class _Connection(asyncio.Protocol):
    """One client connection: one request, one reply, close."""

    def __init__(self, server: SpamdServer) -> None:
        self.server = server
        self.config = server.config
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport
        self.peer: object = None
        self.parser: RequestParser | None = None
        self.waiting = False
        self.paused = False
        self.holds_slot = False
        self.received = False
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0

    # ------------------------------------------------------------- asyncio events --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = transport.get_extra_info("peername")
        if not client_allowed(self.peer, self.config.allowed_clients):
            log.warning("refused connection from %s (not in server.allowed_clients)",
                        self.peer[0])
            transport.close()
            return
        self.server._connections.add(self)
        if self.server._admit(self):
            self.admitted()
        else:
            self.waiting = self.paused = True
            self.transport.pause_reading()
            self.timer = self.loop.call_later(self.config.queue_timeout, self._queue_expired)

    def admitted(self) -> None:
        self.waiting = False
        self.holds_slot = True
        self.parser = RequestParser(max_header_bytes=MAX_HEADER_BYTES,
                                    max_body_bytes=self.config.max_message_size)
        self.deadline = self.loop.time() + self.config.request_timeout
        self._arm_read_timer()
        if self.paused:
            self.paused = False
            self.transport.resume_reading()

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
        self._cancel_timer()
        self.server._connections.discard(self)
        self.waiting = False
        if self.holds_slot:
            self.holds_slot = False
            self.server._release()

    # ------------------------------------------------------------------- requests --
    def _advance(self) -> None:
        event = self.parser.next_event()
        if event is NEED_DATA:
            self._arm_read_timer()
            return
        self._cancel_timer()
        self.parser = None  # one request per connection: later bytes are not ours
        self.transport.pause_reading()
        if isinstance(event, ProtocolError):
            if not self.received:  # connect and close: a health check, not an error
                log.debug("connection from %s closed without a request", self.peer)
                self.transport.close()
                return
            self._fail(event)
            return
        task = self.loop.create_task(self._respond(event))
        self.server._tasks.add(task)
        task.add_done_callback(self.server._tasks.discard)

    async def _respond(self, request: Request) -> None:
        try:
            reply = await self.server.handler(request)
        except Exception:  # a bug: log it; the client sees a close, Exim DEFERs
            log.exception("error while handling a request from %s", self.peer)
            reply = None
        if reply and not self.transport.is_closing():
            self.transport.write(reply)
        self.transport.close()  # flushes the reply first

    def _fail(self, error: ProtocolError) -> None:
        log.warning("protocol error from %s: %s", self.peer, error.text)
        self.transport.write(spamc.build_error(error.code, error.text))
        self.transport.close()

    # --------------------------------------------------------------------- timers --
    def _arm_read_timer(self) -> None:
        self._cancel_timer()
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
        self._fail(ProtocolError(79, why))

    def _queue_expired(self) -> None:
        self.timer = None
        if not self.waiting:
            return
        self.waiting = False
        log.error("no free connection slot within %gs (server.max_connections = %d); "
                  "closing connection from %s", self.config.queue_timeout,
                  self.config.max_connections, self.peer)
        self.transport.close()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
