"""An SQLite query's rows ``(source, destination)`` -> a :class:`~.graph.Source`.

The database is opened read-only.  A destination is a redirection list (redirect.py), so
``a@x,b@y`` rows and one-row-per-destination tables both work; all rows of a source are used;
a source ``@domain`` (Postfix-style catch-all) means ``*@domain``.  Entry ``i`` is row
``i + 1`` of the result (origins ``path:row N``).
"""
from __future__ import annotations

import contextlib
import sqlite3
import urllib.parse

from .addresses import ForwardingSourceError
from .graph import Source
from .redirect import RedirectParser


def read(path: str, query: str, local: frozenset[str], *, domain: str = "",
         case_sensitive: bool = False, detail: bool = False, warn=None) -> Source:
    """The rows of ``query`` (see the module docstring; the arguments as lsearch.read's)."""
    domain = domain.lower()
    parser = RedirectParser(case_sensitive)
    src = Source(path, detail=detail, first_wins=False, rows=True)
    try:
        conn = sqlite3.connect("file:" + urllib.parse.quote(path) + "?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise ForwardingSourceError(path, f"cannot open database: {exc}") from None
    with contextlib.closing(conn):
        try:
            cursor = conn.execute(query)
        except sqlite3.Error as exc:
            raise ForwardingSourceError(path, f"query failed: {exc}") from None
        try:
            for row in cursor:
                _row(src, parser, row, local, domain, warn)
        except sqlite3.Error as exc:
            raise ForwardingSourceError(f"{path}:row {len(src.keys) + 1}",
                                        f"query failed: {exc}") from None
    return src


def _row(src: Source, parser: RedirectParser, row: tuple, local: frozenset[str],
         domain: str, warn) -> None:
    entry = len(src.keys)
    src.keys.append("")
    origin = src.origin(entry + 1)
    if len(row) < 2:
        raise ForwardingSourceError(origin, "the query must return two columns "
                                    "(source, destination)")
    source, destination = row[0], row[1]
    if not isinstance(source, str) or not isinstance(destination, str):
        raise ForwardingSourceError(origin, "source and destination must be text, got "
                                    f"{type(source).__name__} and {type(destination).__name__}")
    raw = source.strip()
    src.read(entry, "*" + raw if raw.startswith("@") else raw, destination, parser, local,
             domain, origin, warn, what="source")
