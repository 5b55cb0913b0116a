"""Small text helpers shared by the codecs: sanitising reply values and splitting addresses.

Pure functions, no I/O. Reply values are ``str`` inside the program and UTF-8 on the wire;
request values arrive as latin-1 decoded ``str`` (see :class:`exim_policy.model.Request`).
"""
from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from .scores import clean_score

#: Exim keeps 32599 bytes of a reply and copies ``$spam_report`` into a 32600-byte buffer
#: without a bounds check (docs/wire-formats.md, "How Exim reads a reply" and "What the ACL
#: sees"), so every reply stays well below that.
MAX_REPLY_BYTES = 30000
#: longest value kept on one reply line (a Message, Reason, Subject or Symbol line of the
#: RSPAMC reply, a line of the SpamAssassin report): with it the lines that are never
#: dropped stay far below MAX_REPLY_BYTES
MAX_VALUE_BYTES = 2000

#: bytes that would end or corrupt a reply line if they appeared inside a value
_LINE_BREAKERS = {0x00: " ", 0x0A: " ", 0x0D: " "}


def one_line(text: str) -> str:
    """``text`` with NUL, CR and LF replaced by a space, so it stays inside one reply line."""
    return text.translate(_LINE_BREAKERS)


def encode(text: str) -> bytes:
    """Reply values go out as UTF-8 (Rspamd's JSON strings are Unicode)."""
    return text.encode("utf-8", errors="replace")


def truncate_bytes(data: bytes, limit: int) -> bytes:
    """At most ``limit`` bytes of ``data``, cut at a UTF-8 character boundary."""
    if len(data) <= limit:
        return data
    cut = data[:limit]
    # drop a partial multi-byte sequence at the end: continuation bytes are 10xxxxxx
    end = len(cut)
    while end > 0 and (cut[end - 1] & 0xC0) == 0x80:
        end -= 1
    if end > 0 and cut[end - 1] >= 0xC0:
        lead = cut[end - 1]
        need = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        if len(cut) - (end - 1) < need:
            return cut[: end - 1]
    return cut


def keep_within(lines: list[bytes], order: list[int], budget: int) -> set[int]:
    """Indexes of ``lines`` kept when taken in priority ``order`` while they fit ``budget``.

    A line that does not fit is skipped; a later, shorter one may still fit.
    """
    kept: set[int] = set()
    for index in order:
        size = len(lines[index])
        if size <= budget:
            kept.add(index)
            budget -= size
    return kept


def trim_reply(extra: list[bytes], symbols: list[bytes], scores: Sequence[float | None],
               n_own: int, budget: int) -> tuple[set[int], set[int]]:
    """What of a reply's droppable lines fits ``budget`` bytes: the indexes of the
    ``extra`` message lines kept (they outrank symbol lines, in their order), then of the
    ``symbols`` lines (``scores``: their scores, looked at only when something must go;
    the last ``n_own`` are the shim's, see :func:`symbol_priority`)."""
    if sum(map(len, extra)) + sum(map(len, symbols)) <= budget:  # (nearly always)
        return set(range(len(extra))), set(range(len(symbols)))
    kept_extra = keep_within(extra, list(range(len(extra))), budget)
    budget -= sum(len(extra[i]) for i in kept_extra)
    return kept_extra, keep_within(symbols, symbol_priority(scores, n_own), budget)


def symbol_priority(scores: Sequence[float | None], n_own: int) -> list[int]:
    """Which symbols to keep first when a reply must be cut: ``scores`` lists Rspamd's
    symbols, then the shim's ``n_own`` context symbols. The shim's come first (Rspamd's
    symbols are in the log anyway), then Rspamd's by descending ``|score|``."""
    n_rspamd = len(scores) - n_own
    order = list(range(n_rspamd, len(scores)))
    order += sorted(range(n_rspamd), key=lambda i: -abs(clean_score(scores[i])))
    return order


def has_line_breaker(text: str) -> bool:
    """True if ``text`` holds NUL, CR or LF (such a request value is treated as absent)."""
    return "\x00" in text or "\r" in text or "\n" in text


def strip_angle(address: str) -> str:
    """``<a@b>`` -> ``a@b``, ``<>`` -> ``""``; surrounding whitespace removed; bare stays bare."""
    address = address.strip()
    if len(address) >= 2 and address[0] == "<" and address[-1] == ">":
        return address[1:-1].strip()
    return address


def split_address_list(text: str) -> list[str]:
    """Split ``a@x, <b@y>, "c,d"@z`` at commas outside quotes and angle brackets.

    Rspamd splits a ``Rcpt`` header the same way (quoted strings respected); angle brackets
    are respected as well so that a source route ``<@r1,@r2:a@b>`` stays one address.
    Items are stripped of whitespace and ``<>``; empty items (also ``<>``) are dropped.
    """
    items: list[str] = []
    current: list[str] = []
    in_quotes = False
    depth = 0
    escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif in_quotes and ch == "\\":
            escaped = True
        elif ch == '"':
            in_quotes = not in_quotes
        elif not in_quotes and ch == "<":
            depth += 1
        elif not in_quotes and ch == ">" and depth > 0:
            depth -= 1
        elif not in_quotes and depth == 0 and ch == ",":
            items.append("".join(current))
            current = []
            continue
        current.append(ch)
    items.append("".join(current))
    stripped = (strip_angle(item) for item in items)
    return [item for item in stripped if item]


def valid_ip(text: str | None) -> str | None:
    """``text`` stripped if it is an IPv4/IPv6 address (scope id allowed), else None."""
    if text is None:
        return None
    text = text.strip()
    if not text:
        return None
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return None
    return text


def printable(text: str, limit: int = 200) -> str:
    """``text`` safe for a log line, a mail header or a key: backslash and every
    non-printable character escaped (``\\x00``, ``\\n``, ``\\u2028``), at most ``limit``
    characters, a longer one cut with ``...(N chars)``. Printable non-ASCII stays."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    escaped = "".join(out)
    if len(escaped) <= limit:
        return escaped
    return f"{escaped[:limit]}...({len(text)} chars)"
