"""The built forwarding map as the daemon reads it, and a watcher that swaps in new versions.

Format (Rspamd multimap, what ``exim-policy forwardings build`` writes): one address per
line, ``#`` starts a comment (also inline), blank lines ignored, only the first token of a
line counts, case-insensitive. A line ``@domain`` matches every address of that domain.

This module stays import-light: ``exim-policy query`` (run by Exim per recipient) uses it.
The daemon's hot reload lives in :mod:`.watch`.
"""
from __future__ import annotations

from dataclasses import dataclass


#: ASCII letters only: addresses are compared as the bytes Exim sent (8-bit SMTPUTF8 parts
#: as UTF-8 bytes decoded latin-1), and lower-casing those as latin-1 letters would corrupt them
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def normalize_address(address: str) -> str:
    """``<Fwd@Example.COM>`` -> ``fwd@example.com`` (ASCII case folded, 8-bit kept as is)."""
    return address.strip().strip("<>").strip().translate(_ASCII_LOWER)


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
        # latin-1: one character per byte, like the recipients the protocol codecs decode
        with open(path, encoding="latin-1") as fh:
            return cls.parse(fh.read())
