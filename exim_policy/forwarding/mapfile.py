"""The forwarding map's file format, both ways: render and write it (the builder), read it
(the daemon's :class:`ForwardingMap`, ``exim-policy query``'s :func:`has_entry` scan).

Format (Rspamd multimap ``type = "rcpt"``)::

    # exim-policy forwarding map: 3 entries, built 2024-05-01T12:00:00Z
    # written by `exim-policy forwardings build`; do not edit
    @old.example
    a@example.com
    b@example.net

Written: ``#`` header lines, then one lower-cased address or ``@domain`` per line, sorted
(the optional lsearch output: ``address: yes`` and ``*@domain: yes``, for ``lsearch*@`` in
ACLs).  Read as Rspamd reads it: ``#`` starts a comment (also inline), only a line's first
token counts, case-insensitive; ``@domain`` matches every address of that domain.  Written
atomically (temporary file, fsync, rename: Rspamd re-reads a map as soon as its mtime
changes), keeping an existing file's mode (and owner, when we may); a new one is 0644.
Import-light: ``exim-policy query`` (run by Exim per recipient) uses it.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import datetime, timezone

HEADER = "# exim-policy forwarding map: {n} entries, built {when}\n" \
         "# written by `exim-policy forwardings build`; do not edit\n"

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

    def entries(self) -> list[str]:
        """The sorted entries, ``@domain`` lines included (as the builder writes them)."""
        return sorted([*self.addresses, *(f"@{d}" for d in self.domains)])

    @classmethod
    def parse(cls, text: str) -> ForwardingMap:
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
    def load(cls, path: str) -> ForwardingMap:
        # latin-1: one character per byte, like the recipients the protocol codecs decode
        with open(path, encoding="latin-1") as fh:
            return cls.parse(fh.read())


def has_entry(path: str, address: str) -> bool:
    """Whether the map file matches ``address`` as :meth:`ForwardingMap.forwards` does, in
    one regex pass over the file, without building the set (a ~100k-line map answers in a
    few ms)."""
    import re

    addr = normalize_address(address)
    domain = addr.rpartition("@")[2]
    entry = re.compile(rf"^[ \t]*<?(?:{re.escape(addr)}|@{re.escape(domain)})>?(?:[ \t#]|$)",
                       re.MULTILINE)
    with open(path, encoding="latin-1") as fh:  # as ForwardingMap.load reads it
        return entry.search(fh.read().translate(_ASCII_LOWER)) is not None


# ------------------------------------------------------------------- writing --
def map_body(entries: list[str]) -> str:
    return "\n".join(entries) + "\n" if entries else ""


def lsearch_body(entries: list[str]) -> str:
    return "".join(f"*{e}: yes\n" if e.startswith("@") else f"{e}: yes\n" for e in entries)


def render(body: str, count: int, now: datetime | None = None) -> str:
    """Header + ``body`` (from :func:`map_body` or :func:`lsearch_body`)."""
    when = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return HEADER.format(n=count, when=when.strftime("%Y-%m-%dT%H:%M:%SZ")) + body


def _text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def is_current(path: str, body: str) -> bool:
    """True when the file exists and, its leading ``#`` header lines aside, is ``body``."""
    text, pos = _text(path), 0
    while text is not None and text.startswith("#", pos):
        pos = text.find("\n", pos) + 1 or len(text)
    return text is not None and text[pos:] == body


def read_entries(path: str, lsearch: bool = False) -> list[str] | None:
    """The sorted entries in the map (or lsearch output) at ``path``; None: no such file."""
    text = _text(path)
    if text is None or not lsearch:
        return None if text is None else ForwardingMap.parse(text).entries()
    keys = {line.split(None, 1)[0].split(":", 1)[0].lower() for line in text.splitlines()
            if line and line[0] != "#" and not line[0].isspace()}
    return sorted({k[1:] if k.startswith("*@") else k for k in keys})


def atomic_write(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new file, never
    a partial one.  Raises OSError; on error the old file is untouched and no temporary
    file is left behind."""
    import tempfile

    directory = os.path.dirname(os.path.abspath(path))
    try:
        old = os.stat(path)
    except FileNotFoundError:
        old = None
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, (old.st_mode & 0o7777) if old else 0o644)
        if old is not None and (old.st_uid, old.st_gid) != (os.getuid(), os.getgid()):
            with contextlib.suppress(PermissionError):  # (not root: ours, with the old mode)
                os.chown(tmp, old.st_uid, old.st_gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
