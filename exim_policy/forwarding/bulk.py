"""Map builds of one large alias file in two processes, each half resolved where it is read.

The general route (sources.parse_lsearch -> graph.GraphBuilder) parses the two halves of a
large file in two processes but builds the whole graph in one: the key index, two million
target lookups, the search and the output all run serially after the parse.  For the
common shape of a large file -- one lsearch source of full-address keys, as a control
panel writes it -- this module keeps the second core busy for nearly all of it:

1. The parent reads the file, notes the domains of its ``*@domain`` keys and forks.
2. Each process takes its half (cut at the start of an entry), lower-cases it and reads
   its *regular* lines (``key: a@x, b@y``, also continued on indented lines, also with
   pipes and files) in bulk, every other entry through the general route's item scanner.
   External targets only make their owner a seed of the search.  Each half indexes its
   own keys, resolves its local targets against them and gives the backward search from
   its seeds a head start over those edges.
3. The halves swap the targets they have no key for (of owners not yet known to forward)
   and resolve the other's against their own index: a local address that is a key nowhere
   is a mailbox or, in a domain with a wildcard, an edge to that wildcard.
4. The parent finishes the search over the edges that are left (graph.reach).  Each
   process then sorts one key range of the map, with the names of both halves in it, and
   the parent puts the two parts together.

Node ids are 0-based line numbers, so both processes agree on them without talking; only
int arrays, byte masks and joined byte strings cross the pipe.  The work is on bytes, not
text (the file is ASCII): a million bytes objects are split, hashed and looked up faster.
Figures: bench/bench_forwarding.py, in the README.

Anything this route does not handle in bulk -- several sources, a key in both halves,
keys outside the local domains, bare local parts, non-ASCII text, ``:include:``, a ``*`` key,
a bad line (whose exact error the general route reports), a child process that dies --
makes it step back (:func:`map_data` returns None) and the caller takes the general route,
which then gives the same result, warnings and errors as always.  tests/test_forwarding_bulk.py
compares the two routes on generated, hand-written and random inputs.
"""
from __future__ import annotations

import bisect
import collections
import gc
import multiprocessing
import operator
import re
import signal
import threading
from array import array
from itertools import chain, compress, repeat

from ..config import ForwardingConfig
from . import sources
from .graph import GraphBuilder, MapData, over_match_warning, reach, unwritable
from .sources import SPECIAL_START, Batch, ForwardingError

#: files with fewer lines take the general route: they build in well under 0.1 s either
#: way (measured with bench/bench_forwarding.py: 20,000 aliases in 0.05 s)
MIN_LINES = 20_000

#: lines with these go to the item scanner (pipes and files, also scanner characters in
#: the general route, are plain items here: see _Half._regular_targets)
_SCAN_CHARS = b'"\\<(#*'
#: characters that no key or target in a regular line may contain (white space, what
#: the scanner characters leave of sources._BAD_CHARS), one bytes object each
_BAD_CHARS = [bytes([c]) for c in b" \t\r\f\v;>)[]"]
_WHITE_SPACE = frozenset(bytes([c]) for c in sources._WS.encode())
_NOT_COLON_OR_NEWLINE = bytes(c for c in range(256) if c not in b":\n")
_COMMA_SPACE = re.compile(rb"[ \t]*,[ \t]*")
_DOMAINS_NL = re.compile(rb"@([^\n]*)").findall
_DOMAINS_COMMA = re.compile(rb"@([^,]*)").findall


class _StepBack(Exception):
    """This input needs the general route (see the module docstring)."""


def map_data(config: ForwardingConfig, local: frozenset[str], warnings: GraphBuilder, *,
             min_lines: int = MIN_LINES, insist: bool = False) -> MapData | None:
    """The map of ``config``'s single lsearch source, or None when the general route must
    build it.  ``warnings`` already holds the warnings of reading the local domains.

    The route forks, so it is not taken while other threads run: fork() copies only the
    calling thread, and a lock another thread holds would stay locked in the child.
    ``insist`` forks anyway (for tests, whose fixtures run threads; the child runs only
    this module's code, as sources.parse_lsearch's second process does)."""
    if (len(config.sources) != 1 or config.case_sensitive_local_parts
            or config.sources[0].type != "lsearch" or config.sources[0].domain
            or (threading.active_count() > 1 and not insist)
            or "fork" not in multiprocessing.get_all_start_methods()):
        return None
    path = config.sources[0].path
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError:
        return None  # the general route reports it
    if len(raw) < min_lines or not raw.isascii():  # (see _two_halves for min_lines)
        return None
    was_enabled = gc.isenabled()
    gc.disable()  # millions of new objects and no cycles (see build._gc_paused)
    try:
        return _two_halves(path, [raw], local, warnings, min_lines)
    except _StepBack:
        return None
    finally:
        if was_enabled:
            gc.enable()


