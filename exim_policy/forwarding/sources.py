"""Alias sources -> entries ``(key, targets, line)``, read the way Exim reads them.

One *entry* is one alias key with its redirection list, already split into targets:

- ``key``: ``local@domain``, ``*@domain`` (a whole-domain wildcard) or ``*`` (every
  address of every local domain, as ``lsearch*@`` uses it).  Domains are lower-cased; local
  parts too unless ``case_sensitive``.  In a source with ``domain`` set (``/etc/aliases``
  style) keys are bare local parts and come out as ``local@domain`` / ``*@domain``.
- ``targets``: a list of strings, in order, each one of
    * ``local@domain``: an address (normalised like keys);
    * ``local``: a bare local part, only in entries whose key is ``*`` (the graph qualifies
      it per domain); every other bare local part is qualified here with the key's domain
      (see "Qualification" below);
    * a *local end*, recognised by its first character: ``:blackhole:``, ``:defer: text``,
      ``:fail: text``, ``|command``, ``/file``, or ``\\address`` (Exim's "no further
      redirection by this router" marker, which the graph resolves: local -> end, external
      -> forward).
- ``line``: the 1-based line of the key (an lsearch file) or row (an SQL result).

Redirection lists follow Exim 4.96's ``parse_forward_list()`` (checked against ``exim -bt``):
items are separated by commas (and newlines in ``:include:`` files, where ``#`` at the start
of an item comments out the rest of its line); ``"..."`` quoting, ``Name <addr>`` and
``(comments)`` are understood; ``:unknown:`` and empty items are ignored.
``:blackhole:`` or ``:defer:`` *anywhere* in the list throw the whole list away (Exim
discards / defers the address and delivers none of the other items), so the entry's targets
become just that marker.  ``:fail:`` ends the list (the rest of the line is its message) but
items *before* it are still delivered, so they stay.  ``:include:/path`` is read and spliced
in (each file read once per build); a ``:fail:`` inside it drops the included items before it.

Qualification: a bare local part in a list is qualified with the domain of the address being
redirected (the key's domain; for a ``*`` key, the domain the wildcard stands for).  That is
Exim's behaviour with ``qualify_preserve_domain`` on the redirect router; without it Exim
uses ``qualify_recipient`` (default ``primary_hostname``), so set this source's ``domain`` to
that name for ``/etc/aliases`` or use fully qualified targets.

lsearch files (Exim 4.96 ``lookups/lsearch.c``): trailing white space is dropped; empty lines
and lines starting with ``#`` are comments; a line starting with white space continues the
previous key's data (joined with one blank) -- but once a comment or empty line follows a key,
further indented lines are ignored, as Exim does; a key is a ``"quoted string"`` (with
backslash escapes) or ends at a colon or white space, followed by optional white space and an
optional colon.  Exim's lsearch returns the *first* line with a key, so later duplicates are
ignored (the graph does that per source).

Errors raise :class:`ForwardingSourceError` whose text starts with ``file:line: ``.
"""
from __future__ import annotations

import itertools
import multiprocessing
import operator
import re
import sqlite3
import threading
import urllib.parse
from array import array
from operator import itemgetter
from typing import Tuple

from ..config import ForwardingSource

#: ``(key, targets, line)`` -- see the module docstring
Entry = Tuple[str, list, int]

#: first characters of targets that are local ends (see the module docstring)
SPECIAL_START = frozenset(":|/\\")


class ForwardingError(Exception):
    """Anything that stops a build: the old map stays untouched, the CLI exits 2."""


class ForwardingSourceError(ForwardingError):
    """Bad input in one source; ``str()`` is ``origin: message`` (``/etc/exim4/virtual:12: ...``)."""

    def __init__(self, origin: str, message: str) -> None:
        super().__init__(f"{origin}: {message}")
        self.origin = origin
        self.message = message


# ------------------------------------------------------------------ address syntax --
# Characters never allowed unquoted in a local part or domain here (RFC 5322 specials that
# Exim would reject, plus white space).  Anything else (UTF-8 included) is accepted.
_ATOM = r'[^\s@,;:<>()\[\]"\\]+'
_FAST_TARGET = re.compile(rf"{_ATOM}(?:@{_ATOM})?").fullmatch
_ATOM_RE = re.compile(_ATOM).fullmatch
# A redirection list that needs the full item scanner (quotes, specials, pipes, files,
# backslashes, route-addrs, comments); everything else is "addr, addr, ..." split on commas.
_NEEDS_SCANNER = re.compile(r'["\\<(#]').search


def is_domain(domain: str) -> bool:
    """A dot-separated name without empty labels, or a domain literal ``[192.0.2.1]``."""
    if domain.startswith("[") and domain.endswith("]"):
        return len(domain) > 2
    return (_ATOM_RE(domain) is not None and not domain.startswith(".")
            and not domain.endswith(".") and ".." not in domain)


def _norm(local: str, domain: str, case_sensitive: bool) -> str:
    domain = domain.lower()
    return f"{local if case_sensitive else local.lower()}@{domain}"


def _unquote(text: str) -> str:
    """``"a\\"b"`` -> ``a"b`` (text starts with a quote; trailing text is the caller's)."""
    out = []
    i = 1
    while i < len(text) and text[i] != '"':
        if text[i] == "\\" and i + 1 < len(text):
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out)


def _quoted_end(text: str, start: int) -> int:
    """Index just past the closing quote of the quoted string at ``text[start]`` (or len)."""
    i = start + 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    return len(text)


