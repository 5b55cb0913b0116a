"""Exim's redirection lists: the data of an alias entry -> its targets.

What Exim 4.96's ``parse_forward_list()`` (src/parse.c) does with a redirect router's data,
checked against ``exim -bt`` (tests/test_forwarding_exim.py):

- Items are separated by commas and white space (newlines too: ``:include:`` files); a
  ``#`` where an item would start comments out the rest of the line.  An item ends at a
  comma or newline outside ``"quotes"``, ``(comments)``, ``<route-addrs>`` and source routes
  (``@relay,@relay2:user@domain``); a backslash escapes the next character.  An item
  entirely in quotes loses them; a prefix of ``:unknown:`` and a comment alone are ignored.
- ``:blackhole:`` or ``:defer:`` *anywhere* throw the whole list away (Exim discards or
  defers the address): the targets are just that marker.  ``:fail:`` ends the list (the rest
  of the line is its message), the items before it are still delivered.  (Any case.)
- ``:include:/path`` is read (once per build) and spliced in; a ``:fail:`` in it drops the
  included items before it, a ``:blackhole:`` or ``:defer:`` the whole list.
- ``|command`` and ``/file`` are pipes and files unless they are an address with a domain
  (``/X=y/@gate.example``); in a quoted item backslashes are removed.  ``\\local``: no
  further redirection by this router.
- Anything else is an address (``Name <addr>``, comments and quoted local parts understood);
  a bare local part gets the domain of the address redirected (``qualify_preserve_domain``).

Targets are ``local@domain`` (see addresses.py), a bare local part (only the ``*`` key's:
the graph qualifies them per domain), or a *local end*, known by its first character:
``:blackhole:``, ``:defer: text``, ``:fail: text``, ``|command``, ``/file``, ``\\address`` (an
address that starts with one of those characters is an :class:`Address`).
"""
from __future__ import annotations

import re

from .addresses import (ESCAPED, WHITE, ForwardingSourceError, normalize, parse_address,
                        read_text)

#: first characters of the targets that are local ends (unless they are an Address)
END_START = frozenset(":|/\\")
_SPECIALS = (":blackhole:", ":defer:", ":fail:")
#: characters where the scan of an item has something to do
_STOP = re.compile(r'[\\"(<>:,\n]').search
_SEPARATORS = re.compile(r"[ \t\n\r\v\f,]*").match


class Address(str):
    """An address target that starts as a local end would (``/X=y/@gate.example``, an X.400
    gateway's; a quoted local part ``":x"@example.com``): the graph follows it."""
    __slots__ = ()


def _item_end(text: str, i: int) -> int:
    """Where the item at ``text[i]`` ends: at a comma or newline that no quotes, comment,
    route-addr or source route encloses (Exim's parse_find_address_end)."""
    routing, n = text[i] == "@", len(text)
    no_term = int(routing)
    while i < n:
        m = _STOP(text, i)
        if m is None:
            return n
        i = m.start()
        c = text[i]
        if c == "\n" or (c == "," and no_term <= 0):
            return i
        if c == "\\":
            i += 2
            continue
        if c == '"' or c == "(":  # up to the closing quote or parenthesis, on this line
            level, i = 1, i + 1
            while i < n and text[i] != "\n":
                d = text[i]
                i += 1
                if d == "\\":
                    i += 1
                elif d == c == '"':
                    break
                elif c == "(" and d in "()":
                    level += 1 if d == "(" else -1
                    if not level:
                        break
            continue
        if c == "<":
            routing = text[i + 1:i + 2] == "@"
            no_term = 2 if routing else 1
        elif c == ">" or (c == ":" and routing):
            no_term -= 1
        i += 1
    return n


class RedirectParser:
    """Parses the redirection lists of one source; ``:include:`` files are read once."""

    def __init__(self, case_sensitive: bool) -> None:
        self.case_sensitive = case_sensitive
        self._files: dict[str, str] = {}
        self._active: list[str] = []  # the include files being read (loop detection)

    def parse(self, text: str, domain: str | None, origin: str) -> list[str]:
        """The targets of ``text``; ``domain`` (None: none) qualifies bare local parts."""
        return self._list(text, domain, origin)[0]

    def _list(self, text: str, domain: str | None, origin: str
              ) -> tuple[list[str], str | None]:
        """(targets, the ``:fail:``/``:defer:``/``:blackhole:`` marker that ended the list)."""
        out: list[str] = []
        i, n = 0, len(text)
        while True:
            i = _SEPARATORS(text, i).end()
            if i < n and text[i] == "#":
                i = text.find("\n", i)
                if i < 0:
                    return out, None
                continue
            if i >= n:
                return out, None
            start, i = i, _item_end(text, i)
            item = text[start:i].rstrip(WHITE)
            quoted = len(item) > 1 and item[0] == '"' and item[-1] == '"'
            if quoted:
                item = item[1:-1].strip(WHITE)
            if ":unknown:".startswith(item):
                continue
            low = item[:11].lower()
            special = next((s for s in _SPECIALS if low.startswith(s)), None)
            if special is None and low.startswith(":include:"):
                included, end = self._include(item[9:].strip(WHITE), domain, origin)
                if end is None:
                    out.extend(included)
                    continue
                special = end
            elif special is not None:
                # the message is the rest of the line (commas and all), quotes removed
                nl = text.find("\n", start)
                rest = text[start:n if nl < 0 else nl].strip(WHITE).removeprefix('"')
                message = rest[len(special):].strip(WHITE).rstrip('"').strip(WHITE)
                special = special if special == ":blackhole:" else \
                    f"{special} {message}".rstrip(WHITE)
            if special is not None:
                return (out + [special] if special.startswith(":fail:") else [special]), special
            target = self._target(item, quoted, domain, origin)
            if target is not None:
                out.append(target)

    def _target(self, item: str, quoted: bool, domain: str | None, origin: str) -> str | None:
        """An address, pipe, file or ``\\address`` (None: only comments)."""
        if item[0] == ":":
            raise ForwardingSourceError(origin, f"unknown special item {item!r}")
        prefix = "\\" if item[0] == "\\" else ""
        end = item[0] in "|/"  # (Exim: a pipe or file unless it is an address with a domain)
        try:
            local, dom = parse_address(item[len(prefix):])
        except ValueError as exc:
            if end:
                return ESCAPED.sub(r"\1", item) if quoted else item
            if str(exc) == "empty address" and not prefix:
                return None
            raise ForwardingSourceError(origin, f"bad address {item!r}: {exc}") from None
        if dom is None:
            if end:
                return ESCAPED.sub(r"\1", item) if quoted else item
            if domain is None:
                return prefix + (local if self.case_sensitive else local.lower())
            dom = domain
        address = normalize(local, dom, self.case_sensitive)
        return Address(address) if address[0] in END_START and not prefix else prefix + address

    def _include(self, path: str, domain: str | None, origin: str
                 ) -> tuple[list[str], str | None]:
        if not path.startswith("/"):
            raise ForwardingSourceError(origin, f":include: {path!r} is not an absolute path")
        if path in self._active:
            raise ForwardingSourceError(origin, f":include: loop through {path}")
        text = self._files.get(path)
        if text is None:
            try:
                text = self._files[path] = read_text(path)
            except ForwardingSourceError as exc:
                raise ForwardingSourceError(origin, f":include:{path}: {exc.message}") from None
        self._active.append(path)
        try:
            return self._list(text, domain, f"{origin} (:include:{path})")
        finally:
            self._active.pop()
