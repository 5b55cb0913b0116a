"""Hot reload of the forwarding map inside the daemon: poll, load off the loop, swap."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

from .mapfile import ForwardingMap

if TYPE_CHECKING:
    from ..metrics import Metrics

log = logging.getLogger(__name__)


def _signature(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class MapWatcher:
    """Holds the current map; ``run()`` polls the file and swaps in a new version.

    The builder replaces the file by rename, so a changed inode/size/mtime means a complete
    new file. A missing or unreadable file keeps the map already loaded (and logs), so a
    bad deploy never empties the forwarding set under a running daemon.
    """

    #: counts failed reloads (None: metrics off); set by Metrics.instrument
    metrics: Metrics | None = None

    def __init__(self, path: str, interval: float) -> None:
        self.path = path
        self.interval = interval
        self.current = ForwardingMap()
        #: when the current map was read (time.time()); None: none read yet
        self.loaded_at: float | None = None
        self._signature: tuple | None = None

    def load_now(self) -> None:
        """Blocking first load, for start-up (before the event loop serves anything). A
        missing map is said at once: forwarding protection is off until it appears."""
        if _signature(self.path) is None:
            log.warning("forwarding map %s does not exist: no recipient counts as forwarding "
                        "until it appears (exim-policy forwardings build writes it)", self.path)
        self._reload_if_changed_sync()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.reload_if_changed()

    async def reload_if_changed(self) -> None:
        # reading a large map takes a while: never on the event loop
        await asyncio.to_thread(self._reload_if_changed_sync)

    def _reload_if_changed_sync(self) -> None:
        signature = _signature(self.path)
        if signature == self._signature:
            return
        if signature is None:
            log.warning("forwarding map %s is missing; keeping %d entries", self.path,
                        len(self.current))
            self._signature = None
            self._failed("missing")
            return
        try:
            new = ForwardingMap.load(self.path)
        except OSError as exc:
            log.error("forwarding map %s unreadable (%s); keeping %d entries", self.path,
                      exc.strerror, len(self.current))
            self._failed("unreadable")
            return
        self.current = new  # one reference swap: readers see the old or the new map
        self.loaded_at = time.time()
        self._signature = signature
        if not len(new):
            log.warning("forwarding map %s is empty: no recipient counts as forwarding",
                        self.path)
            return
        log.info("forwarding map %s loaded: %d addresses, %d domains", self.path,
                 len(new.addresses), len(new.domains))

    def _failed(self, reason: str) -> None:
        # called on the loading thread: prometheus_client's counters are thread-safe
        if self.metrics is not None:
            self.metrics.map_reload_failed(reason)
