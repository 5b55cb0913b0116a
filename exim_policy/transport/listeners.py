"""Binding listen addresses and filtering clients, shared by every listener; and
:class:`StreamServer`, what the spamd and HTTP listeners share besides: the per-daemon
limits, the tallies of refused connections, and a graceful stop.

A :class:`StreamServer` subclass names its addresses and its connection class, a
:class:`Connection`: that asks :meth:`StreamServer.admit` from ``connection_made`` and
calls :meth:`StreamServer.closed` from ``connection_lost``. ``stop()`` stops accepting and lets
every open connection finish: requests still arriving are read, scanned and answered
within the grace period.

With ``server.workers`` > 1 every worker process binds the same addresses
(:func:`share_listeners`): a TCP address with ``SO_REUSEPORT`` in each worker (the kernel
spreads new connections over their sockets), a unix socket once, by the supervisor
(:func:`bind_unix`), served by every worker from the descriptor it inherited.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from collections.abc import Awaitable, Callable

from ..config import ListenAddress, ServerConfig
from ..networks import network_of
from ..tally import Tally
from .limits import BudgetWait, Limits

if TYPE_CHECKING:
    from ..metrics import Metrics

log = logging.getLogger(__name__)


def client_allowed(peername: object, allowed: tuple) -> bool:
    """Unix-socket peers are allowed (file permissions guard them); TCP peers by network."""
    if not isinstance(peername, tuple):
        return True
    return network_of(peername[0], allowed) is not None


#: connections the kernel queues per listening socket until they are accepted
BACKLOG = 1024
#: protocol error lines with their details per 10 s, per listener (then a count)
PROTOCOL_ERROR_BURST = 10


class _Sharing:
    """How this process binds: alone (the default), or as one worker of several."""

    reuse_port = False
    #: unix socket path -> the listening socket the supervisor bound
    unix: Mapping[str, socket.socket] = {}


_sharing = _Sharing()


def share_listeners(*, unix: Mapping[str, socket.socket]) -> None:
    """Make this process one worker of several (once, before its event loop starts): every
    TCP address binds with ``SO_REUSEPORT``, so the workers' sockets of one address form a
    group the kernel spreads new connections over; a unix address in ``unix`` serves that
    socket (bound by the supervisor, inherited), any other binds as usual."""
    _sharing.reuse_port = True
    _sharing.unix = dict(unix)


def bind_unix(path: str, mode: int) -> socket.socket:
    """A listening unix socket at ``path`` with ``mode`` (a socket left over from a
    previous run is replaced; one a live process listens on is an error)."""
    if os.path.exists(path) and _is_stale_socket(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def check_tcp_free(address: ListenAddress) -> None:
    """Raise OSError (EADDRINUSE) when another process listens on ``address``: workers
    bind with ``SO_REUSEPORT``, which would let them join another daemon's group on the
    same port rather than fail. A plain bind fails whenever any socket holds the port."""
    family = socket.AF_INET6 if address.host is not None and ":" in address.host \
        else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listeners do
        if family == socket.AF_INET6:  # as asyncio binds an IPv6 address
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))


async def start_listeners(addresses: tuple[ListenAddress, ...],
                          protocol_factory: Callable[[], asyncio.Protocol],
                          unix_mode: int = 0o666) -> list[asyncio.AbstractServer]:
    """Bind every address; a unix socket left over from a previous run is replaced.

    Protocol objects rather than streams: per connection that saves the stream objects and
    a task, which is most of the shim's CPU per message.
    """
    loop = asyncio.get_running_loop()
    servers = []
    try:
        for address in addresses:
            if address.is_unix:
                shared = _sharing.unix.get(address.path)  # type: ignore[arg-type]
                if shared is not None:
                    servers.append(await loop.create_unix_server(
                        protocol_factory, sock=shared, backlog=BACKLOG))
                    continue
                # at start only: a stat and a connect attempt on a local path
                if os.path.exists(address.path) and _is_stale_socket(  # noqa: ASYNC240
                        address.path):
                    os.unlink(address.path)
                servers.append(await loop.create_unix_server(protocol_factory, address.path))
                os.chmod(address.path, unix_mode)
            elif _sharing.reuse_port:
                servers.append(await loop.create_server(
                    protocol_factory, address.host, address.port, reuse_address=True,
                    reuse_port=True, backlog=BACKLOG))
            else:
                servers.append(await loop.create_server(
                    protocol_factory, address.host, address.port, reuse_address=True,
                    backlog=BACKLOG))
    except OSError:
        for server in servers:
            server.close()
        raise
    return servers


def _is_stale_socket(path: str) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        return True
    finally:
        sock.close()
    return False


class StreamServer:
    #: the listener's name in the metrics (``listener`` label)
    name = "stream"
    #: counts refusals, protocol errors, waits (None: metrics off); set by
    #: :meth:`Metrics.instrument <exim_policy.metrics.Metrics.instrument>`
    metrics: Metrics | None = None
    #: the key that names ``config.allowed_clients`` (in the log line of a refusal)
    allowed_key = "server.allowed_clients"

    def __init__(self, config: ServerConfig, handler: Callable[[Any], Awaitable[Any]],
                 limits: Limits | None = None) -> None:
        self.config = config
        self.handler = handler
        self.limits = limits or Limits(config.max_connections, config.max_bytes_in_flight)
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: set[asyncio.Protocol] = set()
        self._tasks: set[asyncio.Task] = set()
        self._drained: asyncio.Event | None = None
        #: stop() has begun: connections end after their current reply
        self.closing = False
        self.refused = Tally(log, logging.WARNING)
        self.shed = Tally(log, logging.WARNING)
        self.not_allowed = Tally(log, logging.WARNING)
        self.budget_timeouts = Tally(log, logging.ERROR)
        self.slow_bodies = Tally(log, logging.WARNING)
        #: a few lines with their details, then a count: random bytes at full speed made
        #: 2,000 lines in 4 s when each connection's error had its own line
        self.protocol_errors = Tally(log, logging.WARNING, burst=PROTOCOL_ERROR_BURST)

    # what a subclass provides
    addresses: tuple[ListenAddress, ...] = ()

    def connection(self) -> asyncio.Protocol:
        raise NotImplementedError

    @property
    def connections(self) -> frozenset[asyncio.Protocol]:
        """The open connections, as they are now."""
        return frozenset(self._connections)

    @property
    def sockets(self) -> list[socket.socket]:
        return [s for server in self._servers for s in server.sockets]

    async def start(self) -> None:
        self._servers = await start_listeners(self.addresses, self.connection,
                                              self.config.unix_socket_mode)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let every open connection finish (up to ``grace`` s, default
        ``server.shutdown_timeout``): requests still arriving are read and answered too."""
        grace = self.config.shutdown_timeout if grace is None else grace
        self.closing = True
        for server in self._servers:
            server.close()
        self.stopping()
        if self._connections:
            self._drained = asyncio.Event()
            try:
                await asyncio.wait_for(self._drained.wait(), grace)
            except asyncio.TimeoutError:
                log.warning("%d connection(s) still open after %gs (server.shutdown_timeout);"
                            " closing them", len(self._connections), grace)
        for conn in list(self._connections):
            conn.transport.abort()  # type: ignore[attr-defined]
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()

    def stopping(self) -> None:
        """Called once the listeners are closed (a keep-alive server ends idle connections)."""

    def spawn(self, coro: Awaitable[None]) -> None:
        """Run a connection's handler as a task that ``stop()`` waits for or cancels."""
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def admit(self, conn: asyncio.Protocol, transport: asyncio.BaseTransport,
              peer: object) -> bool:
        """Take a new connection in, or abort it: a client outside ``allowed_clients``
        (before a byte is read), or no room in the shared connection table."""
        now = asyncio.get_running_loop().time()
        if not client_allowed(peer, self.config.allowed_clients):
            self.not_allowed.hit(now, "refused connection from %s (not in %s)",
                                 peer[0], self.allowed_key)  # type: ignore[index]
            if self.metrics is not None:
                self.metrics.refused(self.name, "allowed_clients")
            transport.abort()
            return False
        if not self.limits.connections.admit(conn):  # type: ignore[arg-type]
            if self.metrics is not None:
                self.metrics.refused(self.name, "max_connections")
            self.refused.hit(now, "refused a connection: %d open, every one past reading "
                             "(server.max_connections = %d)", len(self.limits.connections),
                             self.config.max_connections)
            transport.abort()
            return False
        self._connections.add(conn)
        return True

    def closed(self, conn: asyncio.Protocol) -> None:
        self._connections.discard(conn)
        self.limits.connections.forget(conn)  # type: ignore[arg-type]
        if self._drained is not None and not self._connections:
            self._drained.set()


