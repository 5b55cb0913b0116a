"""Alias entries -> graph -> "which local addresses reach an external mailbox".  Pure: no I/O.

Model (what Exim's redirect routers with ``lsearch*@`` lookups do; checked against
``exim -bt``, tests/test_forwarding_exim.py):

- Nodes are addresses (interned to ints), one *wildcard node* per ``(source, domain)`` with a
  ``*@domain`` key (or a ``*`` key: one per local domain, bare targets qualified to it), and
  one *probe node* per domain a wildcard covers ("an address of it that is a key nowhere").
- A local address resolves, **per source**, to its exact entry, else to that source's
  ``*@domain``, else to its ``*`` (``lsearch*@``'s order); the sources are combined by union:
  an address forwards if *any* source forwards it (several redirect routers, in any order).
- In an lsearch source the first line of a key wins (Exim's lsearch), later ones are ignored
  with a warning; SQL sources use all rows of a key.
- An address in a local domain is followed, any other is *external* (the answer); pipes,
  files, ``:blackhole:``, ``:defer:``, ``:fail:`` and ``\\local`` are local ends; a local
  address that is a key nowhere (and no wildcard covers) is a mailbox.

"Reaches external": a breadth-first search over the *reverse* edges from the nodes with an
external target; linear, and a cycle is reached from its exits or never (Exim delivers an
address that loops back to an ancestor locally).  Map builds leave external addresses, ends
and mailboxes (but those a wildcard covers) out; ``detail`` graphs (explain) have them all.

Map entries: every local address that reaches external, and ``@domain`` when the domain's
probe does.  ``@domain`` also matches the keys of that domain that do *not* forward (the
map has no exceptions): each such over-match is a warning.  The map rejects *spam* to
forwarding addresses; listing exact addresses only would miss every address the catch-all
forwards (those dictionary spam hits), the over-match only turns already-spam verdicts for a
few named addresses into rejects.  The work is ``map``/``compress``/``dict`` calls over whole
columns, at C speed (build.load_graph pauses the garbage collector).
"""
from __future__ import annotations

import collections
import functools
import operator
from dataclasses import dataclass
from itertools import chain, compress, repeat
from operator import itemgetter

from .addresses import ForwardingSourceError, ignored, key, normalize, parse_address
from .mapfile import map_body
from .redirect import END_START

LOCAL, EXTERNAL, END, WILD, PROBE, DEAD = range(6)  # (LOCAL must be 0: see entries())
#: characters that cannot be written to the map (Rspamd and the shim read ``#`` as a comment
#: and only the first token of a line)
_UNWRITABLE = frozenset("# \t\r\n\v\f")


class Source:
    """One source's entries in columns, as lsearch.py and sqlite_source.py give them to the
    graph.  Entry ``i`` is line (or row) ``i + 1``; ``keys[i]`` its exact key, "" for none (a
    comment, an ignored key, a wildcard: those are ``wildcards``, ``(key, targets, line)``).
    The addresses are ``chunks`` of ``(targets, owners)``: ``targets`` a list or joined by
    commas (compact: the largest thing in memory), ``owners[j]`` the entry of target ``j``.
    Local ends are counted in ``count`` (the targets read), kept only with ``detail``."""

    def __init__(self, name: str, *, detail: bool = False, first_wins: bool = True,
                 rows: bool = False) -> None:
        self.name, self.detail, self.first_wins, self.rows = name, detail, first_wins, rows
        self.keys: list[str] = []
        self.chunks: list[tuple[str | list[str], list[int]]] = []
        self.end_targets, self.end_owners, self.count = [], [], 0
        self.wildcards: list[tuple[str, list[str], int]] = []

    def origin(self, line: int) -> str:
        return f"{self.name}:{'row ' if self.rows else ''}{line}"

    def read(self, entry: int, raw: str, data: str, parser, local: frozenset[str], domain: str,
             origin: str, warn, quoted: bool = False, what: str = "key") -> None:
        """Entry ``entry`` from its raw key and data, through redirect.py's ``parser``; a key
        Exim never looks up is warned about and skipped (its targets counted).  ``what``:
        the key in errors; ``domain``, ``quoted``: see addresses.key."""
        try:
            name = key(raw, domain, parser.case_sensitive, quoted)
        except ValueError as exc:
            raise ForwardingSourceError(origin, f"bad {what} {raw!r}: {exc}") from None
        key_domain = None if name in (None, "*") else name[name.rfind("@") + 1:]
        targets = parser.parse(data, key_domain or domain or None, origin)
        if name is None or (key_domain is not None and key_domain not in local):
            if warn is not None:
                warn(ignored(origin, raw, domain, name))
            self.count += len(targets)  # (read, but never looked up)
        elif name[0] == "*":
            self.count += len(targets)
            self.wildcards.append((name, targets, entry + 1))
        else:
            self.keys[entry] = name
            self.add(entry, targets, local)

    def add(self, entry: int, targets: list[str], local: frozenset[str]) -> None:
        """The targets of entry ``entry``, as redirect.py gives them."""
        self.count += len(targets)
        if not self.chunks or isinstance(self.chunks[-1][0], str):
            self.chunks.append(([], []))
        addresses, owners = self.chunks[-1]
        for t in targets:
            if t[0] in END_START and t.__class__ is str:  # (not an Address)
                if t[0] != "\\" or "@" not in t or t[t.rfind("@") + 1:] in local:
                    if self.detail:
                        self.end_targets.append(t)
                        self.end_owners.append(entry)
                    continue
                t = t[1:]  # (\address, not local: no further redirection, but it leaves)
            addresses.append(t)
            owners.append(entry)


