"""``exim-policy serve``: wire config, forwarding map, scanner, service and listeners
together and run until SIGTERM/SIGINT. SIGHUP re-reads the configuration file (see
:class:`Reloader`) and the forwarding map at once. Under systemd (``Type=notify``) the
daemon says when it is ready, reloading and stopping. With ``server.workers`` > 1 this runs
in each worker process (exim_policy/workers.py), under a supervisor."""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import dataclasses
import logging
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import config as config_file
from .config import Config, ConfigError, LoggingConfig, changed_keys, format_duration
from .forwarding.watch import MapWatcher
from .logs import LogWriter, handler_for, reconfigure_logging
from .metrics import Metrics
from .notify import Notifier
from .quarantine.receiver import QuarantineReceiver
from .quarantine.store import QuarantineError, QuarantineStore
from .scanner.rspamd import RspamdScanner
from .sdnotify import SystemdNotifier
from .pipeline import PolicyService
from .state import StoreError, open_store
from .state.tracker import AccountTracker
from .transport.helper import QueryServer
from .transport.limits import Limits
from .transport.http import HttpServer
from .transport.spamd import SpamdServer

if TYPE_CHECKING:
    from .workers import WorkerNotifier, WorkerRole

log = logging.getLogger("exim_policy")

#: glibc's mallopt() parameter M_MMAP_THRESHOLD
_M_MMAP_THRESHOLD = -3
#: blocks from this size up are mapped on their own and unmapped when freed
MMAP_THRESHOLD = 512 * 1024


