"""The policy helper for Exim expansions: a one-line request, a one-line answer, close.

Made for ``${readsocket}`` (Exim sends the request, half-closes by default, reads to EOF)::

    ${readsocket{inet:127.0.0.1:11336}{forwarding $local_part@$domain\\n}{3s}{}{error}}
    ${readsocket{inet:127.0.0.1:11336}{account $authenticated_id\\n}{3s}{}{ok}}

Requests (case-insensitive verb, one per connection; the line ends at a newline or EOF):
    ``forwarding ADDR``  -> ``yes`` / ``no``: ADDR forwards to an external mailbox
    ``account USER``     -> ``ok`` / ``throttled`` / ``held`` / ``locked`` (accounts off
                            or in shadow mode: always ``ok``)
    ``ping``             -> ``pong``
Anything else gets ``error <why>``. Answers carry no trailing newline: Exim 4.96's
``${readsocket}`` returns the bytes as they are (an empty fourth argument does not strip
a newline), so ``${if eq{${readsocket{...}}}{yes}}`` works as written.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ..model import AccountStatus
from ..state.names import user_account
from ..tally import Tally
from .limits import ConnectionTable
from .listeners import client_allowed, start_listeners

log = logging.getLogger(__name__)

MAX_LINE = 1024
READ_TIMEOUT = 5.0

#: the account verb's source of answers (the daemon's AccountTracker.status)
AccountStatusOf = Callable[[str], Awaitable[AccountStatus]]


def parse(line: bytes) -> tuple[str, str]:
    """(verb, argument) of a request line; the verb lower-cased."""
    text = line.decode("latin-1").strip()
    verb, _, arg = text.partition(" ")
    return verb.lower(), arg.strip()


def answer(line: bytes, forwards: Callable[[str], bool]) -> bytes:
    """The reply for a request line that needs no account store (pure)."""
    verb, arg = parse(line)
    if verb == "forwarding":
        if not arg or " " in arg or "@" not in arg:
            return b"error usage: forwarding LOCALPART@DOMAIN"
        return b"yes" if forwards(arg) else b"no"
    if verb == "account":
        return b"ok" if arg else b"error usage: account USER"
    if verb == "ping" and not arg:
        return b"pong"
    return b"error unknown request"


class QueryServer:
    def __init__(self, addresses, allowed_clients, forwards: Callable[[str], bool],
                 unix_mode: int = 0o666, accounts: AccountStatusOf | None = None,
                 max_connections: int = 1024) -> None:
        """``accounts``: answers ``account USER`` from the store (None: accounts off, the
        answer is always ``ok``). ``max_connections``: open connections (a table of this
        listener's own, so a flood here never sheds a scan's connection); when full, the
        one that has waited longest for its request line is closed to make room."""
        self.addresses = addresses
        self.unix_mode = unix_mode
        self.allowed_clients = allowed_clients
        self.forwards = forwards
        self.accounts = accounts
        self.connections = ConnectionTable(max_connections)
        self.shed = Tally(log, logging.WARNING)
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task] = set()

    @property
    def sockets(self):
        return [s for server in self._servers for s in server.sockets]

    async def start(self) -> None:
        self._servers = await start_listeners(self.addresses, lambda: _QueryConnection(self),
                                              self.unix_mode)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=READ_TIMEOUT)
        for server in self._servers:
            await server.wait_closed()

    async def account_answer(self, user: str) -> bytes:
        assert self.accounts is not None
        try:
            status = await self.accounts(user_account(user))
        except Exception:  # a bug; Exim's fail string (ok) applies, the log says why
            log.exception("account query for %r failed", user[:200])
            return b"error internal"
        return status.value.encode("ascii")


class _QueryConnection(asyncio.Protocol):
    """Callbacks only, no task, for answers that need no store: a query is answered inside
    data_received/eof_received. ``account USER`` (with a store) is answered by a task."""

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
        # refused only when every open connection has its answer under way (an account
        # lookup in the store): there is none to shed
        if not self.server.connections.admit(self):
            transport.abort()
            return
        # a silent client gets nothing and is dropped; the next one is served
        self.timer = asyncio.get_running_loop().call_later(READ_TIMEOUT, transport.close)

    def shed(self) -> None:
        """The table is full and this connection has waited longest for its line."""
        self.server.shed.hit(asyncio.get_running_loop().time(), "query: closed the connection "
                             "that had waited longest for its request, to make room "
                             "(server.max_connections = %d)", self.server.connections.limit)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.timer is None:
            return  # answered already; ignore the rest
        self.buffer += data
        if b"\n" in self.buffer:
            line = self.buffer.split(b"\n", 1)[0]
            # too long however it was segmented (not only when a segment had no newline)
            self._reply(line if len(line) <= MAX_LINE else None)
        elif len(self.buffer) > MAX_LINE:
            self._reply(None)

    def eof_received(self) -> bool:
        if self.timer is not None:
            self._reply(self.buffer if len(self.buffer) <= MAX_LINE else None)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.forget(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _reply(self, line: bytes | None) -> None:
        self.timer.cancel()
        self.timer = None
        self.server.connections.read_done(self)
        if line is None:
            self._send(b"error request too long")
            return
        verb, user = parse(line)
        if verb == "account" and user and self.server.accounts is not None:
            task = asyncio.get_running_loop().create_task(self.server.account_answer(user))
            self.server._tasks.add(task)
            task.add_done_callback(self._answered)
            return
        self._send(answer(line, self.server.forwards))

    def _answered(self, task: asyncio.Task) -> None:
        self.server._tasks.discard(task)
        if not task.cancelled():
            self._send(task.result())

    def _send(self, reply: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(reply)
            self.transport.close()
