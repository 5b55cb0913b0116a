"""The policy helper for Exim expansions: a one-line request, a one-line answer, close.

Made for ``${readsocket}`` (Exim sends the request, half-closes by default, reads to EOF)::

    ${readsocket{inet:127.0.0.1:11336}{forwarding $local_part@$domain\\n}{2s}{}{error}}

Requests (case-insensitive verb, one per connection):
    ``forwarding ADDR``  -> ``yes`` / ``no``: ADDR forwards to an external mailbox
    ``ping``             -> ``pong``
Anything else gets ``error <why>``. Every answer ends with one newline (the fourth
readsocket argument ``{}`` strips it).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from .listeners import client_allowed, start_listeners

log = logging.getLogger(__name__)

MAX_LINE = 1024
READ_TIMEOUT = 5.0


def answer(line: bytes, forwards: Callable[[str], bool]) -> bytes:
    """The reply for one request line (pure)."""
    text = line.decode("latin-1").strip()
    verb, _, arg = text.partition(" ")
    verb, arg = verb.lower(), arg.strip()
    if verb == "forwarding":
        if not arg or " " in arg or "@" not in arg:
            return b"error usage: forwarding LOCALPART@DOMAIN\n"
        return b"yes\n" if forwards(arg) else b"no\n"
    if verb == "ping" and not arg:
        return b"pong\n"
    return b"error unknown request\n"


class QueryServer:
    def __init__(self, addresses, allowed_clients, forwards: Callable[[str], bool],
                 unix_mode: int = 0o666) -> None:
        self.addresses = addresses
        self.unix_mode = unix_mode
        self.allowed_clients = allowed_clients
        self.forwards = forwards
        self._servers: list[asyncio.AbstractServer] = []

    async def start(self) -> None:
        self._servers = await start_listeners(self.addresses, self._on_connect, self.unix_mode)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()

    async def _on_connect(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        try:
            if not client_allowed(writer.get_extra_info("peername"), self.allowed_clients):
                return
            line = await asyncio.wait_for(self._read_line(reader), READ_TIMEOUT)
            if line is None:
                writer.write(b"error request too long\n")
            else:
                writer.write(answer(line, self.forwards))
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass  # a silent or vanished client gets nothing; the next one is served
        finally:
            writer.close()

    @staticmethod
    async def _read_line(reader: asyncio.StreamReader) -> bytes | None:
        data = b""
        while b"\n" not in data:
            chunk = await reader.read(MAX_LINE)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_LINE:
                return None
        return data.split(b"\n", 1)[0]