def tune_process(config: Config) -> None:
    """Process settings the limits rely on.

    - Open files: every connection is a descriptor (plus one to Rspamd per scan), so the
      soft limit is raised to the hard one (systemd's default soft limit is 1024).
    - Memory: glibc raises its mmap threshold each time a large block is freed, up to
      32 MiB; after the first large message, bodies of later ones then come from the heap,
      where growing or freeing them can hold up to twice their size and is not given back.
      A fixed threshold keeps every large body in its own mapping, returned when freed.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = config.server.max_connections + config.server.max_scans + 64
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft < need:
        log.warning("open files limit %d is below server.max_connections + server.max_scans "
                    "+ 64 = %d: raise LimitNOFILE (systemd) or lower the limits", soft, need)
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc: its allocator has no such knob
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


async def run(config: Config, *, config_path: str | Path | None = None,
              log_output: LogWriter | None = None,
              worker: WorkerRole | None = None) -> None:
    """Serve until SIGTERM/SIGINT. ``config_path``: the file SIGHUP re-reads (None: SIGHUP
    only re-reads the forwarding map); ``log_output``: the log writer a reload switches
    to the new ``[logging]``; ``worker``: this process is that worker of several (its
    states go to the supervisor, not to systemd; the quarantine receiver runs in worker 1
    only; the metrics are counted with the other workers')."""
    systemd = SystemdNotifier() if worker is None else worker.notifier
    tune_process(config)
    watcher = MapWatcher(config.forwarding.map, config.forwarding.reload_interval)
    await asyncio.to_thread(watcher.load_now)
    scanner = RspamdScanner.for_config(config.rspamd)
    forwards = lambda address: watcher.current.forwards(address)  # noqa: E731 - always the current map
    accounts = await open_accounts(config, shared=worker is not None)
    service = PolicyService(config, scanner, forwards, accounts)
    limits = Limits(config.server.max_connections, config.server.max_bytes_in_flight)
    server = SpamdServer(config.server, service.answer, limits)
    http = HttpServer(config.server, service.answer, limits)
    queries = QueryServer(config.server.query_listen, config.server.allowed_clients, forwards,
                          config.server.unix_socket_mode,
                          accounts=accounts.status if accounts else None,
                          max_connections=config.server.max_connections)
    quarantine = await open_quarantine(config, accounts) \
        if worker is None or worker.first else None
    # None: [metrics] off, nothing is counted
    metrics = Metrics.for_config(config, worker.metrics_dir if worker is not None else None,
                                 primary=worker is None or worker.first)
    if metrics is not None:
        metrics.instrument(config, service=service, listeners=(server, http), limits=limits,
                           watcher=watcher, accounts=accounts, quarantine=quarantine)
    try:
        await server.start()
        await http.start()
        await queries.start()
        if quarantine is not None:
            await quarantine.start()
        scrapes = await metrics.serve(config) if metrics is not None else None
    except BaseException:
        await close_accounts(accounts)
        await close_quarantine(quarantine)
        raise

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks
    reloader = Reloader(config, config_path, Running(
        service=service, listeners=(server, http), queries=queries, watcher=watcher,
        accounts=accounts, quarantine=quarantine, log_output=log_output),
        systemd=systemd, metrics=metrics,
        log_writer=worker.log_writer if worker is not None else handler_for)

    def reload_now() -> None:
        task = loop.create_task(reloader.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_now)
    if worker is not None:
        worker.signals_handled()
    watch = loop.create_task(watcher.run())
    upkeep = loop.create_task(accounts.run()) if accounts else None
    purging = loop.create_task(_purge_hourly(quarantine)) if quarantine else None
    publishing = loop.create_task(metrics.publish_every()) \
        if metrics is not None and metrics.shared_dir is not None else None
    log.info("exim-policy %sserving on %s; HTTP on %s; queries on %s; Rspamd %s; forwarding "
             "map %s (%d entries); accounts %s; quarantine %s",
             f"worker {worker.index} of {worker.count} " if worker is not None else "",
             ", ".join(str(a) for a in config.server.listen),
             ", ".join(str(a) for a in config.server.http_listen) or "(off)",
             ", ".join(str(a) for a in config.server.query_listen) or "(off)",
             config.rspamd.url, config.forwarding.map, len(watcher.current),
             _accounts_summary(config, shared=worker is not None),
             _quarantine_summary(config) if worker is None or worker.first
             or not config.quarantine.listen else "receiver in worker 1")
    systemd.ready(f"serving on {', '.join(str(a) for a in config.server.listen)}")
    try:
        await stop.wait()
    finally:
        systemd.stopping()
        config = reloader.config  # the grace period in force
        log.info("stopping: no new connections; finishing the requests open, arriving or "
                 "being scanned (up to %gs)", config.server.shutdown_timeout)
        watch.cancel()
        for task in (upkeep, purging, publishing):
            if task is not None:
                task.cancel()
        await queries.stop()
        await asyncio.gather(server.stop(), http.stop())  # one grace period for both
        if scrapes is not None:
            await scrapes.stop(1.0)
        await close_quarantine(quarantine)
        await close_accounts(accounts)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("stopped")


async def open_accounts(config: Config, *, shared: bool = False) -> AccountTracker | None:
    """The account store and its tracker, or None with accounts off.

    SQLite: one process (not ``shared``) keeps the working state in memory in front of
    the file (state/cached.py), which sees only the counts it made itself; each of several
    workers (``shared``) reads and writes the file itself, so every worker counts every
    worker's messages (a message is recorded before its answer goes out).

    A store that cannot be opened at start: for sqlite that is a configuration error (a
    path that does not exist); Redis may just not be up yet, so the daemon starts and
    ``failure.accounts`` applies until it answers.
    """
    if not config.accounts.enabled:
        return None
    store = open_store(config.accounts, daemon=not shared)
    try:
        await store.refresh(time.time())  # loads what a cache holds; opens the file
        await store.prune(time.time())
    except StoreError as exc:
        if config.accounts.store == "sqlite":
            await store.close()
            raise ConfigError(f"accounts.path: {exc}") from None
        log.error("%s; serving with failure.accounts = %s until it answers", exc,
                  config.failure.accounts)
    notifier = Notifier(config.accounts.notify)
    return AccountTracker(config, store, notifier)


async def close_accounts(accounts: AccountTracker | None) -> None:
    if accounts is None:
        return
    await accounts.store.close()
    if isinstance(accounts.notify, Notifier):
        await asyncio.to_thread(accounts.notify.close)


async def open_quarantine(config: Config,
                          accounts: AccountTracker | None) -> QuarantineReceiver | None:
    """The quarantine receiver on ``[quarantine] listen`` (not yet listening), or None."""
    if not config.quarantine.listen:
        return None
    try:
        store = await asyncio.to_thread(QuarantineStore, config.quarantine.path)
    except QuarantineError as exc:
        # Scanning must go on (without the shim every message gets a 451). Exim keeps
        # what it would deliver into the quarantine queued, and delivers it once a
        # receiver answers: nothing is lost or relayed meanwhile.
        log.error("quarantine receiver off: %s; Exim keeps outbound spam queued until it "
                  "runs (quarantine.path)", exc)
        return None
    incident_of = None
    if accounts is not None:
        async def incident_of(account: str, at: float) -> int | None:
            """The account's incident open at ``at`` (the receiver links a message to it)."""
            try:
                detail = await accounts.store.detail(account, at)
            except StoreError:
                return None
            for incident in detail.incidents if detail else ():
                if incident.opened <= at and (incident.closed is None or incident.closed >= at):
                    return incident.id
            return None
    return QuarantineReceiver(config, store, incident_of)


async def close_quarantine(quarantine: QuarantineReceiver | None) -> None:
    if quarantine is None:
        return
    await quarantine.stop()
    quarantine.store.close()


async def _purge_hourly(quarantine: QuarantineReceiver) -> None:
    """quarantine.retention, applied by the daemon (``quarantine purge`` does it by hand)."""
    while True:
        retention = quarantine.config.quarantine.retention  # a reload may change it
        try:
            gone = await quarantine.thread.call(quarantine.store.purge, time.time() - retention)
        except Exception as exc:  # a disk or index problem: say so, try again next hour
            log.error("quarantine: purge failed: %s", exc)
        else:
            if gone:
                log.info("quarantine: purged %d entries older than %s", len(gone),
                         format_duration(retention))
        await asyncio.sleep(3600)


def _quarantine_summary(config: Config) -> str:
    quarantine = config.quarantine
    if not quarantine.listen:
        return "receiver off"
    return (f"receiver on {', '.join(str(a) for a in quarantine.listen)} "
            f"({quarantine.path}, release via {quarantine.release_via})")


def _accounts_summary(config: Config, *, shared: bool = False) -> str:
    accounts = config.accounts
    if not accounts.enabled:
        return "off"
    where = accounts.path if accounts.store == "sqlite" else (
        accounts.redis_url if accounts.store == "redis" else "memory")
    if shared and accounts.store == "sqlite":
        where += ", uncached: shared by the workers"
    return f"{accounts.mode} ({accounts.store}: {where})"


# ------------------------------------------------------------------------------- reload --
#: what a running daemon keeps until it is restarted: its sockets, what it sized or opened
#: at start (connection and scan limits, the account store, the quarantine store, the
#: metrics listener), and what lives in them (an account store counts for the limits and
#: the incident window it was opened with; the notifier's queue for its channels)
RESTART_KEYS = (
    "server.listen", "server.http_listen", "server.query_listen", "server.unix_socket_mode",
    "server.event_loop", "server.workers", "server.max_connections",
    "server.max_bytes_in_flight", "server.max_scans",
    "accounts.enabled", "accounts.store", "accounts.path", "accounts.redis_url",
    "accounts.redis_prefix", "accounts.limits", "accounts.incident", "accounts.history",
    "accounts.notify",
    "quarantine.listen", "quarantine.path",
    "metrics",
)


def needs_restart(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESTART_KEYS)


def in_force(old: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """What a reload from ``old`` to ``new`` puts in force: ``new``, with the old value of
    every changed key that needs a restart; and the changed keys applied and kept."""
    changed = changed_keys(old, new)
    kept = [key for key in changed if needs_restart(key)]
    for key in kept:
        new = _with_value(new, key.split("."), _value(old, key.split(".")))
    return new, [key for key in changed if key not in kept], kept


def _value(table: object, path: list[str]) -> object:
    for name in path:
        table = getattr(table, name)
    return table


def _with_value(table, path: list[str], value: object):
    if len(path) == 1:
        return dataclasses.replace(table, **{path[0]: value})
    inner = _with_value(getattr(table, path[0]), path[1:], value)
    return dataclasses.replace(table, **{path[0]: inner})


@dataclass
class Running:
    """The parts of a serving daemon a reload reconfigures."""

    service: PolicyService
    listeners: tuple
    queries: QueryServer
    watcher: MapWatcher
    accounts: AccountTracker | None
    quarantine: QuarantineReceiver | None
    log_output: LogWriter | None


class Reloader:
    """SIGHUP: re-read the configuration file and put it in force, or keep the old one.

    The new file is read and validated off the event loop, as ``check-config`` does it; on
    any error the configuration in force stays, and the log names every error. A valid
    one is applied by swapping references: each connection keeps the settings it started
    with, new connections and messages get the new ones, nothing is dropped. Changed keys
    that need a restart (:data:`RESTART_KEYS`) keep their old value, and the log names
    them. The forwarding map is re-read either way. Reloads run one at a time.
    """

    def __init__(self, config: Config, path: str | Path | None, running: Running, *,
                 systemd: SystemdNotifier | WorkerNotifier, metrics: Metrics | None,
                 log_writer: Callable[[LoggingConfig], logging.Handler] = handler_for) -> None:
        """``log_writer``: makes the writer for a new ``[logging]``."""
        self.config = config
        self.path = path
        self.running = running
        self.systemd = systemd
        self.metrics = metrics
        self.log_writer = log_writer
        self._lock = asyncio.Lock()

    async def reload(self) -> bool:
        """One SIGHUP; True when a configuration was read and put in force."""
        async with self._lock:
            self.systemd.reloading()
            try:
                applied = await self._reload_config() if self.path is not None else False
                await self.running.watcher.reload_if_changed()
            finally:
                self.systemd.ready("serving (reloaded)" if applied else "serving")
            return applied

    async def _reload_config(self) -> bool:
        try:
            new = await asyncio.to_thread(config_file.load, self.path)
            config, applied, kept = in_force(self.config, new)
            writer = self.log_writer(config.logging) \
                if config.logging != self.config.logging else None
        except ConfigError as exc:
            log.error("reload: %s has %d error(s); the configuration in force is kept: %s",
                      self.path, len(exc.errors), "; ".join(exc.errors))
            self._count(False)
            return False
        if writer is not None and self.running.log_output is not None:
            await asyncio.to_thread(reconfigure_logging, self.running.log_output,
                                    config.logging, writer)
        self._apply(config)
        self._count(True)
        if kept:
            log.warning("reload: changed, but kept as they are until a restart: %s",
                        ", ".join(kept))
        log.info("reload: %s in force; changed: %s", self.path,
                 ", ".join(applied) or "nothing")
        return True

    def _apply(self, new: Config) -> None:
        old, parts = self.config, self.running
        service = parts.service
        service.config = new
        if new.rspamd != old.rspamd:
            service.scanner = RspamdScanner.for_config(new.rspamd)
        for listener in parts.listeners:
            listener.config = new.server
        parts.queries.allowed_clients = new.server.allowed_clients
        parts.watcher.path = new.forwarding.map
        parts.watcher.interval = new.forwarding.reload_interval
        if parts.accounts is not None:
            parts.accounts.config = new
        if parts.quarantine is not None:
            parts.quarantine.config = new
        self.config = new

    def _count(self, ok: bool) -> None:
        if self.metrics is not None:
            self.metrics.config_reloaded(ok)