def parse_address(item: str) -> tuple[str, str | None]:
    """One address as written in a redirection list -> ``(local_part, domain or None)``.

    Understands ``Name <addr>``, ``(comments)``, a quoted local part and a source route
    (``@relay:user@domain``, whose final address is used).  Raises ValueError.
    """
    text = item
    if "(" in text:  # RFC 822 comments; no nesting in practice
        text = re.sub(r"\([^()]*\)", " ", text)
    if "<" in text:
        lt = text.rfind("<")
        gt = text.find(">", lt)
        if gt < 0:
            raise ValueError("'<' without '>'")
        if text[gt + 1:].strip():
            raise ValueError("text after '>'")
        text = text[lt + 1:gt]
    text = text.strip()
    if text.startswith("@") and ":" in text:  # source route
        text = text.split(":", 1)[1].strip()
    if not text:
        raise ValueError("empty address")
    if text.startswith('"'):
        end = _quoted_end(text, 0)
        if end > len(text) or text[end - 1] != '"':
            raise ValueError("unterminated quoted local part")
        local = _unquote(text[:end])
        rest = text[end:]
        if not local:
            raise ValueError("empty quoted local part")
        if rest and not rest.startswith("@"):
            raise ValueError("text after the quoted local part")
        domain = rest[1:] if rest else None
    else:
        if text.count("@") > 1:
            raise ValueError("more than one '@'")
        local, at, domain = text.partition("@")
        if not at:
            domain = None
        if not local or _ATOM_RE(local) is None:
            raise ValueError("bad local part")
    if domain is not None and not is_domain(domain):
        raise ValueError("bad domain")
    return local, domain


# ------------------------------------------------------------ redirection lists --
class _ListParser:
    """Parses redirection lists for one source; caches ``:include:`` files by path."""

    def __init__(self, case_sensitive: bool) -> None:
        self.case_sensitive = case_sensitive
        self._includes: dict[str, str] = {}
        self._active: list[str] = []  # include files being expanded (loop detection)

    # Lists without quotes, backslashes, route-addrs or comments ("a@x, |/bin/prog,
    # :fail: gone") are split on commas here; the character-level scanner is for the rest.
    def targets(self, data: str, domain: str | None, origin_of) -> list[str]:
        """``data`` -> list of targets; ``domain`` qualifies bare local parts (None: keep)."""
        if _NEEDS_SCANNER(data) is not None:
            return self._scan(data, domain, origin_of, include_file=False)[0]
        out: list[str] = []
        items = data.split(",")
        for k, raw in enumerate(items):
            item = raw.strip()
            if not item:
                continue
            c = item[0]
            if c == ":":
                rest = ",".join(items[k:]).strip()  # :fail:/:defer: text runs to the end
                special = self._special(rest, domain, origin_of, out)
                if special is None:
                    continue  # :unknown: or an :include: spliced into out
                return special
            if c == "|" or (c == "/" and "@" not in item):
                out.append(item)  # a pipe or a file: a local end
                continue
            if _FAST_TARGET(item) is None:
                self._bad(item, origin_of)
            at = item.find("@")
            if at < 0:
                item = item if self.case_sensitive else item.lower()
                if domain is not None:
                    item = f"{item}@{domain}"
            else:
                dom = item[at + 1:]
                if dom[0] == "." or dom[-1] == "." or ".." in dom:
                    self._bad(item, origin_of)
                item = (item[:at] if self.case_sensitive else item[:at].lower()) \
                    + "@" + dom.lower()
            out.append(item)
        return out

    def _special(self, text: str, domain: str | None, origin_of, out: list[str]) -> list | None:
        """A list item starting with ':' (``text`` runs to the end of the line).  Returns
        the final target list when the item ends the list, None when the list goes on."""
        lowered = text.lower()
        if lowered.startswith(":unknown:") and not text[9:].split(",", 1)[0].strip():
            return None
        for special in (":blackhole:", ":defer:", ":fail:"):
            if lowered.startswith(special):
                message = text[len(special):].strip()
                marker = special if special == ":blackhole:" else f"{special} {message}".rstrip()
                if special == ":fail:":  # items before :fail: are still delivered (Exim)
                    out.append(marker)
                    return out
                return [marker]  # :blackhole: / :defer: anywhere: nothing is delivered
        if lowered.startswith(":include:"):
            path = text[9:].split(",", 1)[0].strip()
            included, terminator = self._include(path, domain, origin_of)
            if terminator is None:
                out.extend(included)
                return None
            if terminator.startswith(":fail:"):
                out.append(terminator)
                return out
            return [terminator]
        raise ForwardingSourceError(origin_of(), f"unknown special item {text.split(',')[0]!r}")

    def _bad(self, item: str, origin_of) -> None:
        try:
            parse_address(item)
        except ValueError as exc:
            raise ForwardingSourceError(origin_of(), f"bad address {item!r}: {exc}") from None
        raise ForwardingSourceError(origin_of(), f"bad address {item!r}")

    def _scan(self, text: str, domain: str | None, origin_of,
              include_file: bool) -> tuple[list[str], str | None]:
        """The item scanner.  Returns (targets, terminator) where terminator is the
        ``:fail:``/``:defer:``/``:blackhole:`` item that ended the list, if any."""
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            c = text[i]
            if c in " \t\r\n,":
                i += 1
                continue
            if c == "#" and include_file:  # a comment up to the end of the line
                nl = text.find("\n", i)
                i = n if nl < 0 else nl + 1
                continue
            start = i
            depth_angle = depth_paren = 0
            while i < n:
                c = text[i]
                if c == '"':
                    i = _quoted_end(text, i)
                    continue
                if c == "\\" and i + 1 < n:
                    i += 2
                    continue
                if c == "<":
                    depth_angle += 1
                elif c == ">" and depth_angle:
                    depth_angle -= 1
                elif c == "(":
                    depth_paren += 1
                elif c == ")" and depth_paren:
                    depth_paren -= 1
                elif (c == "," or c == "\n") and not depth_angle and not depth_paren:
                    break
                i += 1
            item = text[start:i].strip()
            inquote = False
            if len(item) >= 2 and item[0] == '"' and item[-1] == '"':
                item = item[1:-1].strip()
                inquote = True
            if not item or item == ":unknown:":
                continue
            lowered = item.lower()
            for special in (":blackhole:", ":defer:", ":fail:"):
                if lowered.startswith(special):
                    # Exim: the message is the rest of the *line*, commas included
                    nl = text.find("\n", start)
                    rest = text[start:n if nl < 0 else nl].strip()
                    if rest.startswith('"'):
                        rest = rest[1:]
                    message = rest[len(special):].strip().rstrip('"').strip()
                    marker = f"{special} {message}".rstrip() if special != ":blackhole:" \
                        else special
                    if special == ":fail:":
                        out.append(marker)
                        return out, marker
                    return [marker], marker
            if lowered.startswith(":include:"):
                included, terminator = self._include(item[9:].strip(), domain, origin_of)
                if terminator is None:
                    out.extend(included)
                    continue
                if terminator.startswith(":fail:"):
                    # Exim drops the included items before the :fail: (they are not yet
                    # chained to the outer list) but keeps the outer ones
                    out.append(terminator)
                    return out, terminator
                return [terminator], terminator
            if item.startswith("\\"):
                try:
                    local, dom = parse_address(item[1:])
                except ValueError as exc:
                    raise ForwardingSourceError(
                        origin_of(), f"bad address {item!r}: {exc}") from None
                if dom is None:
                    if domain is None:
                        out.append("\\" + (local if self.case_sensitive else local.lower()))
                        continue
                    dom = domain
                out.append("\\" + _norm(local, dom, self.case_sensitive))
                continue
            if item[0] in "|/":
                try:
                    local, dom = parse_address(item)
                except ValueError:
                    dom = None
                if dom is None:  # Exim: a pipe or file unless it parses with a domain
                    if inquote:
                        item = re.sub(r"\\(.)", r"\1", item)
                    out.append(item)
                    continue
                out.append(_norm(local, dom, self.case_sensitive))
                continue
            if item[0] == ":":
                raise ForwardingSourceError(origin_of(), f"unknown special item {item!r}")
            try:
                local, dom = parse_address(item)
            except ValueError as exc:
                raise ForwardingSourceError(
                    origin_of(), f"bad address {item!r}: {exc}") from None
            if dom is None:
                if domain is None:
                    out.append(local if self.case_sensitive else local.lower())
                    continue
                dom = domain
            out.append(_norm(local, dom, self.case_sensitive))
        return out, None

    def _include(self, path: str, domain: str | None, origin_of) -> tuple[list[str], str | None]:
        if not path.startswith("/"):
            raise ForwardingSourceError(origin_of(), f":include: {path!r} is not an absolute path")
        if path in self._active:
            raise ForwardingSourceError(origin_of(), f":include: loop through {path}")
        text = self._includes.get(path)
        if text is None:
            try:
                with open(path, "rb") as fh:
                    raw = fh.read()
                text = raw.decode("utf-8")
            except OSError as exc:
                raise ForwardingSourceError(
                    origin_of(), f":include:{path}: {exc.strerror or exc}") from None
            except UnicodeDecodeError:
                raise ForwardingSourceError(
                    origin_of(), f":include:{path}: not valid UTF-8") from None
            self._includes[path] = text
        self._active.append(path)
        try:
            return self._scan(text, domain, lambda: f"{origin_of()} (:include:{path})",
                              include_file=True)
        finally:
            self._active.pop()


