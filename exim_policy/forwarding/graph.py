"""Alias entries -> graph -> "which local addresses reach an external mailbox".  Pure: no I/O.

Model (what Exim's redirect routers with ``lsearch*@`` lookups do):

- Nodes are addresses (interned to ints), plus one *wildcard node* per ``(source, domain)``
  with a ``*@domain`` key (or a ``*`` key, instantiated per local domain with bare targets
  qualified to that domain), plus one *probe node* per domain that some wildcard covers (it
  stands for "an address of that domain that is a key nowhere").
- A local address resolves, **per source**, to its exact entry if it is a key there, else
  to that source's ``*@domain`` wildcard, else to its ``*`` wildcard (``lsearch*@``'s order);
  the sources are combined by union: an address forwards if *any* source forwards it (a
  conservative reading of several redirect routers, which may be ordered either way).
- Within one lsearch source the first line with a key wins (Exim's lsearch); later
  duplicates are ignored with a warning.  SQL sources use all rows of a key.
- Targets: an address in a local domain is followed; any other address is *external* (the
  answer); pipes, files, ``:blackhole:``, ``:defer:``, ``:fail:`` and ``\\local`` are local
  ends; a local address that is a key nowhere (and no wildcard covers) is a mailbox.
- A key whose domain is not local is never looked up by Exim: it is ignored with a warning.

"Reaches external" is a breadth-first search over the *reverse* edges from all external
nodes (map builds do not materialise external addresses: they start from every node with an
external target): linear in nodes + edges, no recursion, and cycles need no special case --
a cycle with an exit is reached from the exit, a cycle without one never is (Exim delivers
an address that loops back to an ancestor locally, so such a loop is indeed no forward).
This was checked against ``exim -bt`` (tests/test_forwarding_exim.py).

Speed: a million aliases must build in seconds, so the hot paths are bulk operations --
``map``/``compress``/``dict`` calls that run at C speed over whole columns (see
sources.Batch) -- rather than a Python loop per edge, and the garbage collector is paused
while millions of objects are created.

Map entries: every local address that reaches external, plus ``@domain`` when the domain's
probe does, i.e. when an address of that domain that is a key nowhere would be forwarded by a
wildcard.  A ``@domain`` line also matches the exact keys of that domain that do *not*
forward (the map format has no exceptions).  We accept that over-match and report each such
address as a warning: the map is used to reject *spam* bound for forwarding addresses, and
listing only exact addresses instead would miss every address the catch-all forwards --
the ones dictionary spam hits -- while the over-match only turns already-spam verdicts for a
few named local addresses into rejects.
"""
from __future__ import annotations

import collections
import functools
import gc
import itertools
import operator
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter

from .sources import SPECIAL_START, Batch, Entry, parse_address
from .writer import map_body

# node kinds; LOCAL must be 0 (bulk code relies on it)
LOCAL, EXTERNAL, END, WILD, PROBE, DEAD = range(6)

#: characters that cannot be written to the map (Rspamd and the shim read ``#`` as a comment
#: and only the first token of a line)
_UNWRITABLE = frozenset("# \t\r\n\v\f")


@dataclass(frozen=True)
class Hop:
    """One address of a chain.  ``source`` is the entry (``file:line``) that redirects it
    onward and ``key`` the lookup key that matched (the address itself, ``*@domain`` or
    ``*``); both are None for the chain's final, external address."""

    address: str
    source: str | None
    key: str | None = None


@dataclass(frozen=True)
class Explanation:
    address: str
    forwarding: bool
    chains: tuple[tuple[Hop, ...], ...]
    reason: str


@dataclass(frozen=True)
class MapData:
    """What a map build needs of a graph: the map's entries and a summary."""

    #: the sorted entries, one per line, each line ending in a newline (writer.map_body);
    #: the text rather than a list, because writing it is what a build mostly does
    body: str
    count: int
    aliases: int
    targets: int
    sources: int
    warnings: tuple[str, ...]
    warning_count: int

    @functools.cached_property
    def entries(self) -> list[str]:
        return self.body.split("\n")[:-1]


