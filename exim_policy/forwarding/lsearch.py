"""Exim lsearch alias files -> a :class:`~.graph.Source`: the one reader of them.

As Exim 4.96's ``lookups/lsearch.c``: trailing white space is dropped (CRLF is fine); empty
lines and ``#`` lines are comments; a line starting with white space continues the previous
key's data (joined with one blank) -- after a comment or empty line such lines are ignored,
as before any key; a key is a ``"quoted string"`` or ends at a colon or white space, then
optional white space and an optional colon.  The data is a redirection list (redirect.py).

Entry ``i`` is line ``i + 1``.  The file is read in pieces that start at an entry.  In a
piece the *plain* lines -- ``key: a@x, b@y`` (continued or not): one colon, no character
with a meaning in redirection lists -- are split and checked all at once, in C (``join``/
``split``/``map``/``compress``): such data is a comma-separated list of addresses, what
redirect.py makes of it too.  When a check fails the lines are halved until those that fail
are found; they, and all other entries, go through redirect.py.  Errors raise
ForwardingSourceError ``file:line: ...`` (the key line).
"""
from __future__ import annotations

import operator
import re
from bisect import bisect_left
from itertools import chain, compress, repeat

from .addresses import WHITE, ForwardingSourceError, read_bytes, read_text, unquote
from .graph import Source
from .redirect import RedirectParser

#: the size of the pieces of a file read at a time (about 8,000 lines)
PIECE_BYTES = 1 << 19
#: bytes that never stop a line from being plain (nor do pipes and files in map builds,
#: where their case does not matter; such lines are read apart)
_PLAIN = bytes(range(0x80, 0x100)) + bytes(c for c in range(0x21, 0x7f) if chr(c).isalnum()) \
    + b".-_+=!$%&'?^`{}~@, \t"
#: a newline that starts an entry (or a comment): no white space after it
_ENTRY = re.compile(rb"\n(?=[^ \t\r\v\f])").search
_COMMA_BLANKS = re.compile(r"[ \t]*,[ \t]*")
_KEY_END = re.compile(r"[^: \t\n\r\v\f]*").match
_KEY_DOMAINS = re.compile(r"@([^\n]*)").findall
#: a ``:blackhole:`` item (any case): right after the key's colon, or after a comma
_BLACKHOLE = re.compile(r"(?:(?<=:)|,)[ \t]*:blackhole:", re.I).search
#: in ``,targets,`` (dots made commas too): an empty local part, domain or domain label
#: (and a local part that starts or ends with a dot: redirect.py decides those)
_BAD_TARGETS = (b"@,", b",,", b",@")
_DOT_AS_COMMA = bytes.maketrans(b".", b",")
_NOT_AT_OR_COMMA = bytes(c for c in range(256) if c not in b"@,")


def read(path: str, local: frozenset[str], *, domain: str = "", case_sensitive: bool = False,
         detail: bool = False, warn=None) -> Source:
    """The entries of the lsearch file at ``path`` (see :class:`~.graph.Source`); ``local``:
    the local domains, ``domain``: a file's whose keys are bare local parts.  ``warn`` gets
    the ``file:line: ...`` texts for keys Exim never looks up (skipped)."""
    raw, start = read_bytes(path), 0
    reader = _Reader(Source(path, detail=detail), local, domain.lower(), case_sensitive, warn)
    while start < len(raw):  # (a piece ends where the next entry starts)
        end = m.start() + 1 if (m := _ENTRY(raw, start + PIECE_BYTES)) else len(raw)
        reader.run(raw[start:end])
        start = end
    return reader.src


