"""Render the forwarding map, write it atomically, tell whether the file on disk is current.

Map format (Rspamd multimap ``type = "rcpt"``, and ``forwarding/mapfile.py``)::

    # exim-policy forwarding map: 3 entries, built 2024-05-01T12:00:00Z
    # written by `exim-policy forwardings build`; do not edit
    @old.example
    a@example.com
    b@example.net

Header lines are ``#`` comments only; then one lower-cased address or ``@domain`` per
line, sorted.  The optional Exim lsearch output has the same entries as ``address: yes``
and ``*@domain: yes`` lines, for ``${lookup{$local_part@$domain}lsearch*@{FILE}}`` in ACLs.

A write goes to a temporary file in the target's directory, is fsynced and then renamed
over the target (and the directory fsynced): Rspamd re-reads a map as soon as its mtime
changes, and an in-place rewrite would show it an empty or half-written file.  The mode (and,
when we may, the owner) of an existing file is kept; a new file gets 0644 so that Rspamd's
user can read it.  Nothing is written when the entries are unchanged (the header's time
stamp is ignored for that comparison), so the file's mtime only moves on real changes.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone

HEADER = "# exim-policy forwarding map: {n} entries, built {when}\n" \
         "# written by `exim-policy forwardings build`; do not edit\n"


def _stamp(now: datetime | None) -> str:
    now = now or datetime.now(timezone.utc)
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _body(lines: Sequence[str]) -> str:
    return "\n".join(lines) + "\n" if lines else ""


def map_body(entries: Sequence[str]) -> str:
    """The map's lines after the header: one entry per line."""
    return _body(entries)


def lsearch_body(entries: Sequence[str]) -> str:
    """The lsearch output's lines after the header: ``address: yes`` / ``*@domain: yes``."""
    return _body([f"*{e}: yes" if e.startswith("@") else f"{e}: yes" for e in entries])


def render(body: str, count: int, now: datetime | None = None) -> str:
    """Header + ``body`` (from :func:`map_body` or :func:`lsearch_body`)."""
    return HEADER.format(n=count, when=_stamp(now)) + body


def render_map(entries: Sequence[str], now: datetime | None = None) -> str:
    """The multimap file text for sorted ``entries``."""
    return render(map_body(entries), len(entries), now)


def render_lsearch(entries: Sequence[str], now: datetime | None = None) -> str:
    """The Exim lsearch file text for sorted ``entries``."""
    return render(lsearch_body(entries), len(entries), now)


def current_body(path: str) -> str | None:
    """The file's text after its leading ``#`` header lines; None when it does not exist."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            text = fh.read()
    except FileNotFoundError:
        return None
    pos = 0
    while text.startswith("#", pos):
        nl = text.find("\n", pos)
        if nl < 0:
            return ""
        pos = nl + 1
    return text[pos:]


def is_current(path: str, body: str) -> bool:
    """True when the file exists and, header (time stamp) aside, is exactly ``body``."""
    return current_body(path) == body


def parse_map(text: str) -> list[str]:
    """Entries of a map file, read the way the daemon's reader and Rspamd read it."""
    out = []
    for line in text.splitlines():
        token = line.split("#", 1)[0].split(None, 1)
        if token:
            out.append(token[0].strip("<>").lower())
    return sorted(set(out))


def parse_lsearch_output(text: str) -> list[str]:
    """Entries of an lsearch output file (``*@domain`` back to ``@domain``)."""
    out = []
    for line in text.splitlines():
        if not line or line[0] == "#" or line[0].isspace():
            continue
        key = line.split(None, 1)[0].split(":", 1)[0].lower()
        out.append(key[1:] if key.startswith("*@") else key)
    return sorted(set(out))


def read_entries(path: str, lsearch: bool = False) -> list[str] | None:
    """The entries in the file at ``path``, or None when it does not exist."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            text = fh.read()
    except FileNotFoundError:
        return None
    return parse_lsearch_output(text) if lsearch else parse_map(text)


def atomic_write(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new file, never
    a partial one.  Raises OSError; on error the old file is untouched and no temporary
    file is left behind."""
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
            try:
                os.chown(tmp, old.st_uid, old.st_gid)
            except PermissionError:
                pass  # not root: the file becomes ours, with the old mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # make the rename itself durable
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