class GraphBuilder:
    """Collects sources (:class:`Batch` es); :meth:`build` returns the finished graph.

    ``detail=False`` (map builds) keeps external addresses and local mailboxes out of the
    graph -- all externals are one node -- which saves most of the memory and time at a
    million aliases.  ``explain`` needs ``detail=True``.
    """

    def __init__(self, local_domains: Iterable[str], *, case_sensitive: bool = False,
                 detail: bool = False, max_warnings: int = 1000) -> None:
        self.local_domains = frozenset(d.lower() for d in local_domains)
        self.case_sensitive = case_sensitive
        self.detail = detail
        self.max_warnings = max_warnings
        self.warnings: list[str] = []
        self.warning_count = 0
        self._batches: list[Batch] = []

    def warn(self, message: str) -> None:
        self.warning_count += 1
        if len(self.warnings) < self.max_warnings:
            self.warnings.append(message)

    def warn_all(self, messages: Sequence[str]) -> None:
        """:meth:`warn` for each of ``messages``, in bulk."""
        self.warning_count += len(messages)
        self.warnings.extend(messages[:max(0, self.max_warnings - len(self.warnings))])

    def add_batch(self, batch: Batch) -> None:
        self._batches.append(batch)

    def add_source(self, name: str, entries: Iterable[Entry], *, first_wins: bool = True,
                   row_origins: bool = False) -> None:
        """Add a source given as ``(key, targets, line)`` entries (see sources.py)."""
        batch = Batch(name, first_wins=first_wins, row_origins=row_origins)
        for key, targets, line in entries:
            batch.add(key, list(targets), line)
        self.add_batch(batch)

    def build(self) -> "ForwardingGraph":
        """The graph of all batches added so far (which it empties to save memory)."""
        # The build allocates millions of small objects and frees none of them: the cyclic
        # garbage collector would only rescan them again and again (seconds at 1M aliases).
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return _Build(self).run()
        finally:
            if was_enabled:
                gc.enable()


