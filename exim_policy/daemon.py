"""``exim-policy serve``: wire config, forwarding map, scanner, service and listeners
together and run until SIGTERM/SIGINT. SIGHUP re-reads the forwarding map at once."""
from __future__ import annotations

import asyncio
import logging
import signal

from .config import Config
from .forwarding.watch import MapWatcher
from .query import QueryServer
from .scanner.rspamd import RspamdScanner
from .server import SpamdServer
from .service import PolicyService

log = logging.getLogger("exim_policy")


async def run(config: Config) -> None:
    watcher = MapWatcher(config.forwarding.map, config.forwarding.reload_interval)
    await asyncio.to_thread(watcher.load_now)
    scanner = RspamdScanner(config.rspamd.url, config.rspamd.timeout)
    forwards = lambda address: watcher.current.forwards(address)  # noqa: E731 - always the current map
    service = PolicyService(config, scanner, forwards)
    server = SpamdServer(config.server, service.handle)
    queries = QueryServer(config.server.query_listen, config.server.allowed_clients, forwards,
                          config.server.unix_socket_mode)
    await server.start()
    await queries.start()

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
    log.info("exim-policy serving on %s; queries on %s; Rspamd %s; forwarding map %s "
             "(%d entries)", ", ".join(str(a) for a in config.server.listen),
             ", ".join(str(a) for a in config.server.query_listen) or "(off)",
             config.rspamd.url, config.forwarding.map, len(watcher.current))
    try:
        await stop.wait()
    finally:
        log.info("stopping: no new connections, finishing requests in flight")
        watch.cancel()
        await queries.stop()
        await server.stop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("stopped")
