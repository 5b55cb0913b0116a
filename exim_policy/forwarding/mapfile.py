"""The built forwarding map as the daemon reads it, and a watcher that swaps in new versions.

Format (Rspamd multimap, what ``exim-policy forwardings build`` writes): one address per
line, ``#`` starts a comment (also inline), blank lines ignored, only the first token of a
line counts, case-insensitive. A line ``@domain`` matches every address of that domain.

This module stays import-light: ``exim-policy query`` (run by Exim per recipient) uses it.
The daemon's hot reload lives in :mod:`.watch`.
"""
from __future__ import annotations

from dataclasses import dataclass


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