def _wildcards(raw: bytes, local: frozenset[str]) -> frozenset[str]:
    """The domains of the file's ``*@domain`` keys (their lines are the scanner's, and
    each half notes their nodes, see _Half.cover).  A ``*`` key, a wildcard of another
    domain or a second one of a domain makes the route step back."""
    starts = [0] if raw[:1] in (b"*", b'"') else []
    for char in (b"*", b'"'):  # (rare characters: find() skips to each in no time)
        pos = raw.find(char, 1)
        while pos >= 0:
            if raw[pos - 1] == 10:  # a newline before it
                starts.append(pos)
            pos = raw.find(char, pos + 1)
    cover = set()
    for pos in starts:
        end = raw.find(b"\n", pos)
        text = raw[pos:end if end >= 0 else len(raw)].lower().decode("ascii")
        raw_key, rest = sources.line_key(text)
        try:
            key = sources._key(raw_key, "", False) if rest >= 0 else None
        except ValueError:
            raise _StepBack from None
        if key is None or key[0] != "*":
            continue
        domain = key[2:]
        if key == "*" or domain not in local or domain in cover:
            raise _StepBack  # the general route handles (and warns about) these
        cover.add(domain)
    return frozenset(cover)


#: where the second half starts: the start of a key line (not white space or a comment),
#: so that no entry spans the cut
_ENTRY_START = re.compile(rb"\n(?=[^\s#])")
#: the second process's part of the file (measured: more than half makes the parent wait
#: for the child at the swap, less makes the child's answers late at the end)
CHILD_SHARE = 0.5


#: regular lines are read in chunks of this many (see _Half._lines)
CHUNK_LINES = 4096
#: bulk passes over each half's edges before the swap (see _head_start; measured: two
#: leave about 40 % of the edges for the parent's search, more passes save less than
#: they cost)
HEAD_START_ROUNDS = 2
#: ... and over all edges left before the parent's search (the same trade)
FINAL_ROUNDS = 2


def _split_point(raw: bytes) -> int:
    m = _ENTRY_START.search(raw, int(len(raw) * (1 - CHILD_SHARE)))
    return m.start() + 1 if m else 0


