"""Exim address syntax: addresses and alias keys as the sources write them, the errors every
source raises, reading a source file.  Names are normalised as the graph compares them: the
domain lower-cased, the local part too unless ``case_sensitive``.  RFC 5322 specials and
(ASCII) white space are never allowed unquoted in a local part or domain; anything else
(UTF-8 too) is, as in Exim.
"""
from __future__ import annotations

import re

#: Exim's isspace(): ASCII white space only
WHITE = " \t\n\r\v\f"
_ATOM = re.compile(r'[^ \t\n\r\v\f@,;:<>()\[\]"\\]+').fullmatch
_BAD_KEY = re.compile(r'[ \t\r\f\v;<>()\[\]"\\]').search
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"', re.S).match
ESCAPED = re.compile(r"\\(.)", re.S)


class ForwardingError(Exception):
    """Anything that stops a build: the old map stays untouched, the CLI exits 2."""


class ForwardingSourceError(ForwardingError):
    """Bad input in a source; ``str()`` is ``origin: message`` (``/etc/exim4/virtual:12: ...``)."""

    def __init__(self, origin: str, message: str) -> None:
        super().__init__(f"{origin}: {message}")
        self.origin = origin
        self.message = message


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except (OSError, ValueError) as exc:  # (ValueError: a NUL in an :include: path)
        raise ForwardingSourceError(path, exc.strerror if isinstance(exc, OSError)
                                    and exc.strerror else str(exc)) from None


def read_text(path: str, raw: bytes | None = None, first: int = 0) -> str:
    """A file (or ``raw``, its text from line ``first`` on) as UTF-8 text; errors name the
    file (and the line, for bad bytes)."""
    raw = read_bytes(path) if raw is None else raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first + raw.count(b"\n", 0, exc.start) + 1
        raise ForwardingSourceError(f"{path}:{line}", "not valid UTF-8") from None


def is_domain(domain: str) -> bool:
    """A dot-separated name without empty labels, or a domain literal ``[192.0.2.1]``."""
    if domain.startswith("[") and domain.endswith("]"):
        return len(domain) > 2
    return (_ATOM(domain) is not None and not domain.startswith(".")
            and not domain.endswith(".") and ".." not in domain)


def unquote(text: str) -> tuple[str, int]:
    """The quoted string ``text`` starts with, without its quotes and backslashes, and the
    index just past its closing quote (-1: none)."""
    m = _QUOTED(text)
    return (ESCAPED.sub(r"\1", m.group(1)), m.end()) if m else ("", -1)


def parse_address(item: str) -> tuple[str, str | None]:
    """One address as written in a redirection list -> ``(local_part, domain or None)``.

    Understands ``Name <addr>``, ``(comments)``, a quoted local part and a source route
    (``@relay,@relay2:user@domain``, whose final address is used).  Raises ValueError
    (``"empty address"`` for one that is only comments: Exim ignores those)."""
    text = item
    if "(" in text:  # RFC 822 comments; no nesting in practice
        text = re.sub(r"\([^()]*\)", " ", text)
    if text.lstrip(WHITE).startswith("@") and ":" not in text:
        raise ValueError("colon expected after route list")
    if "<" in text:
        lt = text.rfind("<")
        gt = text.find(">", lt)
        if gt < 0:
            raise ValueError("'<' without '>'")
        if text[gt + 1:].strip(WHITE):
            raise ValueError("text after '>'")
        text = text[lt + 1:gt]
        if not text.strip(WHITE):
            raise ValueError("missing local part")
    text = text.strip(WHITE)
    if text.startswith("@") and ":" in text:  # source route
        text = text.split(":", 1)[1].strip(WHITE)
    if not text:
        raise ValueError("empty address")
    if text.startswith('"'):
        local, end = unquote(text)
        if end < 0:
            raise ValueError("unterminated quoted local part")
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
        if not local or _ATOM(local) is None:
            raise ValueError("bad local part")
    if domain is not None and not is_domain(domain):
        raise ValueError("bad domain")
    return local, domain


def normalize(local: str, domain: str, case_sensitive: bool) -> str:
    return f"{local if case_sensitive else local.lower()}@{domain.lower()}"


def key(raw: str, domain: str, case_sensitive: bool, quoted: bool = False) -> str | None:
    """An alias key -> ``local@domain``, ``*@domain`` or ``*``; None when Exim never looks it
    up (see :func:`ignored`).  ``domain``: a source's whose keys are bare local parts;
    ``quoted``: the key was quoted (any character goes).  ValueError: not an address."""
    if domain:
        if "@" in raw:
            return None
        name = f"*@{domain}" if raw == "*" else normalize(raw, domain, case_sensitive)
    elif raw == "*":
        return "*"
    else:
        local, at, dom = raw.rpartition("@")
        if not at:
            return None
        if not local:
            raise ValueError("empty local part")
        if not is_domain(dom):
            raise ValueError("bad domain")
        name = f"*@{dom.lower()}" if local == "*" else normalize(local, dom, case_sensitive)
    if not quoted and _BAD_KEY(name):
        raise ValueError("bad character")
    return name


def ignored(origin: str, raw: str, domain: str, name: str | None = None) -> str:
    """The warning for a key Exim never looks up (``name``: one in a domain not local)."""
    why = (f"{name[name.rfind('@') + 1:]} is not a local domain" if name else
           f"a full address in a source with domain = {domain!r} (Exim looks up bare local "
           "parts there)" if domain else
           "no domain (set this source's domain if its keys are local parts)")
    return f"{origin}: key {name or raw!r} ignored: {why}"
