"""Configured sources -> graph -> map file(s), for the CLI: ``build_map`` rewrites the map
(and the optional lsearch output) only when its entries changed, ``check_map`` compares what
a build would write with the files (``build --check``).  An error in any source raises
:class:`ForwardingError` *before* anything is written: the old map stays.  All of it blocks
(file and SQLite I/O, seconds of CPU at a million aliases): not for the event loop.
"""
from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass
from datetime import datetime

from ..config import ForwardingConfig
from . import lsearch, mapfile, sqlite_source
from .addresses import ForwardingError, ForwardingSourceError, is_domain, read_text
from .graph import Explanation, ForwardingGraph, MapData, Warnings


@dataclass(frozen=True)
class BuildResult:
    map_path: str
    lsearch_path: str  # "" when no lsearch output is configured
    entries: int
    aliases: int
    targets: int  #: targets read (addresses, pipes, files, specials)
    sources: int
    written: tuple[str, ...]  #: the files (re)written; empty when all were current
    warnings: tuple[str, ...]  #: the first warnings (``warning_count``: how many in all)
    warning_count: int
    seconds: float

    @property
    def changed(self) -> bool:
        return bool(self.written)


@dataclass(frozen=True)
class CheckResult:
    current: bool
    stale: tuple[str, ...]  #: per stale or missing file: ``/path: stale, 2 to add, ...``
    entries: int
    warnings: tuple[str, ...]
    warning_count: int


def local_domains(config: ForwardingConfig, warn=None) -> frozenset[str]:
    """``local_domains`` plus those of ``local_domains_file``, an Exim domain-list file: a
    domain per line (``#`` comments, blank lines, a trailing ``: data`` allowed); patterns
    (``*.example``, ``^regex``, ``@``, ``!negated``, ``lookup;...``) are skipped, warned."""
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
            item = line.split(None, 1)[0].split(":", 1)[0].lower() if line[:1] not in "#" else ""
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
def _collector_paused():
    # A build creates millions of strings, ints and lists and frees none of them until it
    # is done; none of them form cycles.  With the collector on, every few thousand
    # allocations it rescans the ever-growing heap (seconds at a million aliases), and the
    # first collection once it is back on goes over all of the graph (half a second).
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@_collector_paused()
def load_graph(config: ForwardingConfig, *, detail: bool = False) -> ForwardingGraph:
    """Read all sources and build the graph (``detail=True`` for explain)."""
    warn = Warnings()
    local = local_domains(config, warn)
    if not config.sources:
        warn("forwarding.sources is empty: the map will be empty")
    sources, sensitive = [], config.case_sensitive_local_parts
    for i, source in enumerate(config.sources):
        if source.domain and source.domain.lower() not in local:
            raise ForwardingError(f"forwarding.sources[{i}].domain: {source.domain!r} is "
                                  "not a local domain")
        options = dict(domain=source.domain, case_sensitive=sensitive, detail=detail, warn=warn)
        if source.type == "lsearch":
            sources.append(lsearch.read(source.path, local, **options))
        elif source.type == "sqlite":
            sources.append(sqlite_source.read(source.path, source.query, local, **options))
        else:
            raise ForwardingError(f"{source.path}: unknown source type {source.type!r}")
    return ForwardingGraph(sources, local, case_sensitive=sensitive, detail=detail, warn=warn)


def _outputs(config: ForwardingConfig, data: MapData) -> list[tuple[str, str]]:
    outputs = [(config.map, data.body)]
    if config.lsearch_output:
        outputs.append((config.lsearch_output, mapfile.lsearch_body(data.entries)))
    return outputs


@_collector_paused()  # (until the graph is freed)
def build_map(config: ForwardingConfig, *, now: datetime | None = None) -> BuildResult:
    """Build and write the map(s); files whose entries are unchanged are left alone."""
    started = time.monotonic()
    data = load_graph(config).map_data()
    written = []
    for path, body in _outputs(config, data):
        try:
            if mapfile.is_current(path, body):
                continue
            mapfile.atomic_write(path, mapfile.render(body, data.count, now))
        except OSError as exc:
            raise ForwardingError(f"{path}: cannot write: {exc.strerror or exc}") from None
        written.append(path)
    return BuildResult(
        map_path=config.map, lsearch_path=config.lsearch_output, entries=data.count,
        aliases=data.aliases, targets=data.targets, sources=data.sources,
        written=tuple(written), warnings=data.warnings,
        warning_count=data.warning_count, seconds=time.monotonic() - started)


@_collector_paused()
def check_map(config: ForwardingConfig) -> CheckResult:
    """Compare what a build would write with the files on disk; writes nothing."""
    data = load_graph(config).map_data()
    stale = []
    for (path, body), lsearch_output in zip(_outputs(config, data), (False, True), strict=False):
        try:
            if mapfile.is_current(path, body):
                continue
            on_disk = mapfile.read_entries(path, lsearch=lsearch_output)
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
    return load_graph(config, detail=True).explain(address)