class _Names(dict):
    """Name -> its node's list.  A name that is no node is noted in ``missing`` and gets the
    list of ``trash``, a dead node (so what is appended to that follows ``missing``)."""

    def __missing__(self, name: str) -> list[int]:
        self.missing.append(name)
        return self.trash


class Warnings:
    """Collects warnings: the first ``limit`` of them, and how many there were."""

    def __init__(self, limit: int = 1000) -> None:
        self.first, self.count, self.limit = [], 0, limit

    def __call__(self, message: str) -> None:
        self.count += 1
        if len(self.first) < self.limit:
            self.first.append(message)


@dataclass(frozen=True)
class Hop:
    """An address of a chain, the entry (``file:line``) that redirects it onward and the key
    that matched (itself, ``*@domain`` or ``*``); None, None for the final, external one."""

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

    body: str  #: the sorted entries, each line ending in a newline (mapfile.map_body)
    count: int
    aliases: int
    targets: int
    sources: int
    warnings: tuple[str, ...]
    warning_count: int

    @functools.cached_property
    def entries(self) -> list[str]:
        return self.body.split("\n")[:-1]


def _domains(addresses):
    """The domain of each address (after the last "@": a quoted local part may have one)."""
    return map(itemgetter(2), map(str.rpartition, addresses, repeat("@")))


def reach(preds: list[list[int]], seeds) -> bytearray:
    """Breadth-first search over the reverse edges (``preds[v]``: ``v`` and the nodes with an
    edge to it) from ``seeds``, a level at a time in C-level set operations; linear.  The
    0/1 mask of the nodes that reach a seed."""
    seen = frontier = set(seeds)
    while frontier:
        frontier = set(chain.from_iterable(map(preds.__getitem__, frontier))) - seen
        seen |= frontier
    reached = bytearray(len(preds))
    collections.deque(map(reached.__setitem__, seen, repeat(1)), maxlen=0)
    return reached