class _Half:
    """One half of the file: parsed, indexed, resolved against itself and searched (a
    head start).  Only the scanner's entries, a few domains and warnings are decoded."""

    def __init__(self, path: str, box: list[bytes], base: int, local: frozenset[str],
                 covered: frozenset[str]) -> None:
        """``box``: a one-item list with the half's bytes (emptied, so that they can be
        freed early)."""
        self.base = base
        self.local = local
        self.local_b = _ascii_set(local)
        self.covered_b = _ascii_set(covered)
        #: ``*@domain`` -> its node (line), for the wildcards of this half, then (once the
        #: halves have swapped theirs, see :meth:`add_wildcards`) of the whole file
        self.cover: dict[bytes, int] = {}
        self.warnings: list[str] = []  # the scanner's
        self.targets = 0  # targets read
        #: 1 for the nodes known to forward: at first the seeds, owners of an external
        #: target, whose other targets can add nothing to the search (and are dropped)
        self.reached = bytearray()
        self.esrc, self.edst = array("i"), array("i")
        self.candidates: list[bytes] = []  # local targets in a domain with a wildcard
        #: ``(node, key)`` of the keys in a domain with a wildcard (see :meth:`names`)
        self.covered_keys: list[tuple[int, bytes]] = []
        #: mailboxes in a domain with a wildcard (forwarding when their wildcard does)
        self.covered: list[bytes] = []
        self.covered_nodes = array("i")
        self.keys: list[bytes] = []
        self.key_ids: list[int] = []  # (a list: the index shares its int objects)
        self.scanned_keys = 0  # where the scanner's keys start in self.keys
        groups, scanned = self._lines(box.pop())
        local_targets: list[bytes] = []
        local_owners = array("i")
        while groups:
            ids, joined = groups.pop(0)
            keys, datas = self._split(joined, ids)
            del joined
            targets, owners = self._regular_targets(datas, ids)
            del datas
            self.keys.extend(keys)
            self.key_ids.extend(ids)
            local_targets.extend(targets)
            local_owners.extend(owners)
            del keys, ids, targets, owners
        self._scanned(path, scanned, local_targets, local_owners)
        del scanned
        self.index = dict(zip(self.keys, self.key_ids))
        #: ``file:line: duplicate key ...`` warnings, in line order
        self.duplicates: list[str] = []
        if len(self.index) != len(self.keys):
            self._first_keys_win(path)
        #: targets without a key here that a wildcard covers: the general route lists such
        #: mailboxes when their wildcard forwards (the other half lists those that are not
        #: keys there either)
        self.candidates = list(dict.fromkeys(compress(self.candidates, map(
            operator.not_, map(self.index.__contains__, self.candidates)))))
        self._resolve_own(local_targets, local_owners)

    def _first_keys_win(self, path: str) -> None:
        """A key on several lines: the first line wins (Exim's lsearch), the others are
        ignored with a warning, as the general route does.  Their own targets stay (an
        ignored entry's edges lead nowhere anyone looks), nothing resolves to them."""
        counts = collections.Counter(self.keys)
        twice = {key for key, count in counts.items() if count > 1}
        del counts
        ignored = {}
        for node, key in sorted(compress(zip(self.key_ids, self.keys),  # (in line order)
                                         map(twice.__contains__, self.keys))):
            if key in twice:
                twice.discard(key)
                self.index[key] = node  # the first
            else:
                ignored[node] = key
        self.duplicates = [f"{path}:{node + 1}: duplicate key {key.decode()!r} ignored "
                           "(the first one wins)" for node, key in ignored.items()]
        keep = list(map(operator.not_, map(ignored.__contains__, self.key_ids)))
        self.scanned_keys = sum(keep[:self.scanned_keys])
        self.keys = list(compress(self.keys, keep))
        self.key_ids = list(compress(self.key_ids, keep))
        self.covered_keys = [(node, key) for node, key in self.covered_keys
                             if node not in ignored]

    def _lines(self, text: bytes) -> tuple[list, list]:
        """The half's text -> the two groups of regular lines, each ``(nodes, lines
        joined by colons)``, and the scanner's entries ``(key line, first line, lines)``
        (see _line_kinds).  Sets ``self.lines``, and sizes ``self.reached`` to match."""
        text = text.lower()  # ASCII only (as the map compares)
        scan_lines, end_lines = _char_lines(text, _SCAN_CHARS, b"|/")
        # lines without exactly one colon: the text's colons and newlines alone, split
        # into lines, are b":" for those that have one (a cached one-byte object each)
        odd = list(map(operator.ne, text.translate(None, _NOT_COLON_OR_NEWLINE).split(b"\n"),
                       repeat(b":")))
        lines = text.split(b"\n")
        del text
        if lines and not lines[-1]:
            lines.pop()  # the newline that ends the last line
            odd.pop()
        base = self.base
        self.lines = len(lines)
        self.reached = bytearray(base + self.lines)
        regular, ends, entries = _line_kinds(lines, odd, scan_lines, end_lines)
        # in chunks: the lists made of each are smaller (less memory at the peak) and
        # stay warmer in the caches
        ids = list(compress(range(base, base + len(lines)), regular))
        texts = list(compress(lines, regular))
        groups = [(ids[i:i + CHUNK_LINES], _join(b":", texts[i:i + CHUNK_LINES]))
                  for i in range(0, len(ids), CHUNK_LINES)]
        del ids, texts
        groups.append(([base + i for i in ends], _join(b":", list(map(lines.__getitem__,
                                                                       ends)))))
        scanned = [(i, first, [line.decode("ascii") for line in lines[first:last + 1]])
                   for i, (first, last) in entries.items()]
        if any(":include:" in line for _i, _first, text in scanned for line in text):
            raise _StepBack  # (its file name was lower-cased here)
        return groups, scanned

    def _resolve_own(self, local_targets: list[bytes], local_owners: array) -> None:
        """Edges to this half's keys, the head start of the search over them, and what is
        left for the other half: targets without a key here, of owners that do not
        forward yet."""
        missing = list(map(operator.not_, resolve(self.index, local_targets, local_owners,
                                                  self.esrc, self.edst)))
        targets = list(compress(local_targets, missing))
        owners = array("i", compress(local_owners, missing))
        del local_targets, local_owners, missing
        self.esrc, self.edst = _head_start(self.reached, self.esrc, self.edst)
        live = list(map(operator.not_, map(self.reached.__getitem__, owners)))
        self.unresolved = list(compress(targets, live))
        self.unresolved_owners = array("i", compress(owners, live))

    def _split(self, joined: bytes, ids: list[int]) -> tuple[list[bytes], list[bytes]]:
        """Regular lines joined by colons (each has one colon of its own) -> keys and
        data; every key must be one plain ``local@domain`` of a local domain (else: the
        general route)."""
        if not joined:
            return [], []
        parts = joined.split(b":")
        keys, datas = parts[0::2], parts[1::2]
        del parts
        if len(keys) != len(ids) or len(datas) != len(keys):
            raise _StepBack
        joined = _join(b"\n", keys)
        domains = _DOMAINS_NL(joined)
        # one "@" in each key, after a local part, before a local domain (so a valid one)
        if (joined.count(b"@") != len(keys) or len(domains) != len(keys)
                or not all(map(self.local_b.__contains__, domains))
                or not _plain(joined) or b"\n@" in joined or joined.startswith(b"@")):
            raise _StepBack
        if self.covered_b:
            covered = list(map(self.covered_b.__contains__, domains))
            self.covered_keys.extend(zip(compress(ids, covered), compress(keys, covered)))
        return keys, datas

    def _regular_targets(self, datas: list[bytes], ids: list[int]
                         ) -> tuple[list[bytes], array]:
        """Split, check and classify the targets of regular lines (``ids``) in bulk:
        external ones make their owner a seed; returns the local ones of the other owners,
        and those owners."""
        counts = map(operator.add, map(bytes.count, datas, repeat(b",")), repeat(1))
        owners = list(chain.from_iterable(map(repeat, ids, counts)))
        joined = _normalise(_join(b",", datas))
        datas.clear()
        if not _plain(joined):
            raise _StepBack
        targets = joined.split(b",")
        keep = None
        if targets.count(b""):  # empty items (a trailing comma, no value) are ignored
            keep = list(map(bool, targets))
        if b"|" in joined or b"/" in joined:  # (only in the few lines of the second group)
            # pipes and files (no "@" in them, as the scanner would see it) are local ends:
            # counted, then left out
            ends = list(map(bytes.startswith, targets, repeat((b"|", b"/"))))
            if any(map(operator.contains, compress(targets, ends), repeat(b"@"))):
                raise _StepBack
            self.targets += sum(ends)
            keep = list(map(operator.not_, ends)) if keep is None else list(
                map(operator.and_, keep, map(operator.not_, ends)))
            joined = _join(b",", list(compress(targets, keep)))
        if keep is not None:
            owners = list(compress(owners, keep))
            targets = list(compress(targets, keep))
            del keep
        domains = _DOMAINS_COMMA(joined)
        # one "@" in each target, after a local part ("a@b" or bare local parts, which
        # the key's domain qualifies, take the general route); the domains are checked
        # below (local ones are valid)
        if (len(domains) != len(targets) or joined.count(b"@") != len(targets)
                or b",@" in joined or joined.startswith(b"@")):
            raise _StepBack
        del joined
        self.targets += len(targets)
        local = list(map(self.local_b.__contains__, domains))
        external = set(domains).difference(self.local_b)
        if self.covered_b:
            self.candidates.extend(compress(targets, map(self.covered_b.__contains__,
                                                         domains)))
        del domains
        if not all(map(sources.is_domain, map(bytes.decode, external))):
            raise _StepBack  # (local domains are valid)
        collections.deque(map(self.reached.__setitem__, compress(
            owners, map(operator.not_, local)), repeat(1)), maxlen=0)
        # (an owner's targets are all in its own line, so its seed mark is final here)
        keep = list(map(operator.and_, local, map(operator.not_, map(
            self.reached.__getitem__, owners))))
        return list(compress(targets, keep)), array("i", compress(owners, keep))

    def _scanned(self, path: str, scanned: list, local_targets: list[bytes],
                 local_owners: array) -> None:
        """The scanner's entries ``(key line, first line, lines)``, read with the general
        route's own code: keys, wildcards and targets, added to the columns."""
        if not scanned:
            return
        batch = Batch(path)
        batch.keys = [None] * self.lines
        try:
            sources._scan_entries(batch, path, scanned, self.base, "", False,
                                  self.warnings.append)
        except ForwardingError:
            raise _StepBack from None  # the general route reports it
        base = self.base
        self.scanned_keys = len(self.keys)  # (where they start in self.keys)
        for i, key in enumerate(batch.keys):
            if key is not None:
                domain = key[key.rfind("@") + 1:]
                if domain not in self.local:
                    raise _StepBack  # the general route warns about it
                key = _ascii(key)
                self.keys.append(key)
                self.key_ids.append(base + i)
                if key[key.rfind(b"@") + 1:] in self.covered_b:
                    self.covered_keys.append((base + i, key))
        entries = list(zip(map(operator.add, batch.owners, repeat(base)), batch.targets))
        for key, targets, line in batch.wildcards:
            domain = _ascii(key[2:])
            if domain not in self.covered_b or domain in self.cover:
                raise _StepBack  # (not seen as one by _wildcards)
            self.cover[domain] = line - 1
            entries.extend(zip(repeat(line - 1), targets))
        self.targets += len(entries)
        reached = self.reached
        found: list[tuple[int, bytes]] = []
        for owner, target in entries:
            if target[0] in SPECIAL_START:
                if target[0] != "\\":
                    continue  # pipes, files, :blackhole: and the like: local ends
                target = target[1:]  # \address: no further redirection
                if "@" in target and target[target.rfind("@") + 1:] not in self.local:
                    reached[owner] = 1  # ... but an external one still leaves
                continue
            domain = target[target.rfind("@") + 1:]
            if domain not in self.local:
                reached[owner] = 1
                continue
            target = _ascii(target)
            if b"\n" in target or target.count(b"@") != 1:
                raise _StepBack  # (a quoted local part: the halves split and parse less)
            found.append((owner, target))
            if target[target.rfind(b"@") + 1:] in self.covered_b:
                self.candidates.append(target)
        for owner, target in found:  # (the seeds of these entries are all known now)
            if not reached[owner]:
                local_targets.append(target)
                local_owners.append(owner)

    def add_wildcards(self, other: dict[bytes, int]) -> None:
        """The other half's wildcards: together, all that _wildcards found."""
        self.cover.update(other)
        if self.cover.keys() != self.covered_b:
            raise _StepBack

    def resolve_other(self, targets: bytes, owners: array, candidates: bytes) -> None:
        """The other half's leftovers (joined by newlines): edges to keys of this half,
        or, for a mailbox in a domain with a wildcard, to that wildcard; ``candidates``
        are the rest of its targets in such domains (the mailboxes among them are noted)."""
        joined, targets = targets, targets.split(b"\n") if targets else []
        found = resolve(self.index, targets, owners, self.esrc, self.edst)
        if not self.cover:
            return
        # a mailbox (no key here either) in a domain with a wildcard: an edge to it
        wild = list(map(self.cover.get, _DOMAINS_NL(joined)))
        del joined
        covered = list(map(operator.and_, map(operator.is_not, wild, repeat(None)),
                           map(operator.not_, found)))
        self.esrc.extend(compress(owners, covered))
        self.edst.extend(compress(wild, covered))
        self.covered.extend(compress(targets, covered))
        self.covered_nodes.extend(compress(wild, covered))
        if candidates:
            wild = list(map(self.cover.__getitem__, _DOMAINS_NL(candidates)))
            candidates = candidates.split(b"\n")
            mailboxes = list(map(operator.not_, map(self.index.__contains__, candidates)))
            self.covered.extend(compress(candidates, mailboxes))
            self.covered_nodes.extend(compress(wild, mailboxes))

    def names(self, reached: bytearray, pivot: bytes
              ) -> tuple[tuple[list[bytes], set[bytes]], tuple[list[bytes], set[bytes]],
                         list[str], list[str]]:
        """This half's part of the map below ``pivot`` and from it: each its forwarding
        keys (sorted) and its other entries (the mailboxes it found under a forwarding
        wildcard, which the general route lists too, and the ``@domain`` lines of the
        forwarding wildcards); the entries that may not be writable to the map (only the
        scanner's may have white space or ``#``); and its over-match warnings, in line
        order."""
        is_reached = list(map(reached.__getitem__, self.key_ids))
        keys = sorted(compress(self.keys, is_reached))
        cut = bisect.bisect_left(keys, pivot)
        mailboxes = set(compress(self.covered, map(reached.__getitem__, self.covered_nodes)))
        domains = {d for d, node in self.cover.items() if reached[node]}
        extra = mailboxes.union(b"@" + d for d in domains)
        low = {e for e in extra if e < pivot}
        suspects = [k.decode() for k in chain(compress(self.keys[self.scanned_keys:],
                                                       is_reached[self.scanned_keys:]),
                                              mailboxes)]
        over = sorted((node, key.decode()) for node, key in self.covered_keys
                      if not reached[node] and key[key.rfind(b"@") + 1:] in domains)
        return ((keys[:cut], low), (keys[cut:], extra - low), suspects,
                [over_match_warning(key, key[key.rfind("@") + 1:]) for _node, key in over])


