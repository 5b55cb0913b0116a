"""Orchestration: configured sources -> graph -> map file(s).  Used by the CLI and the daemon.

``build_map(config)`` reads every source, computes the forwarding set and rewrites the map
(and the optional lsearch output) only when its entries changed.  Any error in any source
raises :class:`ForwardingError` *before* anything is written, so the old map stays as it was.
All functions here block (file and SQLite I/O, and a few seconds of CPU for a million
aliases): call them from a thread, not from the event loop.
"""
from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from ..config import ForwardingConfig
from . import bulk, writer
from .graph import Explanation, ForwardingGraph, GraphBuilder, MapData
from .sources import ForwardingError, ForwardingSourceError, is_domain, open_source, read_text

__all__ = ["BuildResult", "CheckResult", "ForwardingError", "build_map", "check_map",
           "explain", "load_graph", "local_domains"]


@dataclass(frozen=True)
class BuildResult:
    map_path: str
    lsearch_path: str  # "" when no lsearch output is configured
    entries: int
    aliases: int
    #: targets read (addresses, pipes, files, specials)
    targets: int
    sources: int
    #: the files that were (re)written; empty when everything was current
    written: tuple[str, ...]
    #: the first warnings (see ``warning_count`` for how many there were)
    warnings: tuple[str, ...]
    warning_count: int
    seconds: float

    @property
    def changed(self) -> bool:
        return bool(self.written)


@dataclass(frozen=True)
class CheckResult:
    current: bool
    #: one line per stale or missing output file, e.g. ``/path: 2 added, 1 removed``
    stale: tuple[str, ...]
    entries: int
    warnings: tuple[str, ...]
    warning_count: int


def local_domains(config: ForwardingConfig, warn=None) -> frozenset[str]:
    """``local_domains`` plus the domains in ``local_domains_file``.

    The file is read like an Exim domain-list file: one domain per line, ``#`` comment
    lines and blank lines ignored; a trailing ``: data`` (an lsearch-style file) is allowed.
    Patterns (``*.example``, ``^regex``, ``@``, ``!negated``, ``lookup;...``) cannot be
    enumerated and are skipped with a warning.
    """
    domains = set()
    for i, domain in enumerate(config.local_domains):
        domain = domain.strip().lower()
        if not is_domain(domain):
            raise ForwardingError(f"forwarding.local_domains[{i}]: {domain!r} is not a domain")
        domains.add(domain)
    path = config.local_domains_file
    if path:
        for lineno, line in enumerate(read_text(path).splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            item = line.split(None, 1)[0].split(":", 1)[0].lower()
            if not item:
                continue
            if item[0] in "*^@!" or ";" in line:
                if warn:
                    warn(f"{path}:{lineno}: {item!r} is a pattern, not a domain: ignored")
                continue
            if not is_domain(item):
                raise ForwardingSourceError(f"{path}:{lineno}", f"{item!r} is not a domain")
            domains.add(item)
    if not domains:
        raise ForwardingError("forwarding.local_domains (or local_domains_file) is empty: "
                              "without local domains every address is external")
    return frozenset(domains)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the block (and back on after it, if it was).

    A build creates millions of strings, ints and lists and frees none of them until it is
    done; none of them form cycles.  With the collector on, every few thousand allocations
    it rescans the ever-growing heap (measured: 0.6 s of a 7 s build of a million aliases,
    most of it in the parse; the graph stage already pauses it itself).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_graph(config: ForwardingConfig, *, detail: bool = False) -> ForwardingGraph:
    """Read all sources and build the graph (``detail=True`` for explain)."""
    with _gc_paused():
        return _load_graph(config, detail)


def _load_graph(config: ForwardingConfig, detail: bool) -> ForwardingGraph:
    builder = GraphBuilder((), case_sensitive=config.case_sensitive_local_parts, detail=detail)
    builder.local_domains = local_domains(config, builder.warn)
    if not config.sources:
        builder.warn("forwarding.sources is empty: the map will be empty")
    for i, source in enumerate(config.sources):
        if source.domain and source.domain.lower() not in builder.local_domains:
            raise ForwardingError(f"forwarding.sources[{i}].domain: {source.domain!r} is not a "
                                  "local domain")
        # map builds let the parser drop external targets (keeping only their owners);
        # explain shows them, so it gets them all
        builder.add_batch(open_source(source, case_sensitive=config.case_sensitive_local_parts,
                                      warn=builder.warn,
                                      local_domains=None if detail else builder.local_domains))
    return builder.build()


def map_data(config: ForwardingConfig, *, bulk_min_lines: int = bulk.MIN_LINES) -> MapData:
    """The map's entries for ``config``: one large alias file takes the two-process route
    of bulk.py when it can, everything else (and whatever that route steps back from) the
    general one; both give the same result."""
    warnings = GraphBuilder(())
    domains = local_domains(config, warnings.warn)
    data = bulk.map_data(config, domains, warnings, min_lines=bulk_min_lines)
    return data if data is not None else load_graph(config).map_data()


def _outputs(config: ForwardingConfig, data: MapData) -> list[tuple[str, str]]:
    """(path, body) for each configured output file."""
    outputs = [(config.map, data.body)]
    if config.lsearch_output:
        outputs.append((config.lsearch_output, writer.lsearch_body(data.entries)))
    return outputs


def build_map(config: ForwardingConfig, *, now: datetime | None = None) -> BuildResult:
    """Build and write the map(s); files whose entries are unchanged are left alone."""
    started = time.monotonic()
    data = map_data(config)
    written = []
    for path, body in _outputs(config, data):
        try:
            if writer.is_current(path, body):
                continue
            writer.atomic_write(path, writer.render(body, data.count, now))
        except OSError as exc:
            raise ForwardingError(f"{path}: cannot write: {exc.strerror or exc}") from None
        written.append(path)
    return BuildResult(
        map_path=config.map, lsearch_path=config.lsearch_output, entries=data.count,
        aliases=data.aliases, targets=data.targets, sources=data.sources,
        written=tuple(written), warnings=data.warnings,
        warning_count=data.warning_count, seconds=time.monotonic() - started)


def check_map(config: ForwardingConfig) -> CheckResult:
    """Compare what a build would write with the files on disk; writes nothing."""
    data = map_data(config)
    stale = []
    for (path, body), lsearch in zip(_outputs(config, data), (False, True)):
        try:
            if writer.is_current(path, body):
                continue
            on_disk = writer.read_entries(path, lsearch=lsearch)
        except OSError as exc:
            raise ForwardingError(f"{path}: cannot read: {exc.strerror or exc}") from None
        if on_disk is None:
            stale.append(f"{path}: missing")
            continue
        old, new = set(on_disk), set(data.entries)
        stale.append(f"{path}: stale, {len(new - old)} to add, {len(old - new)} to remove")
    return CheckResult(current=not stale, stale=tuple(stale), entries=data.count,
                       warnings=data.warnings, warning_count=data.warning_count)


def explain(config: ForwardingConfig, address: str) -> Explanation:
    """Why ``address`` forwards (the chains) or why not."""
    return load_graph(config, detail=True).explain(address)