# --------------------------------------------------------------------------- keys --
def _key(raw: str, domain: str, case_sensitive: bool) -> str | None:
    """Normalise one key; None when Exim could never look it up (caller warns).

    Raises ValueError for a key that is not an address at all.
    """
    if domain:  # /etc/aliases style: bare local parts
        if "@" in raw:
            return None
        if raw == "*":
            return f"*@{domain}"
        return f"{raw if case_sensitive else raw.lower()}@{domain}"
    if raw == "*":
        return "*"
    local, at, dom = raw.rpartition("@")
    if not at:
        return None
    if not local:
        raise ValueError("empty local part")
    if not is_domain(dom):
        raise ValueError("bad domain")
    if local == "*":
        return f"*@{dom.lower()}"
    return _norm(local, dom, case_sensitive)


def line_key(line: str) -> tuple[str, int]:
    """The raw key of an lsearch key line and where the rest of the line starts (-1 for
    an unterminated quoted key): a ``"quoted string"`` or up to a colon or white space."""
    if line.startswith('"'):
        end = _quoted_end(line, 0)
        if end < 2 or line[end - 1] != '"':
            return "", -1
        return _unquote(line[:end]), end
    raw_key = line.split(None, 1)[0].split(":", 1)[0]
    return raw_key, len(raw_key)


def _after_key(rest: str) -> str:
    """Exim: after the key, skip white space and one optional colon (even when the data
    itself starts with a colon: ``key :blackhole:`` loses that colon in Exim too)."""
    rest = rest.lstrip()
    return rest[1:] if rest.startswith(":") else rest


def _key_domain(key: str) -> str | None:
    return None if key == "*" else key[key.rfind("@") + 1:]