class _Build:
    """One run of GraphBuilder.build (all the mutable state of it)."""

    def __init__(self, builder: GraphBuilder) -> None:
        self.b = builder
        self.local = builder.local_domains
        self.detail = builder.detail
        self.warn = builder.warn
        self.ids: dict[str, int] = {}
        self.names: list[str] = []
        self.kind = bytearray()
        self.keyed: list[int] = []  # per node: bit s set = exact key in source s
        self.esrc = array("i")
        self.edst = array("i")
        self.eent = array("i")  # only with detail: the entry that made each edge
        self.ent_src = array("i")
        self.ent_line = array("i")
        self.sources: list[tuple[str, str]] = []
        self.aliases = 0
        self.targets = 0  # targets read (all kinds), for the build summary
        # created after the first source's keys, so that its entry i can be node i
        self.external = self.dead = -1
        self.cover: dict[str, list[tuple[int, int, int]]] = {}  # domain -> (bit, W, entry)
        self.covered: list[int] = []  # nodes in a domain some wildcard covers
        self.seeds: list[int] = []  # map builds: nodes with an external target (repeats ok)

    def _new(self, name: str, kind: int, *, intern: bool = True) -> int:
        node = len(self.names)
        self.names.append(name)
        self.kind.append(kind)
        self.keyed.append(0)
        if intern:
            self.ids[name] = node
        return node

    def run(self) -> "ForwardingGraph":
        batches = self.b._batches
        offsets, enodes = [], []
        for s, batch in enumerate(batches):
            self.targets += len(batch.targets) + len(batch.external_owners) + sum(
                len(targets) for _key, targets, _line in batch.wildcards)
            self.sources.append((batch.name, "row " if batch.row_origins else ""))
            offsets.append(len(self.ent_line))
            self.ent_src.extend(itertools.repeat(s, len(batch.keys)))
            self.ent_line.extend(batch.lines)
            enodes.append(self._keys(batch, s))
            batch.lines = []  # consumed (see build)
            if self.external < 0:
                self.external = self._new("<external>", EXTERNAL, intern=False)
                self.dead = self._new("", DEAD, intern=False)  # owns ignored entries' targets
        wild = self._wildcards(batches)
        for batch, enode, offset in zip(batches, enodes, offsets):
            self._targets(batch, enode, offset)
        for node, targets, entry in wild:
            self._edges(node, targets, entry)
        self._coverage()
        probes = self._probes()
        return ForwardingGraph(self, probes)

    # ----------------------------------------------------------------- keys --
    def _keys(self, batch: Batch, s: int) -> Sequence[int]:
        """Intern the exact keys of one batch; returns the node of each entry."""
        keys, bit, n = batch.keys, 1 << s, len(batch.keys)
        ids, names, kind, keyed = self.ids, self.names, self.kind, self.keyed
        holes = keys.count(None)
        self.aliases += n - holes
        if not ids and batch.first_wins:
            # the first source: entry i becomes node base + i, all in bulk
            base = len(names)
            nodes = range(base, base + n)
            ids.update(zip(reversed(keys), reversed(nodes)))  # reversed: the first one wins
            ids.pop(None, None)
            names.extend(keys)
            kind.extend(bytes(n))  # LOCAL == 0
            keyed.extend(itertools.repeat(bit, n))
            dead = [base + i for i, key in enumerate(keys) if key is None] if holes else []
            if len(ids) != n - holes:
                for i, key in enumerate(keys):
                    if key is not None and ids[key] != base + i:
                        self.aliases -= 1
                        self.warn(f"{batch.origin(batch.lines[i])}: duplicate key {key!r}"
                                  " ignored (the first one wins)")
                        dead.append(base + i)
            # (the parser may have checked the domains already, see sources.parse_lsearch)
            domains = () if batch.keys_local and batch.local_domains == self.local else map(
                itemgetter(2), map(str.rpartition, ids, itertools.repeat("@")))
            if not all(map(self.local.__contains__, domains)):
                for key, node in list(ids.items()):
                    domain = key[key.rfind("@") + 1:]
                    if domain not in self.local:
                        self.aliases -= 1
                        self.warn(f"{batch.origin(batch.lines[node - base])}: key {key!r} "
                                  f"ignored: {domain} is not a local domain")
                        del ids[key]
                        dead.append(node)
            for node in dead:
                kind[node] = DEAD
                keyed[node] = 0
                names[node] = ""
            return nodes
        if self.dead < 0:  # a first source that is not an lsearch file
            self.external = self._new("<external>", EXTERNAL, intern=False)
            self.dead = self._new("", DEAD, intern=False)
        enode = []
        for i, key in enumerate(keys):
            if key is None:
                enode.append(self.dead)
                continue
            u = ids.get(key)
            if u is None:
                domain = key[key.rfind("@") + 1:]
                if domain not in self.local:
                    self.aliases -= 1
                    self.warn(f"{batch.origin(batch.lines[i])}: key {key!r} ignored: {domain}"
                              " is not a local domain")
                    enode.append(self.dead)
                    continue
                u = self._new(key, LOCAL)
            elif keyed[u] & bit and batch.first_wins:
                self.aliases -= 1
                self.warn(f"{batch.origin(batch.lines[i])}: duplicate key {key!r} ignored"
                          " (the first one wins)")
                enode.append(self.dead)
                continue
            keyed[u] |= bit
            enode.append(u)
        return enode

    # ------------------------------------------------------------ wildcards --
    def _wildcards(self, batches: list[Batch]) -> list[tuple[int, list, int]]:
        """Wildcard nodes and the coverage table; returns (node, targets, entry) to link."""
        out = []
        for s, batch in enumerate(batches):
            bit = 1 << s
            wild: dict[str, list[tuple[int, list]]] = {}
            star: list[tuple[int, list]] = []
            for key, targets, line in batch.wildcards:
                origin = batch.origin(line)
                entry = len(self.ent_line)
                if key == "*":
                    if star and batch.first_wins:
                        self.warn(f"{origin}: duplicate key '*' ignored (the first one wins)")
                        continue
                    star.append((entry, targets))
                else:
                    domain = key[2:]
                    if domain not in self.local:
                        self.warn(f"{origin}: key {key!r} ignored: {domain} is not a local "
                                  "domain")
                        continue
                    if domain in wild and batch.first_wins:
                        self.warn(f"{origin}: duplicate key {key!r} ignored (the first one "
                                  "wins)")
                        continue
                    wild.setdefault(domain, []).append((entry, targets))
                self.ent_src.append(s)
                self.ent_line.append(line)
                self.aliases += 1
            for domain, entries in wild.items():
                node = self._new(f"*@{domain}", WILD, intern=False)
                out.extend((node, targets, entry) for entry, targets in entries)
                self.cover.setdefault(domain, []).append((bit, node, entries[0][0]))
            if star:
                for domain in sorted(self.local - wild.keys()):
                    node = self._new("*", WILD, intern=False)
                    out.extend((node, _qualified(targets, domain), entry)
                               for entry, targets in star)
                    self.cover.setdefault(domain, []).append((bit, node, star[0][0]))
        return out

    # -------------------------------------------------------------- targets --
    def _classify(self, target: str, domain: str) -> int:
        """The node of a target that is not interned yet (-1: no edge needed)."""
        if target[0] in SPECIAL_START:
            if target[0] == "\\":
                address = target[1:]
                domain = address[address.rfind("@") + 1:]
                if domain not in self.local:  # \ext@gmail: still leaves the server
                    node = self.ids.get(address)
                    return node if node is not None else self._classify(address, domain)
            return self._new(target, END) if self.detail else -1
        if domain in self.local:
            if self.detail or domain in self.cover:
                return self._new(target, LOCAL)
            return -1  # a mailbox: an end, and nothing can redirect it
        return self._new(target, EXTERNAL) if self.detail else self.external

    def _targets(self, batch: Batch, enode: Sequence[int], offset: int) -> None:
        """Edges for all targets of one batch, in bulk."""
        targets, owners = batch.targets, batch.owners
        # the build consumes the batch: its target strings are the largest thing in memory
        batch.targets, batch.owners = [], []
        ids = self.ids
        identity = isinstance(enode, range) and enode.start == 0  # entry i is node i
        external = batch.external_owners  # targets the parser already found external
        batch.external_owners = array("i")
        if external:
            if self.detail:
                raise ValueError(f"{batch.name}: a batch without its external targets "
                                 "(parsed with local_domains) cannot give a detail graph")
            self.seeds.extend(external if identity else map(enode.__getitem__, external))
        del external
        src = owners if identity else list(map(enode.__getitem__, owners))
        tid = list(map(ids.get, targets))
        missing = list(itertools.compress(range(len(tid)),
                                          map(operator.is_, tid, itertools.repeat(None))))
        if self.detail:
            classify, get = self._classify, ids.get
            for j in missing:
                text = targets[j]
                node = get(text)  # an earlier target of this batch may have interned it
                tid[j] = node if node is not None else classify(text, text[text.rfind("@") + 1:])
            keep = list(map(operator.ge, tid, itertools.repeat(0)))
            self.esrc.extend(itertools.compress(src, keep))
            self.edst.extend(itertools.compress(tid, keep))
            self.eent.extend(itertools.compress(
                map(operator.add, owners, itertools.repeat(offset)), keep))
            return
        # Map builds: an edge to a key or an already interned address is kept; a target that
        # is a key nowhere is external (its owner is a BFS seed), a mailbox or a pipe/file
        # (no edge), or a local address a wildcard may redirect (interned, edge kept).
        keep = list(map(operator.is_not, tid, itertools.repeat(None)))
        self.esrc.extend(itertools.compress(src, keep))
        self.edst.extend(itertools.compress(tid, keep))
        del keep
        if not missing:
            return
        texts = list(map(targets.__getitem__, missing))
        del targets
        domains = list(map(itemgetter(2), map(str.rpartition, texts, itertools.repeat("@"))))
        local = list(map(self.local.__contains__, domains))
        covered = list(map(operator.and_, local, map(self.cover.__contains__, domains))) \
            if self.cover else None
        del domains
        special = list(map(SPECIAL_START.__contains__, map(itemgetter(0), texts)))
        external = map(operator.not_, map(operator.or_, local, special))
        del local
        self.seeds.extend(itertools.compress(map(src.__getitem__, missing), external))
        todo = []
        if covered is not None:
            todo.extend(itertools.compress(zip(missing, texts), covered))
        if any(special):
            todo.extend((j, t) for j, t in itertools.compress(zip(missing, texts), special)
                        if t[0] == "\\")
        del texts, special, covered
        get = ids.get
        for j, text in todo:
            node = get(text)
            if node is None:
                node = self._classify(text, text[text.rfind("@") + 1:])
            if node == self.external:
                self.seeds.append(src[j])
            elif node >= 0:
                self.esrc.append(src[j])
                self.edst.append(node)

    def _edges(self, u: int, targets: list, entry: int) -> None:
        """Edges of one (wildcard) entry."""
        for t in targets:
            v = self.ids.get(t)
            if v is None:
                v = self._classify(t, t[t.rfind("@") + 1:])
                if v < 0:
                    continue
            if v == self.external and not self.detail:
                self.seeds.append(u)
                continue
            self.esrc.append(u)
            self.edst.append(v)
            if self.detail:
                self.eent.append(entry)

    def _coverage(self) -> None:
        """Every local address that is not a key in a source with a wildcard for its
        domain resolves through that wildcard (``lsearch*@``: exact key first)."""
        cover = self.cover
        if not cover:
            return
        names, kind, keyed = self.names, self.kind, self.keyed
        domains = map(itemgetter(2), map(str.rpartition, names, itertools.repeat("@")))
        covered = list(itertools.compress(range(len(names)), map(cover.__contains__, domains)))
        self.covered = covered
        for u in covered:
            if kind[u] != LOCAL:
                continue
            name = names[u]
            k = keyed[u]
            for bit, node, entry in cover[name[name.rfind("@") + 1:]]:
                if not k & bit:
                    self.esrc.append(u)
                    self.edst.append(node)
                    if self.detail:
                        self.eent.append(entry)

    def _probes(self) -> dict[str, int]:
        """Per covered domain, a node for "an address of it that is a key nowhere"."""
        probes = {}
        for domain, wildcards in self.cover.items():
            probe = self._new(f"@{domain}", PROBE, intern=False)
            probes[domain] = probe
            for _bit, node, entry in wildcards:
                self.esrc.append(probe)
                self.edst.append(node)
                if self.detail:
                    self.eent.append(entry)
        return probes


