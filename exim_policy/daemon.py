"""``exim-policy serve``: wire config, forwarding map, scanner, service and listeners
together and run until SIGTERM/SIGINT. SIGHUP re-reads the forwarding map at once."""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import resource
import signal
import time

from .config import Config, ConfigError, format_duration
from .forwarding.watch import MapWatcher
from .notify import Notifier
from .quarantine.receiver import QuarantineReceiver
from .quarantine.store import QuarantineError, QuarantineStore
from .scanner.rspamd import RspamdScanner
from .service import PolicyService
from .state import StoreError, open_store
from .state.tracker import AccountTracker
from .transport.helper import QueryServer
from .transport.limits import Limits
from .transport.http import HttpServer
from .transport.spamd import SpamdServer

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


async def run(config: Config) -> None:
    tune_process(config)
    watcher = MapWatcher(config.forwarding.map, config.forwarding.reload_interval)
    await asyncio.to_thread(watcher.load_now)
    scanner = RspamdScanner(config.rspamd.url, config.rspamd.timeout)
    forwards = lambda address: watcher.current.forwards(address)  # noqa: E731 - always the current map
    accounts = await open_accounts(config)
    service = PolicyService(config, scanner, forwards, accounts)
    limits = Limits(config.server.max_connections, config.server.max_bytes_in_flight)
    server = SpamdServer(config.server, service.handle, limits)
    http = HttpServer(config.server, service.handle_http, limits)
    queries = QueryServer(config.server.query_listen, config.server.allowed_clients, forwards,
                          config.server.unix_socket_mode,
                          accounts=accounts.status if accounts else None)
    quarantine = await open_quarantine(config, accounts)
    try:
        await server.start()
        await http.start()
        await queries.start()
        if quarantine is not None:
            await quarantine.start()
    except BaseException:
        await close_accounts(accounts)
        await close_quarantine(quarantine)
        raise

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

    def reload_now() -> None:
        task = loop.create_task(watcher.reload_if_changed())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_now)
    watch = loop.create_task(watcher.run())
    upkeep = loop.create_task(accounts.run()) if accounts else None
    purging = loop.create_task(_purge_hourly(quarantine)) if quarantine else None
    log.info("exim-policy serving on %s; HTTP on %s; queries on %s; Rspamd %s; forwarding "
             "map %s (%d entries); accounts %s; quarantine %s",
             ", ".join(str(a) for a in config.server.listen),
             ", ".join(str(a) for a in config.server.http_listen) or "(off)",
             ", ".join(str(a) for a in config.server.query_listen) or "(off)",
             config.rspamd.url, config.forwarding.map, len(watcher.current),
             _accounts_summary(config), _quarantine_summary(config))
    try:
        await stop.wait()
    finally:
        log.info("stopping: no new connections; finishing the requests open, arriving or "
                 "being scanned (up to %gs)", config.server.shutdown_timeout)
        watch.cancel()
        for task in (upkeep, purging):
            if task is not None:
                task.cancel()
        await queries.stop()
        await asyncio.gather(server.stop(), http.stop())  # one grace period for both
        await close_quarantine(quarantine)
        await close_accounts(accounts)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("stopped")


async def open_accounts(config: Config) -> AccountTracker | None:
    """The account store and its tracker, or None with accounts off.

    A store that cannot be opened at start: for sqlite that is a configuration error (a
    path that does not exist); Redis may just not be up yet, so the daemon starts and
    ``failure.accounts`` applies until it answers.
    """
    if not config.accounts.enabled:
        return None
    store = open_store(config.accounts, daemon=True)
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
    retention = quarantine.config.quarantine.retention
    while True:
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


def _accounts_summary(config: Config) -> str:
    accounts = config.accounts
    if not accounts.enabled:
        return "off"
    where = accounts.path if accounts.store == "sqlite" else (
        accounts.redis_url if accounts.store == "redis" else "memory")
    return f"{accounts.mode} ({accounts.store}: {where})"