# -------------------------------------------------------------------------- batch --
class Batch:
    """One source's entries in columns, the form the graph consumes.

    Entry ``i`` (source order) has key ``keys[i]`` at ``lines[i]`` and the targets
    ``targets[j]`` for every ``j`` with ``owners[j] == i`` (in no particular order).
    ``keys[i]`` is None for an entry that is not an exact key: an ignored key (warned
    about) or a wildcard, which is in ``wildcards`` as a plain ``(key, targets, line)``.
    Columns instead of one tuple per entry because a million aliases must build in
    seconds: the hot paths then run as C-level ``map``/``join``/``split`` calls.
    """

    def __init__(self, name: str, *, first_wins: bool = True, row_origins: bool = False) -> None:
        self.name = name
        #: lsearch: the first entry of a key wins; SQL: all rows of a key are used
        self.first_wins = first_wins
        #: origins read ``name:row N`` (SQL) instead of ``name:N``
        self.row_origins = row_origins
        self.keys: list[str | None] = []
        # int arrays, not lists: a million Python ints cost 30 MB more
        self.lines = array("i")
        self.owners = array("i")
        self.targets: list[str] = []
        self.wildcards: list[Entry] = []
        #: map builds only (``parse_lsearch(..., local_domains=...)``): the owners of
        #: targets that were dropped because they are external addresses -- a domain that
        #: is not local, so never a key -- which is all the graph needs of them (BFS seeds)
        self.external_owners = array("i")
        #: the ``local_domains`` the parser was given (None: none) and whether it found
        #: every exact key in one of them, so that the graph need not check again
        self.local_domains: frozenset[str] | None = None
        self.keys_local = False

    def add(self, key: str, targets: list, line: int) -> None:
        """Append one entry (key normalised, targets as the module docstring says)."""
        if key[0] == "*":
            self.wildcards.append((key, targets, line))
            return
        i = len(self.keys)
        self.keys.append(key)
        self.lines.append(line)
        self.owners.extend(itertools.repeat(i, len(targets)))
        self.targets.extend(targets)

    def origin(self, line: int) -> str:
        return f"{self.name}:{'row ' if self.row_origins else ''}{line}"

    def entries(self) -> list[Entry]:
        """All entries as ``(key, sorted targets, line)``, exact keys first (for tests)."""
        grouped: dict[int, list] = {}
        for owner, target in zip(self.owners, self.targets):
            grouped.setdefault(owner, []).append(target)
        out = [(key, sorted(grouped.get(i, [])), line)
               for i, (key, line) in enumerate(zip(self.keys, self.lines)) if key is not None]
        out.extend((key, sorted(targets), line) for key, targets, line in self.wildcards)
        return out


# ------------------------------------------------------------------------ lsearch --
def read_text(path: str) -> str:
    """A whole source file as UTF-8 text; errors name the file (and line, for bad bytes)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ForwardingSourceError(path, exc.strerror or str(exc)) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ForwardingSourceError(f"{path}:{line}", "not valid UTF-8") from None


# A line with any of these goes to the item scanner (quotes, backslashes, pipes, files,
# route-addrs, comments; '#' also marks comment lines, which are skipped anyway).
_SCAN_CHARS = re.compile(r'["\\|/<(#]')
# Characters no fast-path key or target may contain once split.
_BAD_CHARS = re.compile(r'[ \t\r\f\v;<>()\[\]"\\]').search
_MULTI_AT = re.compile(r"@[^@\n]*@").search
_COMMA_SPACE = re.compile(r"[ \t]*,[ \t]*")
_WS = " \t\r\v\f"
#: line starts that make a line irregular (comment, continuation, quoted or wildcard key)
_IRREGULAR_START = ("#", '"', "*") + tuple(_WS)


def _any_bad_char(text: str) -> bool:
    """``_BAD_CHARS(text) is not None``, for megabytes of text: one ``in`` per character
    (a memchr each) is several times faster than the regex's scan."""
    return any(map(text.__contains__, ' \t\r\f\v;<>()[]"\\'))


def _scan_lines(text: str) -> set[int]:
    """0-based numbers of the lines that contain a character of ``_SCAN_CHARS``."""
    out = set()
    search = _SCAN_CHARS.search
    line = last = 0
    m = search(text)
    while m is not None:
        pos = m.start()
        line += text.count("\n", last, pos)
        last = pos
        out.add(line)
        nl = text.find("\n", pos)
        if nl < 0:
            break
        m = search(text, nl + 1)
    return out


def _bulk_ok(joined: str, sep: str) -> bool:
    """Bulk syntax check of keys or targets joined with ``sep``: no forbidden character,
    no empty local part or domain, no misplaced dot.  False means: look at each item."""
    if _any_bad_char(joined):
        return False
    if f"{sep}@" in joined or joined.startswith("@") or f"@{sep}" in joined \
            or joined.endswith("@"):
        return False
    return not ("@." in joined or ".." in joined or f".{sep}" in joined or joined.endswith("."))


def _count_at(items: list[str]) -> tuple[int, int]:
    """(number of '@' in all items, number of items with an '@')."""
    return (sum(map(str.count, items, itertools.repeat("@"))),
            sum(map(operator.contains, items, itertools.repeat("@"))))


def _item_error(item: str) -> str | None:
    """Why one fast-path target is not acceptable (None: it is)."""
    if not item:
        return None
    if _FAST_TARGET(item) is None:
        try:
            parse_address(item)
        except ValueError as exc:
            return f"bad address {item!r}: {exc}"
        return f"bad address {item!r}"
    local, at, dom = item.partition("@")
    if local.endswith(".") and not at:
        return f"bad address {item!r}: bad local part"
    if at and not is_domain(dom):
        return f"bad address {item!r}: bad domain"
    return None