def _qualified(targets: list, domain: str) -> list:
    """Targets of a ``*`` entry for one domain: bare local parts get ``@domain``."""
    out = []
    for t in targets:
        if t[0] == "\\":
            out.append(t if "@" in t else f"{t}@{domain}")
        elif t[0] in SPECIAL_START or "@" in t:
            out.append(t)
        else:
            out.append(f"{t}@{domain}")
    return out


def _lists(n: int) -> list[list]:
    return [[] for _ in range(n)]


def writable(addresses: list[str], warn) -> list[str]:
    """``addresses`` without those that cannot be written to the map (``#`` or white space
    in them), each of which is reported to ``warn``."""
    bad = unwritable(addresses, warn)
    return [a for a in addresses if a not in bad] if bad else addresses


def unwritable(addresses: Iterable[str], warn) -> set[str]:
    """Those of ``addresses`` that cannot be written to the map, each reported to
    ``warn`` (in sorted order)."""
    addresses = list(addresses)
    joined = "".join(addresses)
    if not any(c in joined for c in _UNWRITABLE):  # (the usual case, at memchr speed)
        return set()
    bad = sorted({a for a in addresses if not _UNWRITABLE.isdisjoint(a)})
    for address in bad:
        warn(f"{address!r} forwards but cannot be written to the map ('#' or white space "
             "in it)")
    return set(bad)