def _head_start(reached: bytearray, esrc: array, edst: array,
                rounds: int = HEAD_START_ROUNDS) -> tuple[array, array]:
    """A head start on the search (graph.reach finishes it): ``rounds`` bulk passes over
    the edges, each marking in ``reached`` the owners of the edges into marked nodes;
    returns the edges whose owner is not marked yet.  Most owners are marked in the
    first passes, and a pass is much cheaper than building the reverse adjacency that
    graph.reach needs for the rest.  (No edge may leave a marked node.)"""
    one = repeat(1)
    for _ in range(rounds):
        hit = list(compress(esrc, map(reached.__getitem__, edst)))
        if not hit:
            break
        collections.deque(map(reached.__setitem__, hit, one), maxlen=0)
        live = list(map(operator.not_, map(reached.__getitem__, esrc)))
        esrc = array("i", compress(esrc, live))
        edst = array("i", compress(edst, live))
    return esrc, edst


def _join(separator: bytes, items: list[bytes], chunk: int = 8192) -> bytes:
    """``separator.join(items)`` for hundreds of thousands of items, three times faster:
    bytes.join first makes a buffer record of 80 bytes per item (tens of megabytes of
    fresh memory here); in chunks that memory stays small and warm."""
    if len(items) <= chunk:
        return separator.join(items)
    return separator.join([separator.join(items[i:i + chunk])
                           for i in range(0, len(items), chunk)])