def parse_lsearch(path: str, *, domain: str = "", case_sensitive: bool = False,
                  warn=None, fast: bool = True, processes: int | None = None,
                  local_domains: frozenset[str] | None = None) -> Batch:
    """An Exim lsearch alias file as a :class:`Batch`.

    ``warn(message)`` receives ``file:line: ...`` texts for keys Exim would never look up
    (a full address in a ``domain`` file, a bare local part without ``domain``); those
    entries are skipped.  Raises ForwardingSourceError for anything unparsable.

    Fast path: a key line ``key: a@x, b@y`` without quotes, specials or other unusual
    characters (the vast majority) is only split here; its targets are split, checked and
    lower-cased for the whole file at once.  Everything else goes through the item scanner
    (``fast=False`` sends every line there: the tests compare both ways).

    ``processes``: None parses files of at least ``PARALLEL_MIN_LINES`` lines in two
    processes (see :func:`_parse_two`), 1 always in this one, 2 in two whenever the file
    can be split.  The result is the same either way, warnings included.

    ``local_domains`` (map builds; not for ``explain``, which shows external addresses):
    fast-path targets outside these domains are not kept as strings, only their owners go
    to ``Batch.external_owners``.  Classifying them here, right after the split, is cheap
    (the strings are fresh in the cache) and runs in both parse processes; it saves their
    transfer from the second process and their lookup and classification in the graph.
    """
    text = read_text(path)
    domain = domain.lower()
    split = _split_point(text, processes) if fast else 0
    if split:
        batch = _parse_two(path, [text], split, domain, case_sensitive, warn, local_domains)
        if batch is not None:
            return batch
        # the second process failed (killed, out of memory...): read again, parse here
        text = read_text(path)
    return _parse_part(path, [text], 0, 0, domain, case_sensitive, warn, fast, None,
                       local_domains)[0]


#: files with fewer lines are parsed in one process: a fork, the transfer of the second
#: half's results and the merge cost more than they save below this
PARALLEL_MIN_LINES = 200_000
#: how long the parent waits for the second process, in seconds, beyond its own half
PARALLEL_DEADLINE = 600.0
#: the second process's part of the file: a bit less than half, because it then still
#: packs its results while this one only waits for them
_CHILD_SHARE = 0.48
# a line that starts a new entry: not empty, not a comment, not a continuation
_ENTRY_START = re.compile(r"\n(?=[^\s#])")


def _split_point(text: str, processes: int | None) -> int:
    """Where to cut ``text`` for two processes (the start of an entry line near the
    middle, see ``_CHILD_SHARE``), or 0 for one process."""
    if processes == 1 or "fork" not in multiprocessing.get_all_start_methods():
        return 0
    if processes is None and (text.count("\n") < PARALLEL_MIN_LINES
                              # fork() copies only the calling thread: a lock another
                              # thread holds would stay locked in the child forever
                              or threading.active_count() > 1):
        return 0
    m = _ENTRY_START.search(text, int(len(text) * (1 - _CHILD_SHARE)))
    return m.start() + 1 if m else 0


def _parse_two(path: str, box: list[str], split: int, domain: str, case_sensitive: bool,
               warn, local_domains: frozenset[str] | None = None) -> Batch | None:
    """Parse ``box[0][:split]`` here and ``box[0][split:]`` (which starts with an entry
    line, so no state carries over the cut) in a forked second process at the same time,
    then append the second half's entries.  None when the second process failed.

    ``box`` is a one-item list that this function empties, so that the caller does not
    keep the file text alive during the parse (the same for the Process arguments).
    The merged batch equals the one-process batch exactly: the same keys, lines, owners
    and targets in the same order, the same warnings in the same order, the same error.
    """
    text = box.pop()
    base = text.count("\n", 0, split)  # the 0-based line where the second half starts
    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)
    args = [text]
    proc = ctx.Process(target=_part_worker, daemon=True,
                       args=(writer, path, args, split, base, domain, case_sensitive,
                             local_domains))
    try:
        proc.start()
    except (OSError, AssertionError):  # no fork possible (or we are a daemonic process)
        reader.close()
        writer.close()
        return None
    args.clear()  # the child has its own copy; ours would keep the whole text alive
    writer.close()
    head = [text[:split - 1]]  # without the last newline: its empty "line" is the child's
    del text
    try:
        warnings: list[str] = []  # of the fast path
        scan_warnings: list[str] = []  # of the item scanner (one process: after all others)
        batch, n_fast = _parse_part(path, head, 0, 0, domain, case_sensitive,
                                    warnings.append, True, scan_warnings.append,
                                    local_domains)
        answer = reader.recv() if reader.poll(PARALLEL_DEADLINE) else None
    except EOFError:  # the child died before answering
        answer = None
    finally:
        reader.close()
        if proc.is_alive():
            proc.terminate()
        proc.join(10)
    if answer is None or answer[0] == "crash":
        return None
    if warn is not None:
        for message in itertools.chain(warnings, answer[-2], scan_warnings, answer[-1]):
            warn(message)
    if answer[0] == "error":
        raise ForwardingSourceError(answer[1], answer[2])
    _merge(batch, n_fast, *answer[1:-2])
    return batch


def _part_worker(conn, path: str, args: list[str], split: int, base: int, domain: str,
                 case_sensitive: bool, local_domains: frozenset[str] | None = None) -> None:
    """The second process of :func:`_parse_two`: parse from ``split`` on, send back
    ``("ok", keys, owners, targets, n_fast, wildcards, (external_owners, keys_local),
    warnings, scan_warnings)`` in a
    compact form (keys and targets joined into one string each, owners as an int array),
    or ``("error", origin, message, warnings, scan_warnings)``, or ``("crash", text, [],
    [])`` for anything unexpected."""
    warnings: list[str] = []
    scan_warnings: list[str] = []
    try:
        box = [args.pop()[split:]]
        batch, n_fast = _parse_part(path, box, base, split, domain, case_sensitive,
                                    warnings.append, True, scan_warnings.append,
                                    local_domains)
        keys = "\n".join([k or "" for k in batch.keys])  # keys are never empty
        owners = array("i", map(operator.add, batch.owners, itertools.repeat(base)))
        external = array("i", map(operator.add, batch.external_owners, itertools.repeat(base)))
        external = (external, batch.keys_local)
        targets = batch.targets
        joined = "\n".join(targets)
        # targets from the item scanner may in theory hold a newline: then send the list
        answer = ("ok", keys, owners, joined if joined.count("\n") == len(targets) - 1
                  else targets, n_fast, batch.wildcards, external, warnings, scan_warnings)
    except ForwardingSourceError as exc:
        answer = ("error", exc.origin, exc.message, warnings, scan_warnings)
    except Exception as exc:  # the parent parses again by itself and meets it there
        answer = ("crash", repr(exc), [], [])
    conn.send(answer)
    conn.close()