def over_match_warning(address: str, domain: str) -> str:
    return (f"{address} does not forward, but the map's @{domain} entry matches it (a domain "
            "wildcard forwards; the map has no exceptions)")


def reach(n: int, esrc: Sequence[int], edst: Sequence[int], seeds: Iterable[int],
          reached: bytearray | None = None) -> bytearray:
    """Breadth-first search over the reverse of the edges ``esrc[e] -> edst[e]`` from
    ``seeds`` (nodes known to reach an external address; repeats are fine), a level at a
    time with C-level ``map`` calls; linear in nodes + edges, cycle-safe.  Returns a 0/1
    mask of the ``n`` nodes: 1 for every node that reaches a seed.

    ``reached``: a mask from an earlier search over other edges, continued (and updated in
    place); every node it marks must be among the seeds or have no predecessor here."""
    was_enabled = gc.isenabled()
    gc.disable()  # hundreds of thousands of new lists: see GraphBuilder.build
    try:
        if reached is None:
            reached = bytearray(n)
        frontier = list(dict.fromkeys(seeds))
        one = itertools.repeat(1)
        collections.deque(map(reached.__setitem__, frontier, one), maxlen=0)
        # An edge out of a node that is reached already can add nothing: leave those out
        # (in map builds about half of all edges leave a node with an external target).
        # Lists only for nodes that have predecessors.
        live = list(map(operator.not_, map(reached.__getitem__, esrc)))
        preds: collections.defaultdict = collections.defaultdict(list)
        collections.deque(map(list.append,
                              map(preds.__getitem__, itertools.compress(edst, live)),
                              itertools.compress(esrc, live)), maxlen=0)
        del live
        get, none = preds.get, ()
        while frontier:
            found = list(itertools.chain.from_iterable(
                map(get, frontier, itertools.repeat(none))))
            new = itertools.compress(found, map(operator.not_, map(reached.__getitem__, found)))
            frontier = list(dict.fromkeys(new))  # without duplicates, in order
            collections.deque(map(reached.__setitem__, frontier, one), maxlen=0)
        return reached
    finally:
        if was_enabled:
            gc.enable()


