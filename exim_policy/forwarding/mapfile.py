"""The built forwarding map as the daemon reads it, and a watcher that swaps in new versions.

Format (Rspamd multimap, what ``exim-policy forwardings build`` writes): one address per
line, ``#`` starts a comment (also inline), blank lines ignored, only the first token of a
line counts, case-insensitive. A line ``@domain`` matches every address of that domain.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)


def normalize_address(address: str) -> str:
    """``<Fwd@Example.COM>`` -> ``fwd@example.com``."""
    return address.strip().strip("<>").strip().lower()


@dataclass(frozen=True)
class ForwardingMap:
    addresses: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()

    def forwards(self, address: str) -> bool:
        addr = normalize_address(address)
        if addr in self.addresses:
            return True
        _, at, domain = addr.rpartition("@")
        return bool(at) and domain in self.domains

    def __len__(self) -> int:
        return len(self.addresses) + len(self.domains)

    @classmethod
    def parse(cls, text: str) -> "ForwardingMap":
        addresses, domains = set(), set()
        for line in text.splitlines():
            token = line.split("#", 1)[0].strip().split(None, 1)
            if not token:
                continue
            entry = normalize_address(token[0])
            if entry.startswith("@"):
                domains.add(entry[1:])
            elif entry:
                addresses.add(entry)
        return cls(frozenset(addresses), frozenset(domains))

    @classmethod
    def load(cls, path: str) -> "ForwardingMap":
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            return cls.parse(fh.read())


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

    def __init__(self, path: str, interval: float) -> None:
        self.path = path
        self.interval = interval
        self.current = ForwardingMap()
        self._signature: tuple | None = None

    def load_now(self) -> None:
        """Blocking first load, for start-up (before the event loop serves anything)."""
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
            return
        try:
            new = ForwardingMap.load(self.path)
        except OSError as exc:
            log.error("forwarding map %s unreadable (%s); keeping %d entries", self.path,
                      exc.strerror, len(self.current))
            return
        self.current = new  # one reference swap: readers see the old or the new map
        self._signature = signature
        log.info("forwarding map %s loaded: %d addresses, %d domains", self.path,
                 len(new.addresses), len(new.domains))