def _merge(batch: Batch, n_fast: int, keys: str, owners: array, targets, n_fast_b: int,
           wildcards: list, external: tuple[array, bool]) -> None:
    """Append the second half's entries to the first half's ``batch`` (fast-path targets
    of both halves first, then the scanner's, as one process orders them)."""
    batch.keys.extend([k or None for k in keys.split("\n")])
    del keys
    batch.lines = array("i", range(1, len(batch.keys) + 1))
    if isinstance(targets, str):
        targets = targets.split("\n") if targets else []
    scan_owners, scan_targets = batch.owners[n_fast:], batch.targets[n_fast:]
    del batch.owners[n_fast:], batch.targets[n_fast:]
    batch.owners.extend(owners[:n_fast_b])
    batch.targets.extend(targets[:n_fast_b])
    batch.owners.extend(scan_owners)
    batch.targets.extend(scan_targets)
    batch.owners.extend(owners[n_fast_b:])
    batch.targets.extend(targets[n_fast_b:])
    batch.wildcards.extend(wildcards)
    batch.external_owners.extend(external[0])
    batch.keys_local = batch.keys_local and external[1]


def _parse_part(path: str, box: list[str], base: int, start: int, domain: str,
                case_sensitive: bool, warn, fast: bool, scan_warn=None,
                local_domains: frozenset[str] | None = None) -> tuple[Batch, int]:
    """Parse the text in the one-item list ``box`` (emptied, so that the text can be
    freed early), which starts at line ``base`` (0-based) and character ``start`` of the
    file.  Entry ``i`` of the batch is line ``base + i``; owners count from 0.  Returns
    the batch and how many of its targets came from the fast path (they come first).
    ``scan_warn`` (default ``warn``) gets the warnings of the scanner stage, which runs
    after the fast path's.  ``local_domains``: see :func:`parse_lsearch`."""
    text = box.pop()
    batch = Batch(path)
    low = text if case_sensitive else text.lower()
    lower_each = False
    if len(low) != len(text):
        # lower() changed some lengths (a few non-ASCII letters do): keep line offsets
        # valid for the scanner by lowering entry by entry instead
        low, lower_each = text, True
    scan_lines = _scan_lines(low) if fast else None
    lines = low.split("\n")
    lowered = low is not text
    del low, text  # when lower-cased, the scanner re-reads the original text (see below)
    n = len(lines)
    # Entry i is line i.  Split every line at its first colon and find the *irregular*
    # lines in bulk; only those run through the Python loop below.
    # (two partition passes instead of one list of 3-tuples: a million tuples cost more
    # memory than the second pass costs time)
    colon = itertools.repeat(":")
    keys = list(map(itemgetter(0), map(str.partition, lines, colon)))
    datas = list(map(itemgetter(2), map(str.partition, lines, colon)))
    flags = list(map(operator.not_, map(operator.contains, lines, colon)))  # no colon, or empty
    if fast:
        for test in (map(str.startswith, lines, itertools.repeat(_IRREGULAR_START)),
                     map(operator.contains, datas, itertools.repeat(":")),
                     map(operator.contains, keys, itertools.repeat(" ")),
                     map(operator.contains, keys, itertools.repeat("\t"))):
            flags = list(map(operator.or_, flags, test))
        for i in scan_lines:
            flags[i] = True
    else:  # everything through the scanner (tests compare both ways)
        flags = [True] * n
    scan, continued = irregular_entries(
        lines, flags, lambda i, stripped: fast and i not in scan_lines and ":" not in stripped,
        "#", _WS)
    for i, more in continued.items():  # Exim turns the leading white space into one blank
        datas[i] = " ".join([datas[i].rstrip(), *(lines[k].strip() for k in more)])
    for i in itertools.compress(range(n), flags):
        keys[i] = None
        datas[i] = ""
    batch.keys = keys
    batch.lines = array("i", range(base + 1, base + n + 1))
    # the scanner needs the original text of its entries: note where it is, free the lines
    # and only then read the file again (never both in memory)
    spans = _spans(lines, lowered, scan)
    del lines
    raw = _original_lines(read_text(path)[start:] if lowered and spans else "", spans)
    regular = list(map(operator.not_, flags))
    del flags
    fast_idx = list(itertools.compress(range(n), regular))
    if fast_idx:
        datas = list(itertools.compress(datas, regular))
        del regular
        _fast_entries(batch, path, fast_idx, datas, domain, case_sensitive, lower_each, warn,
                      local_domains)
    del datas, fast_idx
    n_fast = len(batch.targets)
    if raw:
        _scan_entries(batch, path, raw, base, domain, case_sensitive, scan_warn or warn)
    if local_domains is not None:  # cheaper here, on fresh strings, and in both processes
        batch.local_domains = local_domains
        batch.keys_local = all(map(local_domains.__contains__, map(
            itemgetter(2), map(str.rpartition, filter(None, batch.keys), itertools.repeat("@")))))
    return batch, n_fast