class ForwardingGraph:
    """The finished graph.  ``reached[node]`` is 1 when the node reaches an external address."""

    def __init__(self, build: _Build, probes: dict[str, int]) -> None:
        builder = build.b
        self.local_domains = builder.local_domains
        self.case_sensitive = builder.case_sensitive
        self.detail = builder.detail
        self._builder = builder
        self.aliases = build.aliases
        #: targets read from all sources (addresses, pipes, files, specials)
        self.targets = build.targets
        self._ids = build.ids
        self._names = build.names
        self._kind = build.kind
        self._keyed = build.keyed
        self._esrc, self._edst, self._eent = build.esrc, build.edst, build.eent
        self._ent_src, self._ent_line = build.ent_src, build.ent_line
        self._sources = build.sources
        self._probes = probes
        self._covered = build.covered
        self._seeds = build.seeds
        self._forward: list[list[int]] | None = None
        #: 1 for every node that reaches an external address
        self.reached = self._reach()
        self._entries: list[str] | None = None

    @property
    def warnings(self) -> list[str]:
        return self._builder.warnings

    @property
    def warning_count(self) -> int:
        return self._builder.warning_count

    @property
    def nodes(self) -> int:
        return len(self._names)

    @property
    def edges(self) -> int:
        return len(self._esrc)

    @property
    def sources(self) -> int:
        return len(self._sources)

    def _reach(self) -> bytearray:
        """1 for every node that reaches an external address (see :func:`reach`)."""
        n = len(self._names)
        frontier = itertools.compress(
            range(n), map(operator.eq, self._kind, itertools.repeat(EXTERNAL)))
        return reach(n, self._esrc, self._edst, itertools.chain(frontier, self._seeds))

    # --------------------------------------------------------------- output --
    def _forwarding_names(self) -> Iterable[str]:
        """Names of the local addresses that forward, in node (roughly file) order, which
        makes the final sort cheaper than a random order would."""
        # LOCAL is 0: a forwarding local node has reached 1 > kind 0
        return itertools.compress(self._names, map(operator.gt, self.reached, self._kind))

    def entries(self) -> list[str]:
        """Sorted map entries: lower-cased addresses and ``@domain`` lines (see module doc).

        Addresses that cannot be written (``#`` or white space in them) are left out with a
        warning; ``@domain`` over-matches are reported as warnings too.
        """
        if self._entries is not None:
            return self._entries
        names = self._forwarding_names()
        if self.case_sensitive:
            out = sorted(set(map(str.lower, names)))
        else:
            out = sorted(names)  # node names are unique and already lower-case
        out = writable(out, self._builder.warn)
        domains = [d for d, probe in self._probes.items() if self.reached[probe]]
        if domains:
            self._over_match(set(domains))
            out = sorted(out + [f"@{d}" for d in domains])
        self._entries = out
        return out

    def map_data(self) -> MapData:
        entries = self.entries()  # (may add warnings)
        return MapData(map_body(entries), len(entries), self.aliases, self.targets,
                       self.sources, tuple(self.warnings), self.warning_count)

    def _over_match(self, domains: set[str]) -> None:
        names, kind, reached = self._names, self._kind, self.reached
        for v in self._covered:
            if kind[v] == LOCAL and not reached[v]:
                name = names[v]
                domain = name[name.rfind("@") + 1:]
                if domain in domains:
                    self._builder.warn(over_match_warning(name, domain))

    def is_forwarding(self, address: str) -> bool:
        """Whether a normalised address (see :meth:`normalize`) is a forwarding address."""
        node = self._ids.get(address)
        if node is not None and self._kind[node] == LOCAL:
            return bool(self.reached[node])
        probe = self._probes.get(address[address.rfind("@") + 1:])
        return node is None and probe is not None and bool(self.reached[probe])

    # -------------------------------------------------------------- explain --
    def _origin(self, entry: int) -> str:
        name, prefix = self._sources[self._ent_src[entry]]
        return f"{name}:{prefix}{self._ent_line[entry]}"

    def _out(self) -> list[list[int]]:
        """Forward adjacency: per node, the indices of its edges (built on first use)."""
        if self._forward is None:
            out = _lists(len(self._names))
            collections.deque(map(list.append, map(out.__getitem__, self._esrc),
                                  range(len(self._esrc))), maxlen=0)
            self._forward = out
        return self._forward

    def normalize(self, address: str) -> str:
        """A user-typed address -> the node name form; raises ValueError."""
        local, domain = parse_address(address.strip())
        if domain is None:
            raise ValueError("no domain")
        domain = domain.lower()
        return f"{local if self.case_sensitive else local.lower()}@{domain}"

    def explain(self, address: str) -> Explanation:
        """Chains from ``address`` to each external target it reaches (shortest first, one
        per target), or why it does not forward.  Needs a ``detail=True`` graph."""
        if not self.detail:
            raise RuntimeError("explain needs a graph built with detail=True")
        try:
            addr = self.normalize(address)
        except ValueError as exc:
            return Explanation(address, False, (), f"not an address: {exc}")
        domain = addr[addr.rfind("@") + 1:]
        if domain not in self.local_domains:
            return Explanation(addr, False, (), f"{domain} is not a local domain: "
                               "mail to it leaves this server without any alias lookup")
        start = self._ids.get(addr)
        if start is None or self._kind[start] != LOCAL:
            start = self._probes.get(domain)
            if start is None:
                return Explanation(addr, False, (), "local mailbox: not a key in any source"
                                   " and no wildcard covers its domain")
        out = self._out()
        edst, kind = self._edst, self._kind
        # breadth-first search with parent edges: shortest chain per reached node
        parent = {start: -1}
        order = [start]
        for u in order:
            for e in out[u]:
                v = edst[e]
                if v not in parent:
                    parent[v] = e
                    order.append(v)
        externals = [v for v in order if kind[v] == EXTERNAL]
        if externals:
            chains = tuple(self._chain(addr, start, v, parent) for v in externals)
            n = len(externals)
            return Explanation(addr, True, chains,
                               f"forwards to {n} external address{'es' if n > 1 else ''}")
        return Explanation(addr, False, (), self._why_not(addr, start, order, parent))

    def _display(self, node: int, query: str, start: int) -> str:
        return query if node == start else self._names[node]

    def _chain(self, query: str, start: int, target: int,
               parent: dict[int, int]) -> tuple[Hop, ...]:
        path_edges = []
        node = target
        while node != start:
            e = parent[node]
            path_edges.append(e)
            node = self._esrc[e]
        path_edges.reverse()
        hops: list[Hop] = []
        current = query
        key = query
        for e in path_edges:
            v = self._edst[e]
            if self._kind[v] == WILD:
                key = self._names[v]
                continue  # a wildcard is a lookup step, not an address of the chain
            hops.append(Hop(current, self._origin(self._eent[e]), key))
            current = self._names[v]
            key = current
        hops.append(Hop(current, None, None))
        return tuple(hops)

    def _why_not(self, addr: str, start: int, order: list[int],
                 parent: dict[int, int]) -> str:
        out = self._out()
        kind, names, keyed = self._kind, self._names, self._keyed
        reasons = []
        if self._kind[start] == LOCAL and not out[start]:
            if keyed[start]:
                reasons.append("its entry has no targets (the router declines: local delivery)")
            else:
                reasons.append("local mailbox: not a key in any source")
        else:
            cycle = self._find_cycle(start, order)
            if cycle:
                shown = " -> ".join(addr if n == start else names[n] for n in cycle)
                reasons.append(f"cycle without exit: {shown} (Exim delivers an address that"
                               " loops back locally)")
            ends = []
            for v in order:
                if kind[v] == END:
                    ends.append(f"{names[v]} ({self._origin(self._eent[parent[v]])})")
                elif kind[v] == LOCAL and not out[v] and v != start:
                    ends.append(f"mailbox {names[v]}")
            if ends:
                reasons.append("only local ends: " + ", ".join(ends[:10])
                               + (f" and {len(ends) - 10} more" if len(ends) > 10 else ""))
        domain = addr[addr.rfind("@") + 1:]
        probe = self._probes.get(domain)
        if probe is not None and self.reached[probe]:
            reasons.append(f"note: the map's @{domain} entry matches it anyway (a wildcard"
                           " of that domain forwards)")
        return "; ".join(reasons) or "no external target"

    def _find_cycle(self, start: int, order: list[int]) -> list[int] | None:
        """A cycle among the reachable nodes (iterative DFS), as a node list a..a."""
        out = self._out()
        edst = self._edst
        reachable = set(order)
        colour: dict[int, int] = {}  # 1 = on the stack, 2 = done
        for root in order:
            if root in colour:
                continue
            stack = [(root, 0)]
            colour[root] = 1
            while stack:
                u, i = stack[-1]
                if i == len(out[u]):
                    colour[u] = 2
                    stack.pop()
                    continue
                stack[-1] = (u, i + 1)
                v = edst[out[u][i]]
                if v not in reachable:
                    continue
                c = colour.get(v)
                if c == 1:
                    path = [n for n, _ in stack]
                    return path[path.index(v):] + [v]
                if c is None:
                    colour[v] = 1
                    stack.append((v, 0))
        return None
