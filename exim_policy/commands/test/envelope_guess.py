"""An SMTP envelope for a stored message, and the message as Exim would hand it to the shim.

Used by ``exim-policy test``: a saved ``.eml`` has no envelope, so one is derived. Pure
functions, no I/O.

Where each part of the envelope comes from, first match wins:

- sender: ``--from`` (``<>`` or ``""`` is a bounce) > Exim's ``X-Envelope-From`` pseudo-header
  (when the file is an Exim scan file: a ``From `` line followed directly by
  ``X-Envelope-*``; such a file with ``X-Envelope-To`` but no ``X-Envelope-From`` is a bounce)
  > the first address of the ``From:`` header > none (no ``From`` is sent to Rspamd);
- recipients: ``--rcpt`` (repeatable) > Exim's ``X-Envelope-To`` > every address of every
  ``To:`` and ``Cc:`` header, in order, duplicates (case-insensitive) dropped; ``Bcc:`` and
  ``Resent-*`` are not used (a stored Bcc header is rare and usually incomplete);
- authenticated user, client IP and HELO: only from ``--user``, ``--ip``, ``--helo``; without
  them the message is unauthenticated and Rspamd gets no IP/Helo (as for a message submitted
  locally). Rspamd 3.4 offline treats a message without IP more harshly than one from
  127.0.0.1, so pass ``--ip`` to reproduce a verdict for a real client.

Strings inside the :class:`~exim_policy.model.Envelope` are in the daemon's *wire form*:
raw bytes decoded as latin-1 (as the codecs decode Exim's request), so 8-bit addresses reach
Rspamd byte for byte. :func:`wire_text` converts command-line text to it and
:func:`display_text` converts back for people.
"""
from __future__ import annotations

import email.utils
from collections.abc import Sequence
from dataclasses import dataclass

from ...model import Envelope
from ...protocol.mbox import envelope_from_mbox, exim_mbox_wrap, leading_headers
from ...protocol.text import has_line_breaker, strip_angle

#: header lines read at most (a header block this long is already absurd; the limit keeps a
#: garbage file from being scanned line by line)
MAX_HEADER_LINES = 5000

_PSEUDO_HEADERS = (b"x-envelope-from:", b"x-envelope-to:")


def wire_text(text: str) -> str:
    """Command-line text (UTF-8 with surrogateescape, as Python decodes argv) -> wire form."""
    return text.encode("utf-8", errors="surrogateescape").decode("latin-1")


def display_text(wire: str) -> str:
    """Wire form -> text for people: UTF-8 when the bytes are UTF-8, else U+FFFD for bad ones."""
    return wire.encode("latin-1", errors="replace").decode("utf-8", errors="replace")


def _address_text(wire: str) -> str:
    """Wire form -> ``str`` that encodes back to the same bytes with surrogateescape."""
    return wire.encode("latin-1", errors="replace").decode("utf-8", errors="surrogateescape")


@dataclass(frozen=True)
class EnvelopeGuess:
    """The envelope and, for people, where its sender and recipients came from."""

    envelope: Envelope
    sender_source: str       # "--from", "X-Envelope-From", "From: header", "none", ...
    recipients_source: str   # "--rcpt", "X-Envelope-To", "To/Cc headers", "none"


def _addresses(values: Sequence[str]) -> list[str]:
    """Mailbox addresses in header values (display names, comments and groups handled by
    the stdlib); only ``local@domain`` forms without control characters are kept."""
    found = []
    for _name, addr in email.utils.getaddresses(list(values)):
        addr = strip_angle(addr)
        if "@" in addr and not has_line_breaker(addr) and " " not in addr:
            found.append(addr)
    return found


def _unique(addresses: Sequence[str]) -> tuple[str, ...]:
    seen: set[str] = set()
    out = []
    for addr in addresses:
        key = addr.lower()
        if key not in seen:
            seen.add(key)
            out.append(addr)
    return tuple(out)


def guess_envelope(message: bytes, *, sender: str | None = None,
                   recipients: Sequence[str] = (), user: str | None = None,
                   ip: str | None = None, helo: str | None = None) -> EnvelopeGuess:
    """The envelope for ``message`` (see the module docstring for the precedence).

    Keyword arguments are overrides in wire form (None / empty: derive); ``sender`` may be
    ``""`` or ``"<>"`` for a bounce.
    """
    pseudo_sender, pseudo_rcpts = envelope_from_mbox(message)
    is_scan_file = pseudo_sender is not None or bool(pseudo_rcpts)
    headers = leading_headers(message, MAX_HEADER_LINES)

    def values(*names: str) -> list[str]:
        wanted = {n.lower() for n in names}
        return [v for k, v in headers if k.lower() in wanted]

    if sender is not None:
        env_sender, sender_source = strip_angle(sender), "--from"
    elif is_scan_file:
        # Exim writes no X-Envelope-From for a bounce (sender <>)
        env_sender = pseudo_sender if pseudo_sender is not None else ""
        sender_source = "X-Envelope-From" if pseudo_sender is not None else \
            "Exim scan file without X-Envelope-From: a bounce"
    else:
        from_addresses = _addresses(values("From"))
        env_sender = from_addresses[0] if from_addresses else None
        sender_source = "From: header" if from_addresses else "none"

    if recipients:
        rcpts, rcpts_source = _unique([strip_angle(r) for r in recipients]), "--rcpt"
    elif pseudo_rcpts:
        rcpts, rcpts_source = tuple(pseudo_rcpts), "X-Envelope-To"
    else:
        rcpts = _unique(_addresses(values("To", "Cc")))
        rcpts_source = "To/Cc headers" if rcpts else "none"

    envelope = Envelope(sender=env_sender, recipients=rcpts, ip=ip or None,
                        helo=helo or None, user=user)
    return EnvelopeGuess(envelope, sender_source, rcpts_source)


def strip_exim_wrapper(message: bytes) -> bytes:
    """``message`` without a leading mbox ``From `` line and the ``X-Envelope-From``/``-To``
    lines directly after it (what :func:`as_exim_sends` adds), so wrapping is idempotent."""
    if not message.startswith(b"From "):
        return message
    start = message.find(b"\n") + 1
    if start == 0:
        return b""
    while True:
        end = message.find(b"\n", start)
        line = message[start:] if end < 0 else message[start:end + 1]
        if not line.lower().startswith(_PSEUDO_HEADERS):
            return message[start:]
        if end < 0:
            return b""
        start = end + 1


def as_exim_sends(message: bytes, envelope: Envelope) -> bytes:
    """The scan file Exim would send the shim for ``message`` with ``envelope``: From_ line,
    X-Envelope-From/To, LF line ends (:func:`~exim_policy.protocol.mbox.exim_mbox_wrap`).
    Exim's own added headers (Received:, and Message-ID:/Date: when missing) are not
    simulated."""
    sender = _address_text(envelope.sender) if envelope.sender is not None else None
    recipients = [_address_text(r) for r in envelope.recipients]
    return exim_mbox_wrap(strip_exim_wrapper(message), sender=sender, recipients=recipients)