def irregular_entries(lines: list, flags: list[bool], plain, comment, white
                      ) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Read the irregular lines of an lsearch text (``flags``; str or bytes lines) as Exim
    reads them.  Returns the scanner's entries, ``{key line: [first, last]}`` (0-based),
    and the plain continuations of the other (regular) key lines, ``{key line:
    [continuation lines]}``: those for which ``plain(line number, stripped line)`` holds.
    A regular key line with any other continuation becomes the scanner's, its flag set.
    ``comment`` starts a comment line (``"#"``), ``white`` holds the white space characters.
    Empty and comment lines end continuations; indented lines after them, or before any
    key, are ignored (Exim does the same)."""
    scan: dict[int, list[int]] = {}
    continued: dict[int, list[int]] = {}
    cur = -1  # the entry that continuation lines extend
    regular = False  # ... and whether it is still a regular one
    last = -2  # the previous irregular line
    for i in itertools.compress(range(len(lines)), flags):
        if last != i - 1 and i > 0:
            cur, regular = i - 1, True  # the line before was a regular key line
        last = i
        line = lines[i]
        c = line[:1]
        if not c or c == comment:
            cur = -1
            continue
        if c in white:
            if cur < 0:
                continue
            stripped = line.strip()
            if not stripped:
                cur = -1
            elif regular and plain(i, stripped):
                continued.setdefault(cur, []).append(i)
            elif regular:  # a continuation that needs the scanner: so does the entry
                scan[cur] = [cur, i]
                flags[cur] = True
                continued.pop(cur, None)
                regular = False
            else:
                scan[cur][1] = i
            continue
        scan[i] = [i, i]
        cur, regular = i, False
    return scan, continued


def _spans(lines: list[str], lowered: bool,
           scan: dict[int, list[int]]) -> list[tuple[int, int, list]]:
    """``(entry, first line, [where each line is])`` for each scanner entry: (offset,
    length) pairs into the original text when ``lines`` were lower-cased (lower-casing kept
    every length), else the lines themselves."""
    out = []
    line_no = offset = 0  # offset of the start of line ``line_no`` in the text
    for i, (first, last) in sorted(scan.items()):
        if not lowered:
            out.append((i, first, lines[first:last + 1]))
            continue
        offset += sum(map(len, lines[line_no:first])) + (first - line_no)
        places = []
        for k in range(first, last + 1):
            places.append((offset, len(lines[k])))
            offset += len(lines[k]) + 1
        line_no = last + 1
        out.append((i, first, places))
    return out


def _original_lines(text: str, spans: list[tuple[int, int, list]]
                    ) -> list[tuple[int, int, list[str]]]:
    """``(entry, first line, original lines)``, from :func:`_spans` and the original text."""
    if not text:
        return spans
    return [(i, first, [text[o:o + n] for o, n in places]) for i, first, places in spans]


def _fast_entries(batch: Batch, path: str, fast_idx: list[int], datas: list[str],
                  domain: str, case_sensitive: bool, lower_each: bool, warn,
                  local_domains: frozenset[str] | None = None) -> None:
    """Keys and targets of the fast-path entries, processed in bulk."""
    keys, klines = batch.keys, batch.lines
    n = len(fast_idx)
    if lower_each:
        datas = list(map(str.lower, datas))
        for i in fast_idx:
            keys[i] = keys[i].lower()
    fast_keys = keys if n == len(keys) else list(map(keys.__getitem__, fast_idx))
    # --- keys
    if domain:
        if not any(map(operator.contains, fast_keys, itertools.repeat("@"))) \
                and not _any_bad_char("\n".join(fast_keys)):
            for i in fast_idx:
                keys[i] = f"{keys[i]}@{domain}"
        else:
            _check_keys(batch, path, fast_idx, domain, case_sensitive, warn)
    elif not case_sensitive and _count_at(fast_keys) == (n, n) \
            and _bulk_ok("\n".join(fast_keys), "\n"):
        pass  # all of them are plain lower-case local@domain keys
    else:
        _check_keys(batch, path, fast_idx, domain, case_sensitive, warn)
    del fast_keys
    # --- targets: "a@x, b@y" -> ["a@x", "b@y"] for all entries at once
    joined = ",".join(map(str.strip, datas)).replace(", ", ",")
    if " " in joined or "\t" in joined:
        joined = _COMMA_SPACE.sub(",", joined)
    counts = map(operator.add, map(str.count, datas, itertools.repeat(",")), itertools.repeat(1))
    owners = list(itertools.chain.from_iterable(map(itertools.repeat, fast_idx, counts)))
    datas.clear()  # the caller's list too: its strings are the next-largest thing in memory
    suspect = not _bulk_ok(joined, ",")
    targets = joined.split(",")
    del joined
    ats, with_at = _count_at(targets)
    if suspect or ats != with_at:
        for owner, item in zip(owners, targets):
            error = _item_error(item)
            if error is not None:
                raise ForwardingSourceError(f"{path}:{klines[owner]}", error)
    empty = targets.count("")
    if empty:  # empty items (a trailing comma, an empty value) are ignored, as Exim does
        keep = list(map(bool, targets))
        owners = list(itertools.compress(owners, keep))
        targets = list(itertools.compress(targets, keep))
        del keep
    if with_at != len(targets):
        # bare local parts: qualified with the key's domain (see the module docstring)
        for j, item in enumerate(targets):
            if "@" not in item:
                key = keys[owners[j]]
                targets[j] = f"{item}@{key[key.rfind('@') + 1:]}" if key else item
    if case_sensitive:
        for j, item in enumerate(targets):
            at = item.rfind("@")
            targets[j] = item[:at + 1] + item[at + 1:].lower()
    if local_domains is not None:
        # map builds: a target outside the local domains is external (no key has such a
        # domain, and fast-path targets are never pipes, files or specials): keep its owner
        local = list(map(local_domains.__contains__, map(
            itemgetter(2), map(str.rpartition, targets, itertools.repeat("@")))))
        if not all(local):
            batch.external_owners.extend(itertools.compress(owners, map(operator.not_, local)))
            owners = list(itertools.compress(owners, local))
            targets = list(itertools.compress(targets, local))
        del local
    # entries whose key was dropped keep their targets here; the graph never reaches them
    batch.owners.extend(owners)
    batch.targets.extend(targets)


def _check_keys(batch: Batch, path: str, fast_idx: list[int], domain: str,
                case_sensitive: bool, warn) -> None:
    """The careful per-key version of the bulk key check: warns and drops keys Exim never
    looks up, raises for malformed ones, lower-cases domains in case-sensitive mode."""
    keys, klines = batch.keys, batch.lines
    for i in fast_idx:
        raw = keys[i]
        try:
            key = _key(raw, domain, case_sensitive)
            if key is not None and _BAD_CHARS(key):
                raise ValueError("bad character")
        except ValueError as exc:
            raise ForwardingSourceError(f"{path}:{klines[i]}", f"bad key {raw!r}: {exc}") from None
        if key is None:
            _warn_key(warn, f"{path}:{klines[i]}", raw, domain)
        keys[i] = key


def _warn_key(warn, origin: str, raw: str, domain: str) -> None:
    if warn is not None:
        why = (f"a full address in a source with domain = {domain!r} (Exim looks up bare "
               "local parts there)" if domain else
               "no domain (set this source's domain if its keys are local parts)")
        warn(f"{origin}: key {raw!r} ignored: {why}")


def _scan_entries(batch: Batch, path: str, raw: list[tuple[int, int, list[str]]], base: int,
                  domain: str, case_sensitive: bool, warn) -> None:
    """Entries that need the slow path, from their original text (see _original_lines)."""
    keys = batch.keys
    lists = _ListParser(case_sensitive)
    for i, first, originals in raw:
        line = originals[0]
        origin = f"{path}:{base + first + 1}"
        raw_key, end = line_key(line)
        if end < 0:
            raise ForwardingSourceError(origin, "unterminated quoted key")
        rest = _after_key(line[end:])
        if not raw_key:
            raise ForwardingSourceError(origin, "empty key")
        parts = [rest.strip()]
        parts.extend(original.strip() for original in originals[1:])
        data = " ".join(p for p in parts if p)
        try:
            key = _key(raw_key, domain, case_sensitive)
            if key is not None and _BAD_CHARS(key.replace(" ", "")) and not line.startswith('"'):
                raise ValueError("bad character")
        except ValueError as exc:
            raise ForwardingSourceError(origin, f"bad key {raw_key!r}: {exc}") from None
        keys[i] = None
        if key is None:
            _warn_key(warn, origin, raw_key, domain)
            continue
        targets = lists.targets(data, _key_domain(key), lambda: origin)
        if key[0] == "*":
            batch.wildcards.append((key, targets, base + first + 1))
            continue
        keys[i] = key
        batch.owners.extend(itertools.repeat(i, len(targets)))
        batch.targets.extend(targets)


# ------------------------------------------------------------------------- sqlite --
def parse_sqlite(path: str, query: str, *, domain: str = "", case_sensitive: bool = False,
                 warn=None) -> Batch:
    """A :class:`Batch` from ``query``'s rows ``(source, destination)``; the database is
    opened read-only.  A destination is a redirection list like an lsearch value (commas
    allowed), so ``a@x,b@y`` rows and one-row-per-destination tables both work; several
    rows with the same source are all used.  A source ``@domain`` (Postfix-style catch-all)
    means ``*@domain``.  Origins are ``path:row N`` (1-based row of the result).
    """
    uri = "file:" + urllib.parse.quote(path) + "?mode=ro"
    domain = domain.lower()
    lists = _ListParser(case_sensitive)
    batch = Batch(path, first_wins=False, row_origins=True)
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise ForwardingSourceError(path, f"cannot open database: {exc}") from None
    try:
        try:
            cursor = conn.execute(query)
        except sqlite3.Error as exc:
            raise ForwardingSourceError(path, f"query failed: {exc}") from None
        row_no = 0
        while True:
            try:
                rows = cursor.fetchmany(10000)
            except sqlite3.Error as exc:
                raise ForwardingSourceError(f"{path}:row {row_no + 1}",
                                            f"query failed: {exc}") from None
            if not rows:
                break
            for row in rows:
                row_no += 1
                origin = f"{path}:row {row_no}"
                if len(row) < 2:
                    raise ForwardingSourceError(
                        origin, "the query must return two columns (source, destination)")
                source, destination = row[0], row[1]
                if not isinstance(source, str) or not isinstance(destination, str):
                    raise ForwardingSourceError(
                        origin, "source and destination must be text, got "
                        f"{type(source).__name__} and {type(destination).__name__}")
                raw_key = source.strip()
                if raw_key.startswith("@"):
                    raw_key = "*" + raw_key
                try:
                    key = _key(raw_key, domain, case_sensitive)
                    if key is not None and _BAD_CHARS(key):
                        raise ValueError("bad character")
                except ValueError as exc:
                    raise ForwardingSourceError(origin, f"bad source {source!r}: {exc}") from None
                if key is None:
                    _warn_key(warn, origin, source, domain)
                    continue
                batch.add(key, lists.targets(destination, _key_domain(key), lambda: origin),
                          row_no)
    finally:
        conn.close()
    return batch


def open_source(source: ForwardingSource, *, case_sensitive: bool, warn=None,
                local_domains: frozenset[str] | None = None) -> Batch:
    """Read one configured source (``local_domains``: see :func:`parse_lsearch`)."""
    if source.type == "lsearch":
        return parse_lsearch(source.path, domain=source.domain, case_sensitive=case_sensitive,
                             warn=warn, local_domains=local_domains)
    if source.type == "sqlite":
        return parse_sqlite(source.path, source.query, domain=source.domain,
                            case_sensitive=case_sensitive, warn=warn)
    raise ForwardingError(f"{source.path}: unknown source type {source.type!r}")
