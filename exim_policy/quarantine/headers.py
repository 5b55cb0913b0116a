"""The header block of a message streaming through: read its fields, drop ours.

:class:`HeaderSplitter` is sans-IO: message bytes in (any chunking), bytes to store out.
It holds the header block until its end (the first empty line, at most
:data:`MAX_HEADER_BYTES`), hands out every field, and leaves out the ``X-Exim-Policy-*``
fields: they carry the evidence to the index, and a released message must not show them
(``X-Exim-Policy-Recipients`` lists the Bcc recipients). The body passes unchanged.
"""
from __future__ import annotations

import email.errors
import email.header
import re

from ..protocol.text import printable

#: a header block larger than this is passed on as it is (nothing stripped, no fields read)
MAX_HEADER_BYTES = 1024 * 1024
OURS = b"x-exim-policy-"

_LINE_END = re.compile(r"\r?\n")
_LINE = re.compile(rb"[^\n]*\n|[^\n]+")


class HeaderSplitter:
    def __init__(self) -> None:
        self._held = bytearray()
        self.in_body = False
        #: (name, raw value with its folding) of every header field, in order
        self.fields: list[tuple[str, bytes]] = []

    def feed(self, data: bytes) -> bytes:
        if self.in_body:
            return data
        self._held += data
        end = _header_end(self._held)
        if end < 0:
            if len(self._held) <= MAX_HEADER_BYTES:
                return b""
            self.in_body = True  # not a header block we can read: keep it all
            out = bytes(self._held)
            self._held = bytearray()
            return out
        return self._split(end)

    def close(self) -> bytes:
        """The end of the message: a header block with no body after it."""
        if self.in_body:
            return b""
        return self._split(len(self._held))

    def _split(self, end: int) -> bytes:
        self.in_body = True
        head, body = bytes(self._held[:end]), bytes(self._held[end:])
        self._held = bytearray()
        kept = []
        for raw in _fields(head):
            name, _, value = raw.partition(b":")
            self.fields.append((name.strip().decode("latin-1"), value))
            if not name.strip().lower().startswith(OURS):
                kept.append(raw)
        return b"".join(kept) + body


def _header_end(held: bytearray) -> int:
    """Offset of the empty line that ends the header block (kept with the body), or -1."""
    if held.startswith(b"\r\n") or held.startswith(b"\n"):
        return 0
    # the first of either: which one a segment holds must not decide where the block ends
    ends = [at + len(sep) // 2 for sep in (b"\r\n\r\n", b"\n\n") if (at := held.find(sep)) >= 0]
    return min(ends, default=-1)


def _fields(head: bytes) -> list[bytes]:
    """The header block cut into fields, each with its continuation lines and line ends."""
    fields: list[bytes] = []
    # LF ends a line, as in Exim: a bare CR is a byte of the field (splitlines() cut there:
    # "X-A: a\rX-Exim-Policy-...: forged" became a field of ours)
    for line in _LINE.findall(head):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def unfold(value: bytes) -> str:
    """A field's value on one line, as text (bytes that are not UTF-8 kept as latin-1)."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = value.decode("latin-1")
    return _LINE_END.sub("", text).strip()


def lines_of(value: bytes) -> list[str]:
    """A value folded one item per line (as Exim folds ``$spam_report``), line by line."""
    text = value.decode("utf-8", "replace")
    return [line.strip() for line in _LINE_END.split(text) if line.strip()]


def decoded(value: bytes) -> str:
    """A field value for display: unfolded, RFC 2047 words decoded, control bytes gone."""
    text = unfold(value)
    try:
        text = str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, UnicodeError, email.errors.MessageError):
        # (MessageError: a bad base64 word, a charset name that is not ASCII)
        pass
    return printable(text)


def first(fields: list[tuple[str, bytes]], name: str) -> bytes | None:
    name = name.lower()
    for field_name, value in fields:
        if field_name.lower() == name:
            return value
    return None