def _ascii(text: str) -> bytes:
    """An address from the scanner, as bytes like the rest of the half."""
    try:
        return text.encode("ascii")
    except UnicodeEncodeError:  # (a guard: the file is ASCII, so is what it parses into)
        raise _StepBack from None


def _ascii_set(names: frozenset[str]) -> frozenset[bytes]:
    """``names`` as bytes (those that are not ASCII cannot be in an ASCII file)."""
    return frozenset(n.encode("ascii") for n in names if n.isascii())


def _char_lines(text: bytes, *char_sets: bytes) -> tuple[set[int], ...]:
    """Per set of characters, the 0-based numbers of the lines of ``text`` with any of
    them (rare characters: find() skips to each at memchr speed, much faster than a regex
    scan)."""
    places = []
    for k, chars in enumerate(char_sets):
        for char in chars:
            pos = text.find(char)
            while pos >= 0:
                places.append((pos, k))
                pos = text.find(10, pos)  # one per line is enough
                if pos < 0:
                    break
                pos = text.find(char, pos)
    out: tuple[set[int], ...] = tuple(set() for _ in char_sets)
    line = last = 0
    for pos, k in sorted(places):
        line += text.count(b"\n", last, pos)
        last = pos
        out[k].add(line)
    return out


def _line_kinds(lines: list[bytes], irregular: list[bool], scan_lines: set[int],
                end_lines: set[int]) -> tuple[list[bool], list[int], dict[int, list[int]]]:
    """Sort the lines for the three ways of reading them:

    - *regular* key lines (``key: a@x, b@y``: one colon, none of the scanner's characters,
      not a wildcard), as a mask;
    - regular key lines that have pipes or files (``|`` or ``/``) too, as a list;
    - the scanner's entries: ``{key line: [first, last]}``, a key line with its
      continuation lines.

    A regular key line's plain continuations (no colon, no scanner character) are appended
    to it here, joined with one blank as Exim joins them; any other continuation makes the
    whole entry the scanner's (see sources.irregular_entries).

    ``irregular`` marks the lines without exactly one colon (it is updated in place),
    ``scan_lines`` are those with a scanner character (``#``, ``"`` and ``*`` among them),
    ``end_lines`` those with ``|`` or ``/``.  The only other lines that start with an
    unusual character are empty, or start with white space: those without one colon are
    caught here, those with one end up with white space in their key, which _Half._split
    refuses.
    """
    for i in scan_lines:
        irregular[i] = True
    entries, continued = sources.irregular_entries(
        lines, irregular, lambda i, stripped: i not in scan_lines and b":" not in stripped,
        b"#", _WHITE_SPACE)
    ends = set(end_lines)
    for i, more in continued.items():  # (regular key lines only: the scanner reads its own)
        lines[i] = b" ".join([lines[i].rstrip(), *(lines[k].strip() for k in more)])
        if not end_lines.isdisjoint(more):
            ends.add(i)
    ends = sorted(i for i in ends if not irregular[i])
    for i in ends:
        irregular[i] = True  # (for the mask of the first kind)
    return list(map(operator.not_, irregular)), ends, entries