class Connection(asyncio.Protocol):
    """What a connection of either listener shares: its admission, its one timer, the
    bytes of the shared body budget it holds (and its place in the queue for more), what
    being shed or waiting too long for the budget logs and counts, and the bookkeeping
    when it closes. A subclass reads requests; it drops its parser before calling
    :meth:`connection_lost` here."""

    #: in the log lines: what it is, what it reads, and its answer when the budget is full
    kind = "connection"
    request_name = "a request"
    budget_answer = "with a temporary failure"

    def __init__(self, server: StreamServer) -> None:
        self.server = server
        self.config = server.config
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport
        self.peer: object = None
        self.reserved = 0  # bytes of the shared budget this connection holds
        self.budget_wait: BudgetWait | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0

    def admitted(self, transport: asyncio.BaseTransport) -> bool:
        """``connection_made``'s first step: False when the connection was refused (and
        aborted)."""
        self.transport = transport  # type: ignore[assignment]
        self.peer = transport.get_extra_info("peername")
        return self.server.admit(self, transport, self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_timer()
        if self.budget_wait is not None:
            self.budget_wait.cancel()
            self.budget_wait = None
            self.server.limits.budget.grant()  # the waiters behind us may fit now
        self.give_back()
        self.server.closed(self)

    def give_back(self) -> None:
        if self.reserved:
            self.server.limits.budget.give_back(self.reserved)
            self.reserved = 0

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def shed_now(self, sending: bool) -> None:
        """Close at once for the connection table; ``sending``: a request was under way
        (an idle keep-alive connection goes without a log line)."""
        if self.server.metrics is not None:
            self.server.metrics.shed(self.server.name)
        if sending:
            self.server.shed.hit(self.loop.time(), f"closed the {self.kind} from %s that had "
                                 "been sending its request longest, to make room (server."
                                 "max_connections = %d)", self.peer, self.config.max_connections)
        self.cancel_timer()
        self.transport.abort()

    def wait_for_budget(self, amount: int, granted: Callable[[], None]) -> None:
        """No room for ``amount`` body bytes now: reading pauses, ``granted()`` once they
        are reserved, :meth:`budget_expired` after ``queue_timeout``."""
        self.budget_wait = self.server.limits.budget.wait(amount, granted)
        if self.server.metrics is not None:
            self.server.metrics.limit_wait("max_bytes_in_flight")
        self.transport.pause_reading()
        self.cancel_timer()
        self.timer = self.loop.call_later(self.config.queue_timeout, self._budget_timer)

    def _budget_timer(self) -> None:
        self.timer = None
        if self.budget_wait is None:
            return
        self.budget_wait.cancel()
        self.budget_wait = None
        budget = self.server.limits.budget
        budget.grant()
        self.server.budget_timeouts.hit(
            self.loop.time(), f"no room for {self.request_name}'s body within %gs: %d of %d "
            f"bytes held (server.max_bytes_in_flight); answered {self.budget_answer}",
            self.config.queue_timeout, budget.used, budget.capacity)
        if self.server.metrics is not None:
            self.server.metrics.limit_timeout("max_bytes_in_flight")
        self.budget_expired()

    def budget_expired(self) -> None:
        """No room came within ``queue_timeout`` (logged and counted): answer and close."""
        raise NotImplementedError
