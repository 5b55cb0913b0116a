"""Exim's scan-file wrapper: build it, strip it, read the envelope from it.

Exim sends the message to the spam scanner as a one-message mbox written by spool_mbox.c
(docs/wire-formats.md, "Exim's scan file (both variants)")::

    From ${if def:return_path{$return_path}{MAILER-DAEMON}} ${tod_bsdinbox}\\n
    ${if def:sender_address{X-Envelope-From: <${sender_address}>\\n}}
    ${if def:recipients{X-Envelope-To: ${recipients}\\n}}
    <header lines, LF>\\n\\n<body, LF>

Only the pseudo-headers *directly after* the ``From `` line are Exim's; a message can carry
forged ``X-Envelope-*`` headers of its own further down, which are ignored.
"""
from __future__ import annotations

import email.errors
import email.header
from collections.abc import Iterator, Sequence
from datetime import datetime

from .text import has_line_breaker, printable, split_address_list, strip_angle

_FROM_ = b"From "


def strip_mbox_from_line(body: bytes | bytearray) -> bytes | bytearray | memoryview:
    """``body`` without a leading mbox ``From `` line (Exim's wrapper); otherwise unchanged.

    The rest is a view into ``body``, not a copy: a large message is held once."""
    if not body.startswith(_FROM_):
        return body
    newline = body.find(b"\n")
    return b"" if newline < 0 else memoryview(body)[newline + 1:]


def exim_mbox_wrap(message: bytes, *, sender: str | None, recipients: Sequence[str],
                   now: datetime | None = None) -> bytes:
    """The scan file Exim would write for ``message`` (e.g. to replay it to Rspamd).

    ``sender`` None or ``""`` (a bounce) gives ``From MAILER-DAEMON`` and no
    ``X-Envelope-From``, exactly as Exim's ``def:sender_address`` (false when empty) does;
    no recipients gives no ``X-Envelope-To``. ``now`` (local time) defaults to the current
    time and is printed like ``${tod_bsdinbox}`` (``Sun Nov 22 05:56:46 2026``). CRLF line
    ends of ``message`` become LF as in Exim's spool. Addresses are encoded as UTF-8 (they
    come from a user or config here, not from a latin-1 decoded request).
    """
    when = (now or datetime.now()).ctime()  # ctime() uses English names regardless of locale
    lines = [f"From {sender or 'MAILER-DAEMON'} {when}\n"]
    if sender:
        lines.append(f"X-Envelope-From: <{sender}>\n")
    if recipients:
        lines.append(f"X-Envelope-To: {', '.join(recipients)}\n")
    head = "".join(lines).encode("utf-8", errors="surrogateescape")
    return head + message.replace(b"\r\n", b"\n")


def _lines(body: bytes | bytearray, start: int, limit: int) -> Iterator[bytes | bytearray]:
    """Up to ``limit`` lines of ``body`` from offset ``start``, without LF / CRLF.

    Found with ``find`` so that a large body is never split or copied as a whole.
    """
    for _ in range(limit):
        if start >= len(body):
            return
        end = body.find(b"\n", start)
        line = body[start:] if end < 0 else body[start:end]
        yield line[:-1] if line.endswith(b"\r") else line
        if end < 0:
            return
        start = end + 1


def leading_headers(body: bytes | bytearray,
                    max_lines: int = 64) -> list[tuple[str, str]]:
    """The header fields at the top of ``body`` (after a ``From `` line if there is one).

    Returns (name as sent, value) pairs, values decoded as latin-1 with continuation lines
    unfolded (joined by one space). Stops at the blank line, at a line that is not a header,
    or after ``max_lines`` physical lines: callers only need the first few (Exim's
    pseudo-headers and its own ``Received:``), and a huge message must cost nothing.
    """
    start = 0
    if body.startswith(_FROM_):
        start = body.find(b"\n") + 1
        if start == 0:  # nothing but a From_ line
            return []
    found: list[tuple[str, str]] = []
    for line in _lines(body, start, max_lines):
        text = line.decode("latin-1")
        if text[:1] in (" ", "\t"):
            if not found:
                break
            name, value = found[-1]
            found[-1] = (name, f"{value} {text.strip()}".strip())
            continue
        name, colon, value = text.partition(":")
        name = name.rstrip(" \t")  # obsolete syntax allows "Name :"
        if not colon or not name or " " in name or "\t" in name:
            break
        found.append((name, value.strip()))
    return found


def envelope_from_mbox(body: bytes | bytearray) -> tuple[str | None, tuple[str, ...]]:
    """(sender, recipients) from Exim's ``X-Envelope-From``/``X-Envelope-To`` pseudo-headers.

    Only the first occurrence of each, in the run of pseudo-headers that directly follows the
    ``From `` line, counts. The sender is None when absent (Exim writes none for a bounce, so
    ``<>`` never appears), ``<>`` stripped otherwise; values with NUL/CR/LF count as absent.
    """
    sender: str | None = None
    recipients: tuple[str, ...] = ()
    if not body.startswith(_FROM_):
        return sender, recipients
    seen: set[str] = set()
    for name, value in leading_headers(body):
        name = name.lower()
        if name not in ("x-envelope-from", "x-envelope-to"):
            break  # the first real header ends Exim's pseudo-headers
        if name in seen:
            continue
        seen.add(name)
        if has_line_breaker(value):
            continue
        if name == "x-envelope-from":
            sender = strip_angle(value)
        else:
            recipients = tuple(split_address_list(value))
    return sender, recipients


def subject_of(body: bytes | bytearray, max_lines: int = 200) -> str | None:
    """The message's Subject (RFC 2047 words decoded), as safe one-line text, or None.

    Looked for in the first ``max_lines`` header lines only: it is evidence for an
    incident notice, not worth reading a large header block for.
    """
    for name, value in leading_headers(body, max_lines):
        if name.lower() == "subject":
            try:  # raw 8-bit UTF-8 (SMTPUTF8) arrives as latin-1 text
                value = value.encode("latin-1").decode("utf-8")
            except UnicodeError:
                pass
            try:
                text = str(email.header.make_header(email.header.decode_header(value)))
            except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
                text = value
            return printable(text, 200)
    return None