def _plain(joined: bytes) -> bool:
    """None of ``_BAD_CHARS`` in ``joined`` (one ``in`` -- a memchr -- each is several
    times faster than a regex's scan of megabytes)."""
    return not any(map(joined.__contains__, _BAD_CHARS))


def _normalise(joined: bytes) -> bytes:
    """``a@x, b@y ,c@z`` -> ``a@x,b@y,c@z`` (and no blanks at either end)."""
    joined = joined.strip(b" \t").replace(b", ", b",")
    if b" " in joined or b"\t" in joined:  # more blanks, or blanks before a comma
        joined = _COMMA_SPACE.sub(b",", joined)
    return joined


def resolve(index: dict[bytes, int], targets: list[bytes], owners: array, esrc: array,
            edst: array) -> list[bool]:
    """Append an edge ``owner -> index[target]`` for each target that is a key; returns
    per target whether it was one.  (In chunks, as _Half._lines reads lines.)"""
    out: list[bool] = []
    for i in range(0, len(targets), CHUNK_LINES):
        chunk = targets[i:i + CHUNK_LINES]
        ids = list(map(index.get, chunk))
        found = list(map(operator.is_not, ids, repeat(None)))
        esrc.extend(compress(owners[i:i + CHUNK_LINES], found))
        edst.extend(compress(ids, found))
        out.extend(found)
    return out