class _Reader:
    def __init__(self, src: Source, local: frozenset[str], domain: str, case_sensitive: bool,
                 warn) -> None:
        self.src, self.path, self.local, self.domain = src, src.name, local, domain
        self.case_sensitive, self.detail, self.warn = case_sensitive, src.detail, warn
        self.parser = RedirectParser(case_sensitive)

    def run(self, raw: bytes) -> None:
        """Read the next piece of the file (it starts at an entry)."""
        self.first = len(self.src.keys)  # (its first line, 0-based)
        self.general: dict[int, int] = {}  # entries for redirect.py: key line -> last line
        self.blackholes: dict[int, str] = {}  # key line -> it up to a :blackhole: item
        if b"\r" in raw:
            raw = raw.replace(b"\r\n", b"\n")
        # a plain key line has one colon and nothing else of what _PLAIN leaves (white space
        # at the end of a line, which Exim drops, is left to the bulk checks and redirect.py)
        lines = read_text(self.path, raw, self.first).split("\n")
        skeleton = raw.translate(None, _PLAIN).split(b"\n")
        if not lines[-1]:
            del lines[-1], skeleton[-1]
        n = len(lines)
        odd = set(compress(range(n), map(operator.ne, skeleton, repeat(b":"))))
        # (and those with one colon that start with white space: continuations)
        odd.update(compress(range(n), map(str.startswith, lines, repeat((" ", "\t")))))
        # map builds: lines that would be plain but for pipes and files (plain targets too)
        stripped = {i: skeleton[i].translate(None, b"" if self.detail else b"|/") for i in odd}
        end_keys = self._continuations(lines, skeleton, odd, stripped)
        self.src.keys.extend([""] * n)
        self._plain(lines, range(n), sorted(odd))
        self._plain(lines, sorted(end_keys), [])
        self._plain(self.blackholes, sorted(self.blackholes), [], blackhole=True)
        for first, last in sorted(self.general.items()):
            self._entry(first, lines[first], lines[first + 1:last + 1])

    def _continuations(self, lines: list[str], skeleton: list[bytes], odd: set[int],
                       stripped: dict[int, bytes]) -> set[int]:
        """Sort the lines that are not plain key lines (``odd``, where they all stay): a plain
        key line's plain continuations are joined to it (one blank for the white space, as
        Exim joins them); any other continuation, or key line, makes its entry redirect.py's
        (``self.general``) -- but for those plain apart from pipes and files (``stripped``:
        the skeletons without those), whose key lines are returned, and those plain up to a
        ``:blackhole:`` item (``self.blackholes``: the items before it are checked)."""
        entry, plain = -1, False  # the entry continuation lines extend, and is it plain
        joined: dict[int, list[str]] = {}
        end_keys = set()
        for i in sorted(odd):
            if i and i - 1 not in odd:
                entry, plain = i - 1, True  # after a plain key line
            line = lines[i]
            if not line.strip(WHITE) or line[0] == "#":
                entry = -1
            elif line[0] in WHITE:
                if entry < 0:
                    continue
                if plain and not stripped[i]:
                    joined.setdefault(entry, []).append(line.lstrip(WHITE))
                    if skeleton[i]:
                        end_keys.add(entry)
                        odd.add(entry)
                    continue
                if plain:  # a continuation redirect.py must read: so it reads the entry
                    joined.pop(entry, None)
                    end_keys.discard(entry)
                    odd.add(entry)
                    plain = False
                self.blackholes.pop(entry, None)
                self.general[entry] = i
            elif stripped[i] == b":":
                end_keys.add(i)
                entry, plain = i, True
            elif stripped[i] == b":::" and (m := _BLACKHOLE(line, line.find(":") + 1)):
                self.blackholes[i] = line[:m.start()]
                entry, plain = i, False
            else:
                self.general[i] = i
                entry, plain = i, False
        for i, more in joined.items():
            lines[i] = " ".join([lines[i], *more])
        return end_keys

    def _plain(self, lines, ids, holes: list[int], blackhole: bool = False) -> None:
        """The plain key lines ``ids`` (a range, but the ``holes``, or a list) of ``lines``
        (a list, or a dict), in bulk; those that fail a check go to redirect.py."""
        if len(holes) == len(ids):
            return
        if isinstance(ids, range):
            part = lines[ids.start:ids.stop]
            for i in holes:
                part[i - ids.start] = ":"  # (a key and data of their own: empty)
        else:
            part = list(map(lines.__getitem__, ids))
        joined = ":".join(part)
        parts = (joined if self.case_sensitive else joined.lower()).split(":")
        if self._bulk(ids, parts[0::2], parts[1::2], holes, blackhole):
            return
        if len(ids) == 1:
            self.general[ids[0]] = ids[0]
            return
        k = len(ids) // 2  # halve the lines until those that fail are found
        h = bisect_left(holes, ids[k])
        self._plain(lines, ids[:k], holes[:h], blackhole)
        self._plain(lines, ids[k:], holes[h:], blackhole)

    def _bulk(self, ids, keys: list[str], datas: list[str], holes, blackhole: bool) -> bool:
        """Keys and targets of the plain lines ``ids`` (but the ``holes``, whose key and
        data are empty; ``blackhole``: targets ``:blackhole:``): recorded (True), or nothing
        (False: a check failed)."""
        n = len(keys) - len(holes)
        kj = "\n".join(keys)
        if " " in kj or "\t" in kj:  # ("key : data")
            keys = list(map(str.rstrip, keys, repeat(" \t")))
            kj = "\n".join(keys)
            if " " in kj or "\t" in kj:
                return False
        if self.domain:
            if "@" in kj or keys.count("") != len(holes):
                return False
            keys = list(map(operator.add, keys, repeat("@" + self.domain)))
            for i in holes:
                keys[i - ids[0]] = ""
        else:  # one "@" in each key, after a local part, before a local domain
            domains = _KEY_DOMAINS(kj)
            if len(domains) != n or kj.count("@") != n or kj.startswith("@") or "\n@" in kj \
                    or not self.local.issuperset(map(str.lower, set(domains))
                                                 if self.case_sensitive else set(domains)):
                return False
        counts = list(map(operator.add, map(str.count, datas, repeat(",")), map(bool, datas)))
        dj = ",".join(filter(None, datas)).replace(", ", ",").strip(" \t")
        if " " in dj or "\t" in dj:
            dj = _COMMA_BLANKS.sub(",", dj)
            if " " in dj or "\t" in dj:  # (inside an address)
                return False
        owners = list(chain.from_iterable(map(repeat, map(operator.add, ids, repeat(
            self.first)), counts)))
        if not dj or ",," in dj or dj[0] == "," or dj[-1] == ",":  # (empty items: ignored)
            keep = list(map(bool, targets := dj.split(",")))
            dj, owners = ",".join(compress(targets, keep)), list(compress(owners, keep))
        # an empty local part, domain or domain label: redirect.py decides (see _BAD_TARGETS)
        commas = b"," + (encoded := dj.encode()).translate(_DOT_AS_COMMA) + b","
        if dj and any(map(commas.__contains__, _BAD_TARGETS)):
            return False
        # one "@" in each target (usual: they stay joined, for the graph), or some are bare
        ats = encoded.translate(None, _NOT_AT_OR_COMMA)
        one_at = ats == b"@," * (len(owners) - 1) + b"@"
        targets = [] if one_at and not self.case_sensitive else dj.split(",") if dj else []
        bare = None if one_at else \
            list(map(operator.not_, map(operator.contains, targets, repeat("@"))))
        if bare is not None and ats.count(b"@") != len(targets) - sum(bare):
            return False
        if self.case_sensitive:
            keys, targets = _fold(keys), _fold(targets)
            dj = ",".join(targets)
        src = self.src  # -- checked: record them
        if isinstance(ids, range):
            src.keys[self.first + ids.start:self.first + ids.stop] = keys
        else:
            for i, k in zip(ids, keys, strict=False):
                src.keys[self.first + i] = k
        if blackhole:  # (each list is thrown away: the marker is its one target)
            for i in ids:
                src.add(self.first + i, [":blackhole:"], self.local)
            return True
        src.count += len(owners)
        if bare is None:
            src.chunks.append((dj, owners))
            return True
        with_at = list(map(operator.not_, bare))
        src.chunks.append((",".join(compress(targets, with_at)),
                           list(compress(owners, with_at))))
        # without an "@": pipes and files (only in map builds: only counted), local parts
        # (the key's domain qualifies them)
        keep = list(map(operator.and_, bare, map(operator.not_, map(
            str.startswith, targets, repeat(("|", "/"))))))
        targets, owners = list(compress(targets, keep)), list(compress(owners, keep))
        suffixes = repeat("@" + self.domain) if self.domain else \
            [k[k.rfind("@"):] for k in map(src.keys.__getitem__, owners)]
        src.chunks.append((",".join(map(operator.add, targets, suffixes)), owners))
        return True

    def _entry(self, i: int, line: str, more: list[str]) -> None:
        """One entry through redirect.py: key line ``i`` (0-based) and its continuations."""
        origin = f"{self.path}:{self.first + i + 1}"
        line = line.rstrip(WHITE)
        if line.startswith('"'):  # a quoted key, or up to a colon or white space
            raw_key, end = unquote(line)
            if end < 0:
                raise ForwardingSourceError(origin, "unterminated quoted key")
        else:
            raw_key = line[:(end := _KEY_END(line).end())]
        if not raw_key:
            raise ForwardingSourceError(origin, "empty key")
        rest = line[end:].lstrip(WHITE)
        data = " ".join([rest[1:] if rest.startswith(":") else rest,
                         *(m.strip(WHITE) for m in more)])
        self.src.read(self.first + i, raw_key, data, self.parser, self.local, self.domain, origin,
                      self.warn, quoted=line.startswith('"'))


def _fold(items: list[str]) -> list[str]:
    """Case-sensitive local parts: only the domains lower-cased."""
    joined = "\n".join(items)
    if joined == joined.lower():
        return items
    # (a bare local part, no "@", has no domain: it stays as it is)
    return [s[:s.rfind("@") + 1] + s[s.rfind("@") + 1:].lower() if "@" in s else s
            for s in items]
