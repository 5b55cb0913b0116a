"""The policy helper for Exim expansions: a one-line request, a one-line answer, close.

Made for ``${readsocket}`` (Exim sends the request, half-closes by default, reads to EOF)::

    ${readsocket{inet:127.0.0.1:11336}{forwarding $local_part@$domain\\n}{3s}{}{error}}

Requests (case-insensitive verb, one per connection; the line ends at a newline or EOF):
    ``forwarding ADDR``  -> ``yes`` / ``no``: ADDR forwards to an external mailbox
    ``ping``             -> ``pong``
Anything else gets ``error <why>``. Answers carry no trailing newline: Exim 4.96's
``${readsocket}`` returns the bytes as they are (an empty fourth argument does not strip
a newline), so ``${if eq{${readsocket{...}}}{yes}}`` works as written.
"""
from __future__ import annotations

import asyncio
from typing import Callable

from .transport.listeners import client_allowed, start_listeners

MAX_LINE = 1024
READ_TIMEOUT = 5.0


def answer(line: bytes, forwards: Callable[[str], bool]) -> bytes:
    """The reply for one request line (pure)."""
    text = line.decode("latin-1").strip()
    verb, _, arg = text.partition(" ")
    verb, arg = verb.lower(), arg.strip()
    if verb == "forwarding":
        if not arg or " " in arg or "@" not in arg:
            return b"error usage: forwarding LOCALPART@DOMAIN"
        return b"yes" if forwards(arg) else b"no"
    if verb == "ping" and not arg:
        return b"pong"
    return b"error unknown request"


class QueryServer:
    def __init__(self, addresses, allowed_clients, forwards: Callable[[str], bool],
                 unix_mode: int = 0o666) -> None:
        self.addresses = addresses
        self.unix_mode = unix_mode
        self.allowed_clients = allowed_clients
        self.forwards = forwards
        self._servers: list[asyncio.AbstractServer] = []

    @property
    def sockets(self):
        return [s for server in self._servers for s in server.sockets]

    async def start(self) -> None:
        self._servers = await start_listeners(self.addresses, lambda: _QueryConnection(self),
                                              self.unix_mode)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()


class _QueryConnection(asyncio.Protocol):
    """Callbacks only, no task: a query is answered inside data_received/eof_received."""

    def __init__(self, server: QueryServer) -> None:
        self.server = server
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not client_allowed(transport.get_extra_info("peername"), self.server.allowed_clients):
            transport.close()
            return
        # a silent client gets nothing and is dropped; the next one is served
        self.timer = asyncio.get_running_loop().call_later(READ_TIMEOUT, transport.close)

    def data_received(self, data: bytes) -> None:
        if self.timer is None:
            return  # answered already; ignore the rest
        self.buffer += data
        if b"\n" in self.buffer:
            self._reply(self.buffer.split(b"\n", 1)[0])
        elif len(self.buffer) > MAX_LINE:
            self._reply(None)

    def eof_received(self) -> bool:
        if self.timer is not None:
            self._reply(self.buffer)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _reply(self, line: bytes | None) -> None:
        self.timer.cancel()
        self.timer = None
        if line is None:
            self.transport.write(b"error request too long")
        else:
            self.transport.write(answer(line, self.server.forwards))
        self.transport.close()