# ------------------------------------------------------------------- processes --
def _two_halves(path: str, box: list[bytes], local: frozenset[str],
                warnings: GraphBuilder, min_lines: int) -> MapData:
    raw = box.pop()
    split = _split_point(raw)
    base = raw.count(b"\n", 0, split)
    if not split or base < min_lines * (1 - CHILD_SHARE):  # (no need to count them all)
        raise _StepBack
    covered = _wildcards(raw, local)
    ctx = multiprocessing.get_context("fork")
    conn, child_conn = ctx.Pipe()
    args = [raw]
    proc = ctx.Process(target=_child, daemon=True,
                       args=(child_conn, path, args, split, base, local, covered))
    try:
        proc.start()
    except (OSError, AssertionError):  # no fork possible (or we are a daemonic process)
        conn.close()
        child_conn.close()
        raise _StepBack from None
    args.clear()  # the child has its own copy; ours would keep the whole file alive
    child_conn.close()
    try:
        head = [raw[:split]]
        del raw
        half = _Half(path, head, 0, local, covered)
        mine = ("unresolved", _join(b"\n", half.unresolved), half.unresolved_owners,
                _join(b"\n", half.candidates), half.cover, _join(b"\n", half.keys))
        half.unresolved = half.candidates = []
        _tag, targets, owners, candidates, wild = _receive(conn)
        _send(conn, mine)
        del mine
        half.add_wildcards(wild)
        half.resolve_other(targets, owners, candidates)
        del targets, owners, candidates
        (_tag, other_lines, other_keys, other_targets, esrc, edst, reached,
         scan_warnings, duplicates) = _receive(conn)
        n = half.lines + other_lines
        half.reached.extend(reached)  # the child's mask covers the lines from base on
        del reached
        half.esrc.extend(esrc)
        half.edst.extend(edst)
        del esrc, edst
        reached = half.reached
        # (edges out of marked nodes first: the other half marked some of them)
        live = list(map(operator.not_, map(reached.__getitem__, half.esrc)))
        esrc, edst = _head_start(reached, array("i", compress(half.esrc, live)),
                                 array("i", compress(half.edst, live)), FINAL_ROUNDS)
        del live
        half.esrc = half.edst = array("i")
        reached = reach(n, esrc, edst, compress(edst, map(reached.__getitem__, edst)),
                        reached)
        del esrc, edst
        # The map is sorted: each process sorts the names below (parent) or from (child)
        # a pivot, of both halves, so that the two parts only need to be put together.
        sample = sorted(half.keys[::101])
        pivot = sample[len(sample) // 2] if sample else b""
        del sample
        _send(conn, ("reached", reached, pivot))
        low, high, suspects, over = half.names(reached, pivot)
        half.index = {}  # (freed while the child still works)
        _tag, other_low, other_suspects, other_over = _receive(conn)
        _send(conn, ("high", (_join(b"\n", high[0]), high[1])))
        del high
        low = _merge(low, other_low)
        del other_low
        _tag, high, count = _receive(conn)
    finally:
        conn.close()
        if proc.is_alive():
            proc.terminate()
        proc.join(10)
    for message in chain(half.warnings, scan_warnings, half.duplicates, duplicates):
        warnings.warn(message)
    count += low.count(b"\n")
    body = (low + high).decode("ascii")
    del low, high
    bad = unwritable(chain(suspects, other_suspects), warnings.warn)
    if bad:  # (rare: only a quoted address can have white space or "#")
        entries = [entry for entry in body.split("\n")[:-1] if entry not in bad]
        body, count = "".join(f"{entry}\n" for entry in entries), len(entries)
    warnings.warn_all(over)
    warnings.warn_all(other_over)
    aliases = len(half.keys) + other_keys + len(half.cover)
    return MapData(body, count, aliases, half.targets + other_targets, 1,
                   tuple(warnings.warnings), warnings.warning_count)


def _merge(mine: tuple[list[bytes], set[bytes]], other: tuple[bytes, set[bytes]]) -> bytes:
    """One part of the map from both halves' sorted keys and (unsorted) other entries in
    it: the map's lines, each ending in a newline."""
    keys, extra = mine
    other_keys, other_extra = other
    keys.extend(other_keys.split(b"\n") if other_keys else ())
    keys.extend(extra.union(other_extra))
    if not keys:
        return b""
    keys.sort()  # (mostly two sorted runs: a merge)
    return _join(b"\n", keys) + b"\n"


def _send(conn, message: tuple) -> None:
    try:
        conn.send(message)
    except OSError:  # the other process is gone (it stepped back, or died)
        raise _StepBack from None


def _receive(conn) -> tuple:
    if not conn.poll(sources.PARALLEL_DEADLINE):
        raise _StepBack
    try:
        answer = conn.recv()
    except EOFError:  # the child died
        raise _StepBack from None
    if answer[0] == "step back":
        raise _StepBack
    return answer


def _child(conn, path: str, args: list[bytes], split: int, base: int,
           local: frozenset[str], covered: frozenset[str]) -> None:
    """The second half (see the module docstring).  It sends ``("unresolved", ...)``;
    given the parent's, ``("edges", ...)``; given the final mask and the pivot, ``("low",
    ...)``, its part of the map below the pivot; given the parent's part from the pivot on,
    ``("merged", ...)``, that part of the map; or at any point ``("step back", ...)``."""
    # Ctrl-C reaches the whole process group: the parent stops this process itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        half = _Half(path, [args.pop()[split:]], base, local, covered)
        _send(conn, ("unresolved", _join(b"\n", half.unresolved), half.unresolved_owners,
                     _join(b"\n", half.candidates), half.cover))
        half.unresolved = half.candidates = []
        _tag, targets, owners, candidates, wild, parent_keys = conn.recv()
        half.add_wildcards(wild)
        half.resolve_other(targets, owners, candidates)
        del targets, owners, candidates
        _send(conn, ("edges", half.lines, len(half.keys), half.targets, half.esrc,
                     half.edst, half.reached[base:], half.warnings, half.duplicates))
        # While the parent searches: a key in both halves?  The general route warns about
        # it (and the edges above may be wrong then, so nothing of this route is used).
        if parent_keys and not half.index.keys().isdisjoint(parent_keys.split(b"\n")):
            raise _StepBack
        del parent_keys
        half.index = {}
        _tag, reached, pivot = conn.recv()
        low, high, suspects, over = half.names(reached, pivot)
        _send(conn, ("low", (_join(b"\n", low[0]), low[1]), suspects, over))
        del low
        _tag, other_high = conn.recv()
        high = _merge(high, other_high)
        _send(conn, ("merged", high, high.count(b"\n")))
    except _StepBack:
        _last_word(conn, ("step back",))
    except Exception as exc:  # the general route meets it again and reports it
        _last_word(conn, ("step back", repr(exc)))
    finally:
        conn.close()


def _last_word(conn, message: tuple) -> None:
    try:
        conn.send(message)
    except OSError:
        pass  # the parent stepped back already
