"""asyncio transport for the spamd-compatible listener.

Per connection: refuse clients outside ``allowed_clients`` before reading a byte, wait for
a slot (connection limit), read with per-read and per-request deadlines into the sans-IO
parser, hand the request to the service, write the reply, close. Closing after every reply
is part of the protocol: Exim reads to EOF and DEFERs after ``tmo`` on an open socket.
"""
from __future__ import annotations

import asyncio
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
READ_CHUNK = 65536
MAX_HEADER_BYTES = 64 * 1024


class SpamdServer:
    def __init__(self, config: ServerConfig, handler: Handler) -> None:
        self.config = config
        self.handler = handler
        self._slots = asyncio.Semaphore(config.max_connections)
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task] = set()

    @property
    def sockets(self) -> list[socket.socket]:
        return [s for server in self._servers for s in server.sockets]

    async def start(self) -> None:
        self._servers = await start_listeners(self.config.listen, self._on_connect,
                                              self.config.unix_socket_mode)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish (up to ``grace`` s), then cancel."""
        for server in self._servers:
            server.close()
        pending = set(self._tasks)
        if pending:
            done, still = await asyncio.wait(pending, timeout=grace)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()

    async def _on_connect(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if not client_allowed(peer, self.config.allowed_clients):
            log.warning("refused connection from %s (not in server.allowed_clients)", peer[0])
            return
        try:
            await asyncio.wait_for(self._slots.acquire(), self.config.queue_timeout)
        except asyncio.TimeoutError:
            log.error("no free connection slot within %gs (server.max_connections = %d); "
                      "closing connection from %s", self.config.queue_timeout,
                      self.config.max_connections, peer)
            return
        try:
            event = await self._read_request(reader)
            if isinstance(event, ProtocolError):
                log.warning("protocol error from %s: %s", peer, event.text)
                reply = spamc.build_error(event.code, event.text)
            else:
                reply = await self.handler(event)
            if reply:
                writer.write(reply)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.info("connection from %s lost: %s", peer, exc)
        finally:
            self._slots.release()

    async def _read_request(self, reader: asyncio.StreamReader) -> Request | ProtocolError:
        parser = RequestParser(max_header_bytes=MAX_HEADER_BYTES,
                               max_body_bytes=self.config.max_message_size)
        try:
            return await asyncio.wait_for(self._feed_until_event(reader, parser),
                                          self.config.request_timeout)
        except asyncio.TimeoutError:
            return ProtocolError(79, "Timeout: request not complete in time")

    async def _feed_until_event(self, reader: asyncio.StreamReader,
                                parser: RequestParser) -> Request | ProtocolError:
        while True:
            event = parser.next_event()
            if event is not NEED_DATA:
                return event
            try:
                data = await asyncio.wait_for(reader.read(READ_CHUNK), self.config.read_timeout)
            except asyncio.TimeoutError:
                return ProtocolError(79, f"Timeout: no data for {self.config.read_timeout:g}s")
            if data:
                parser.feed(data)
            else:
                parser.feed_eof()
