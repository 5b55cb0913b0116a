"""``quarantine import``: messages the redirect recipe delivered into a mailbox, into the
store, each with the envelope it had before it was quarantined.

The recipe (``EXIM_POLICY_QUARANTINE_HOSTS`` empty) sends every held message to one
address; the DATA ACL kept the recipients in ``X-Exim-Policy-Recipients`` and the local
delivery added ``Return-path:`` (the sender). Accepted shapes:

- an mbox file (Exim's ``appendfile``: each message after a ``From SENDER DATE`` line; a
  ``From`` line counts as a separator only at the start of the file or after an empty
  line, which is how Exim writes them: it ends each message with one);
- a Maildir (its ``new/`` and ``cur/``), or one Maildir message file.

A message without ``X-Exim-Policy-Recipients``, or with no sender (neither
``Return-path:`` nor a ``From`` separator), is refused and left where it is: the store
keeps only what it can release to the right people. Body lines Exim escaped to
``>From`` stay escaped (mboxo cannot tell them from lines that had the ``>``).
Importing the same messages twice adds nothing (they are found by their content).
"""
from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

from ..config import Config
from ..protocol.text import strip_angle
from .evidence import from_fields, recipients_of
from .headers import HeaderSplitter, decoded, first, unfold
from .store import NewMessage, QuarantineStore

#: header fields the local delivery added; a release must not carry them
_DELIVERY_FIELDS = (b"return-path", b"envelope-to", b"delivery-date")
_FROM_LINE = re.compile(rb"^From (\S+)")


@dataclass(frozen=True)
class Imported:
    where: str
    #: the entry id (new or, when ``duplicate``, the one that held it already)
    entry_id: str = ""
    duplicate: bool = False
    refused: str = ""


def import_path(store: QuarantineStore, path: str, config: Config) -> list[Imported]:
    results = []
    for where, sep_sender, raw in _messages(Path(path)):
        results.append(_import_one(store, where, sep_sender, raw, config))
    return results


def _messages(path: Path) -> Iterator[tuple[str, str | None, bytes]]:
    if path.is_dir():
        if not (path / "new").is_dir() and not (path / "cur").is_dir():
            raise FileNotFoundError(f"{path}: a directory but not a Maildir (no new/, cur/)")
        for sub in ("new", "cur"):
            folder = path / sub
            if folder.is_dir():
                for item in sorted(folder.iterdir()):
                    if item.is_file() and not item.name.startswith("."):
                        yield str(item), None, item.read_bytes()
        return
    with open(path, "rb") as fh:
        start = fh.read(5)
    if start != b"From ":
        yield str(path), None, path.read_bytes()
        return
    yield from _mbox(path)


def _mbox(path: Path) -> Iterator[tuple[str, str | None, bytes]]:
    """One message at a time (a mailbox may be larger than memory; a message is not)."""
    current: list[bytes] = []
    sender: str | None = None
    number = 0
    previous_blank = True
    with open(path, "rb") as fh:
        for line in fh:
            match = _FROM_LINE.match(line) if previous_blank else None
            if match:
                if number:
                    yield f"{path} message {number}", sender, _without_suffix(current)
                number += 1
                sender = match[1].decode("utf-8", "replace")
                current = []
            else:
                current.append(line)
            previous_blank = line in (b"\n", b"\r\n")
    if number:
        yield f"{path} message {number}", sender, _without_suffix(current)


def _without_suffix(lines: list[bytes]) -> bytes:
    """Exim's mbox delivery ends each message with an empty line of its own."""
    if lines and lines[-1] in (b"\n", b"\r\n"):
        lines = lines[:-1]
    return b"".join(lines)


def _import_one(store: QuarantineStore, where: str, sep_sender: str | None, raw: bytes,
                config: Config) -> Imported:
    crlf = re.sub(rb"\r?\n", b"\r\n", raw)
    splitter = HeaderSplitter()
    body = splitter.feed(crlf) + splitter.close()
    fields = splitter.fields
    recipients = recipients_of(fields)
    if not recipients:
        return Imported(where, refused="no X-Exim-Policy-Recipients header: not a message "
                                       "exim-policy quarantined (left as it is)")
    return_path = first(fields, "Return-path")
    if return_path is not None:
        sender = strip_angle(unfold(return_path))
    elif sep_sender is not None:
        sender = "" if sep_sender in ("<>", "MAILER-DAEMON") else sep_sender
    else:
        return Imported(where, refused="no Return-path: header and no mbox From line: the "
                                       "sender is unknown (left as it is)")
    stored = _without_delivery_fields(body)
    sha256 = hashlib.sha256(stored).hexdigest()
    known = store.find(sha256)
    if known is not None:
        return Imported(where, known, duplicate=True)
    tmp_path, fh = store.temp_file()
    with fh:
        fh.write(stored)
    message = NewMessage(
        sender=sender, recipients=tuple(dict.fromkeys(recipients)),
        evidence=from_fields(fields, sender, config), size=len(stored), sha256=sha256,
        subject=decoded(first(fields, "Subject") or b""),
        from_header=decoded(first(fields, "From") or b""),
        message_id=decoded(first(fields, "Message-ID") or b""),
        source=f"import of {where}", received=_received(fields))
    entry_id, merged = store.commit(tmp_path, message)
    return Imported(where, entry_id, duplicate=merged)


def _without_delivery_fields(message: bytes) -> bytes:
    """Drop Return-path, Envelope-to and Delivery-date (the splitter dropped ours)."""
    end = message.find(b"\r\n\r\n")
    head, body = (message, b"") if end < 0 else (message[:end + 2], message[end + 2:])
    kept, skipping = [], False
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                kept.append(line)
            continue
        skipping = line.split(b":", 1)[0].strip().lower() in _DELIVERY_FIELDS
        if not skipping:
            kept.append(line)
    return b"".join(kept) + body


def _received(fields: list[tuple[str, bytes]]) -> float:
    """When it was quarantined: the local delivery's Delivery-date, else now."""
    raw = first(fields, "Delivery-date")
    if raw is not None:
        try:
            return parsedate_to_datetime(unfold(raw)).timestamp()
        except (TypeError, ValueError):
            pass
    return time.time()