class ForwardingGraph:
    """The graph of ``sources``; ``reached[node]`` is 1 when the node reaches an external
    address.  An edge's entry is ``source << 32 | line``."""

    def __init__(self, sources: list[Source], local_domains, *, case_sensitive: bool = False,
                 detail: bool = False, warn=None) -> None:
        self.local_domains = frozenset(d.lower() for d in local_domains)
        self.case_sensitive, self.detail = case_sensitive, detail
        self.warn = warn if warn is not None else Warnings()
        self.sources, self.aliases = len(sources), 0
        self.targets = sum(s.count for s in sources)  #: targets read (ends too)
        self._sources = [(s.name, "row " if s.rows else "") for s in sources]
        self._names: list[str] = []
        self._kind = bytearray()
        #: per node ``v``: ``[v, u, ...]`` for each edge ``u -> v`` (detail graphs keep each
        #: edge and its entry in ``_esrc``, ``_edst``, ``_eent`` too).  A name leads to its
        #: node's list (``_ids``): a target's lookup gives what its edge is appended to.
        self._preds: list[list[int]] = []
        self._ids = _Names()
        self._ids.missing = []
        self._esrc, self._edst, self._eent, self._seeds = [], [], [], []
        self._cover: dict[str, list[tuple[int, int, int]]] = {}  # domain -> (source, W, entry)
        self._probes: dict[str, int] = {}
        self._mailboxes: list[str] = []  # (map builds: mailboxes a wildcard covers)
        #: the local nodes in a domain some wildcard covers (a 0/1 mask), and their domains
        self._covered, self._covered_domains = b"", []
        self._forward: list[list[int]] | None = None
        self._build(sources)

    def _new(self, names, kind: int, intern: bool = True) -> int:
        """Nodes for ``names`` (or the names that are not nodes yet: when they are
        ``_names``); returns the first one's (they are consecutive)."""
        base = len(self._preds)
        if names is not self._names:
            self._names.extend(names)
        n = len(self._names) - base
        self._kind.extend(bytes([kind]) * n)
        self._preds += [[v] for v in range(base, base + n)]
        if intern:
            self._ids.update(zip(self._names[base:], self._preds[base:], strict=False))
        return base

    def _edges(self, srcs, dsts, entries) -> None:
        """Edges ``srcs[k] -> dsts[k]`` (the nodes' lists), made by ``entries[k]``."""
        if self.detail:
            self._esrc.extend(srcs)
            self._edst.extend(map(itemgetter(0), dsts))
            self._eent.extend(entries)
        else:
            collections.deque(map(list.append, dsts, srcs), maxlen=0)

    def _build(self, sources: list[Source]) -> None:
        keyed = [self._keys(source) for source in sources]
        self._ids.trash = self._preds[self._new([""], DEAD, False)]
        self._key_end = len(self._names)  # (the nodes made so far are keys, or dead)
        wild = [w for s, source in enumerate(sources) for w in self._wildcards(s, source)]
        for domain, wildcards in self._cover.items():
            probe = self._probes[domain] = self._new([f"@{domain}"], PROBE, False)
            self._edges([probe] * len(wildcards), [self._preds[w] for _s, w, _e in wildcards],
                        [e for _s, _w, e in wildcards])
        for s, (source, enode) in enumerate(zip(sources, keyed, strict=False)):
            self._targets(s, source, enode)
        for node, targets, entry in wild:
            part = Source("", detail=self.detail)
            part.add(0, targets, self.local_domains)
            for addresses, _owners in part.chunks:
                self._resolve(addresses, [node] * len(addresses), [entry] * len(addresses))
            for text in part.end_targets:
                self._edges((node,), (self._preds[self._new([text], END, False)],), (entry,))
        self._coverage(keyed)
        if self.detail:
            collections.deque(map(list.append, map(self._preds.__getitem__, self._edst),
                                  self._esrc), maxlen=0)
            self._seeds = compress(range(len(self._names)), map(
                operator.eq, self._kind, repeat(EXTERNAL)))
        self.reached = reach(self._preds, self._seeds)
        self._seeds = []

    def _keys(self, source: Source):
        """Intern the exact keys of one source; returns the node of each entry."""
        keys, ids = source.keys, self._ids
        if not self._names:
            self._names = keys  # (the first source's: no copy)
        n, base = len(keys), self._new(keys, LOCAL, False)
        enode, lists = range(base, base + n), self._preds[base:]
        dead = list(compress(enode, map(operator.not_, keys)))
        self.aliases += n - len(dead)
        before = len(ids)
        if source.first_wins and not (ids and any(map(ids.__contains__, keys))):
            # (reversed: the first one wins)
            ids.update(zip(reversed(keys), reversed(lists), strict=False))
            ids.pop("", None)
            if len(ids) - before == n - len(dead):  # (no key twice)
                collections.deque(map(self._kind.__setitem__, dead, repeat(DEAD)), maxlen=0)
                return enode
        enode, seen = list(enode), set()
        for i, name in compress(enumerate(keys), keys):  # (the entries with a key)
            u = ids.setdefault(name, lists[i])[0]
            if source.first_wins and (name in seen or base <= u < base + i):
                self.aliases -= 1
                self.warn(f"{source.origin(i + 1)}: duplicate key {name!r} ignored (the first"
                          " one wins)")
                u = -1
            seen.add(name)
            if u != base + i:  # (a duplicate, or a key of an earlier source or row)
                dead.append(base + i)
                enode[i] = u if u >= 0 else base + i
        for u in dead:
            self._kind[u] = DEAD
            self._names[u] = ""
        return enode

    def _wildcards(self, s: int, source: Source) -> list[tuple[int, list, int]]:
        """Wildcard nodes of one source and the coverage table; returns (node, targets,
        entry) to link once the coverage is complete."""
        wild: dict[str, list[tuple[int, list]]] = {}
        for name, targets, line in source.wildcards:
            if source.first_wins and name[2:] in wild:
                self.warn(f"{source.origin(line)}: duplicate key {name!r} ignored (the first "
                          "one wins)")
                continue
            self.aliases += 1
            wild.setdefault(name[2:], []).append((s << 32 | line, targets))  # ("*": under "")
        star = wild.pop("", ())
        domains = [(d, f"*@{d}", rows) for d, rows in wild.items()]
        domains.extend((d, "*", [(e, [t if "@" in t or t[0] in "|/:" else f"{t}@{d}"
                                      for t in targets]) for e, targets in star])
                       for d in (sorted(self.local_domains - wild.keys()) if star else ()))
        out = []
        for domain, name, rows in domains:
            node = self._new([name], WILD, False)
            out.extend((node, targets, e) for e, targets in rows)
            self._cover.setdefault(domain, []).append((s, node, rows[0][0]))
        return out

    def _targets(self, s: int, source: Source, enode) -> None:
        """Edges for all targets of one source (the first one's entry ``i`` is node ``i``)."""
        same = enode == range(len(enode))
        chunks, source.chunks = source.chunks[::-1], []  # (consumed: the most memory)
        while chunks:
            targets, entries = chunks.pop()
            targets = targets.split(",") if isinstance(targets, str) and targets else targets or []
            self._resolve(targets, entries if same else list(map(enode.__getitem__, entries)),
                          list(map(operator.add, entries, repeat((s << 32) + 1)))
                          if self.detail else ())
        for text, entry in zip(source.end_targets, source.end_owners, strict=False):  # (detail)
            self._edges((enode[entry],), (self._preds[self._new([text], END, False)],),
                        ((s << 32) + entry + 1,))

    def _resolve(self, targets: list[str], owners: list[int], entries) -> None:
        """Edges from ``owners`` to ``targets``, in bulk: a target that is a node already (a
        key, mostly) is followed; any other is classified by its domain."""
        ids = self._ids
        if self.detail:  # (every target is a node: make the new ones, then link them all)
            texts = list(compress(targets, map(operator.not_, map(ids.__contains__, targets))))
            local = list(map(self.local_domains.__contains__, _domains(texts)))
            self._new(dict.fromkeys(compress(texts, local)), LOCAL)
            self._new(dict.fromkeys(compress(texts, map(operator.not_, local))), EXTERNAL)
            return self._edges(owners, map(ids.__getitem__, targets), entries)
        collections.deque(map(list.append, map(ids.__getitem__, targets), owners), maxlen=0)
        if not ids.missing:
            return
        # an external one makes its owner a seed; a mailbox a wildcard covers resolves as
        # any address of its domain that is a key nowhere: to the domain's probe
        texts, owned, ids.missing = ids.missing, ids.trash[1:], []
        del ids.trash[1:]
        domains = list(_domains(texts))
        local = list(map(self.local_domains.__contains__, domains))
        self._seeds.extend(compress(owned, map(operator.not_, local)))
        mask = list(map(operator.and_, local, map(self._probes.__contains__, domains)))
        if any(mask):
            self._mailboxes.append("\n".join(compress(texts, mask)))
            self._edges(compress(owned, mask), map(self._preds.__getitem__, map(
                self._probes.__getitem__, compress(domains, mask))), ())

    def _coverage(self, keyed: list) -> None:
        """Every local address that is not a key in a source with a wildcard for its
        domain resolves through that wildcard (``lsearch*@``: exact key first)."""
        if not self._cover:
            return
        domains = list(map({d: d for d in self._cover}.get, _domains(self._names)))  # (or None)
        self._covered = bytes(map(operator.gt, map(bool, domains), self._kind))  # (LOCAL: 0)
        covered = list(compress(range(len(domains)), self._covered))
        self._covered_domains = domains = list(compress(domains, self._covered))
        for s in {s for wildcards in self._cover.values() for s, _w, _e in wildcards}:
            wild = {d: (w, e) for d, rows in self._cover.items() for t, w, e in rows if t == s}
            keys = keyed[s] if isinstance(keyed[s], range) else set(keyed[s])
            mask = list(map(operator.and_, map(wild.__contains__, domains), map(
                operator.not_, map(keys.__contains__, covered))))
            pairs = list(map(wild.__getitem__, compress(domains, mask)))
            self._edges(compress(covered, mask), map(self._preds.__getitem__, map(
                itemgetter(0), pairs)), map(itemgetter(1), pairs))

    # --------------------------------------------------------------- output --
    def entries(self) -> list[str]:
        """Sorted map entries: lower-cased addresses and ``@domain`` lines (see module doc);
        warnings for addresses that cannot be written (``#`` or white space in them: left
        out) and for ``@domain`` over-matches."""
        # a local node that forwards (reached 1 > kind LOCAL 0), or a mailbox whose probe does
        domains = {d for d, probe in self._probes.items() if self.reached[probe]}
        names = compress(self._names, map(operator.gt, self.reached, self._kind))
        mailboxes: set[str] = set()
        for chunk in map(str.split, self._mailboxes if domains else (), repeat("\n")):
            mailboxes.update(compress(chunk, map(domains.__contains__, _domains(chunk))))
        names = chain(names, mailboxes)
        out = sorted(set(map(str.lower, names)) if self.case_sensitive else names)
        if any(map("".join(out).__contains__, _UNWRITABLE)):  # (rare: only quoted keys)
            for address in [a for a in out if not _UNWRITABLE.isdisjoint(a)]:
                self.warn(f"{address!r} forwards but cannot be written to the map ('#' or "
                          "white space in it)")
                out.remove(address)
        if domains:
            covered = compress(range(len(self._covered)), self._covered)
            for u, domain in zip(covered, self._covered_domains, strict=False):
                if domain in domains and not self.reached[u]:
                    self.warn(f"{self._names[u]} does not forward, but the map's @{domain} "
                              "entry matches it (a domain wildcard forwards; the map has no "
                              "exceptions)")
            out.extend(f"@{d}" for d in domains)
            out.sort()
        return out

    def map_data(self) -> MapData:
        entries = self.entries()  # (may add warnings)
        return MapData(map_body(entries), len(entries), self.aliases, self.targets,
                       self.sources, tuple(self.warn.first), self.warn.count)

    def is_forwarding(self, address: str) -> bool:
        """Whether a normalised address (addresses.normalize) is a forwarding address."""
        node = self._ids.get(address)
        if node is not None:
            return self._kind[node[0]] == LOCAL and bool(self.reached[node[0]])
        probe = self._probes.get(address[address.rfind("@") + 1:])
        return probe is not None and bool(self.reached[probe])

    # -------------------------------------------------------------- explain --
    def _origin(self, entry: int) -> str:
        name, prefix = self._sources[entry >> 32]
        return f"{name}:{prefix}{entry & 0xFFFFFFFF}"

    def _out(self) -> list[list[int]]:
        """Forward adjacency: per node, the indices of its edges (built on first use)."""
        if self._forward is None:
            self._forward = [[] for _ in self._names]
            collections.deque(map(list.append, map(self._forward.__getitem__, self._esrc),
                                  range(len(self._esrc))), maxlen=0)
        return self._forward

    def explain(self, address: str) -> Explanation:
        """Chains from ``address`` to each external target it reaches (shortest first, one
        per target), or why it does not forward.  Needs a ``detail`` graph."""
        if not self.detail:
            raise RuntimeError("explain needs a graph built with detail=True")
        try:
            local, domain = parse_address(address.strip())
            if domain is None:
                raise ValueError("no domain")
        except ValueError as exc:
            return Explanation(address, False, (), f"not an address: {exc}")
        addr = normalize(local, domain, self.case_sensitive)
        domain = addr[addr.rfind("@") + 1:]
        if domain not in self.local_domains:
            return Explanation(addr, False, (), f"{domain} is not a local domain: "
                               "mail to it leaves this server without any alias lookup")
        start = self._ids.get(addr, [-1])[0]
        if start < 0 or self._kind[start] != LOCAL:
            start = self._probes.get(domain, -1)
            if start < 0:
                return Explanation(addr, False, (), "local mailbox: not a key in any source"
                                   " and no wildcard covers its domain")
        out, edst = self._out(), self._edst
        parent = {start: -1}  # breadth-first: the shortest chain to each node
        order = [start]
        for u in order:
            for e in out[u]:
                if edst[e] not in parent:
                    parent[edst[e]] = e
                    order.append(edst[e])
        externals = [v for v in order if self._kind[v] == EXTERNAL]
        if not externals:
            return Explanation(addr, False, (), self._why_not(addr, start, order, parent))
        n = len(externals)
        return Explanation(addr, True, tuple(self._chain(addr, start, v, parent)
                                             for v in externals),
                           f"forwards to {n} external address{'es' if n > 1 else ''}")

    def _chain(self, query: str, start: int, target: int,
               parent: dict[int, int]) -> tuple[Hop, ...]:
        edges = []
        while target != start:
            edges.append(parent[target])
            target = self._esrc[parent[target]]
        hops: list[Hop] = []
        current = key = query
        for e in reversed(edges):
            v = self._edst[e]
            if self._kind[v] == WILD:
                key = self._names[v]
                continue  # a wildcard is a lookup step, not an address of the chain
            hops.append(Hop(current, self._origin(self._eent[e]), key))
            current = key = self._names[v]
        hops.append(Hop(current, None, None))
        return tuple(hops)

    def _why_not(self, addr: str, start: int, order: list[int],
                 parent: dict[int, int]) -> str:
        out, kind, names = self._out(), self._kind, self._names
        reasons = []
        if kind[start] == LOCAL and not out[start]:
            reasons.append("its entry has no targets (the router declines: local delivery)"
                           if start < self._key_end else "local mailbox: not a key in any source")
        else:
            cycle = self._cycle(start)
            if cycle:
                shown = " -> ".join(addr if n == start else names[n] for n in cycle)
                reasons.append(f"cycle without exit: {shown} (Exim delivers an address that"
                               " loops back locally)")
            ends = [f"{names[v]} ({self._origin(self._eent[parent[v]])})" if kind[v] == END
                    else f"mailbox {names[v]}" for v in order
                    if kind[v] == END or (kind[v] == LOCAL and not out[v] and v != start)]
            if ends:
                reasons.append("only local ends: " + ", ".join(ends[:10])
                               + (f" and {len(ends) - 10} more" if len(ends) > 10 else ""))
        domain = addr[addr.rfind("@") + 1:]
        if domain in self._probes and self.reached[self._probes[domain]]:
            reasons.append(f"note: the map's @{domain} entry matches it anyway (a wildcard "
                           "of that domain forwards)")
        return "; ".join(reasons) or "no external target"

    def _cycle(self, start: int) -> list[int] | None:
        """A cycle reachable from ``start`` (iterative DFS), as a node list a..a."""
        out, edst = self._out(), self._edst
        colour = {start: 1}  # 1 = on the stack, 2 = done
        stack = [(start, 0)]
        while stack:
            u, i = stack[-1]
            if i == len(out[u]):
                colour[u] = 2
                stack.pop()
                continue
            stack[-1] = (u, i + 1)
            v = edst[out[u][i]]
            if colour.get(v) == 1:
                path = [n for n, _ in stack]
                return path[path.index(v):] + [v]
            if v not in colour:
                colour[v] = 1
                stack.append((v, 0))
        return None
