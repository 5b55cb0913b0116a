"""Sending a held message to its original recipients, through a path that is not scanned.

- ``release_via = "exim"``: ``EXIM -odi -oi -f SENDER -- RCPT...`` with the message on
  standard input (LF lines, Exim's local format). A local submission runs no SMTP ACL,
  so it is not scanned and quarantined again; ``-oi`` keeps a line holding only a dot
  from ending the message early; ``-f`` needs a trusted caller (root or Exim's user).
- ``release_via = "smtp:HOST:PORT"``: an SMTP transaction with the original envelope to
  an Exim port the bundled ACLs do not scan (``EXIM_POLICY_RELEASE_PORT``); each
  recipient gets its own RCPT answer, a refused one stays held.

Either way the file streams in chunks (constant memory), and one message is one
transaction: each recipient gets one copy and sees only the message's own headers.
"""
from __future__ import annotations

import smtplib
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, parse_listen
from ..protocol.smtp_data import DataEncoder
from .store import R_RELEASED, Entry, QuarantineError, QuarantineStore

CHUNK = 256 * 1024
#: how much of Exim's own error output a failed release keeps
STDERR_KEPT = 2000


class ReleaseFailed(QuarantineError):
    """The release path did not take the message (it stays held)."""


@dataclass(frozen=True)
class Released:
    entry: Entry
    #: the recipients this release sent to
    sent_to: tuple[str, ...]
    refused: tuple[tuple[str, str], ...] = ()


def release(store: QuarantineStore, entry_id: str, config: Config, *, who: str, reason: str,
            force: bool = False) -> Released:
    """Release one message (exactly once; see :meth:`QuarantineStore.claim`)."""
    entry = store.claim(entry_id, who, reason, force=force)
    recipients = tuple(r.address for r in entry.recipients
                       if force or r.state != R_RELEASED)
    via = config.quarantine.release_via
    path = store.path_of(entry.id)
    try:
        if via == "exim":
            results = _via_exim(path, entry.sender, recipients,
                                config.quarantine.exim_command)
        else:
            results = _via_smtp(path, entry.sender, recipients, via[len("smtp:"):])
    except (OSError, smtplib.SMTPException, QuarantineError) as exc:
        store.abandon(entry.id, who, f"release via {via} failed: {exc}")
        raise ReleaseFailed(f"{entry.id}: release via {via} failed: {exc}; still held") \
            from None
    done = store.finish(entry.id, who, reason, via, results)
    return Released(done, tuple(a for a, (ok, _) in results.items() if ok),
                    tuple((a, d) for a, (ok, d) in results.items() if not ok))


def _via_exim(path: Path, sender: str, recipients: tuple[str, ...],
              command: tuple[str, ...]) -> dict[str, tuple[bool, str]]:
    _check_addresses(sender, recipients)
    argv = [*command, "-odi", "-oi", "-f", sender or "<>", "--", *recipients]
    with open(path, "rb") as message, subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE) as exim:
        assert exim.stdin is not None and exim.stderr is not None
        try:
            carry = b""
            while chunk := message.read(CHUNK):
                # a CR that may pair with the next chunk's LF waits for it
                chunk, carry = carry + chunk, b""
                if chunk.endswith(b"\r"):
                    chunk, carry = chunk[:-1], b"\r"
                exim.stdin.write(chunk.replace(b"\r\n", b"\n"))
            exim.stdin.write(carry)
            exim.stdin.close()
        except BrokenPipeError:
            pass  # Exim stopped reading: its status and message say why
        errors = exim.stderr.read(STDERR_KEPT).decode("utf-8", "replace").strip()
        status = exim.wait()
    if status != 0:
        raise QuarantineError(f"{argv[0]} exited with status {status}"
                              + (f": {errors}" if errors else ""))
    return {rcpt: (True, "accepted by local submission") for rcpt in recipients}


def _via_smtp(path: Path, sender: str, recipients: tuple[str, ...],
              where: str) -> dict[str, tuple[bool, str]]:
    _check_addresses(sender, recipients)
    address = parse_listen(where)
    utf8 = not all(a.isascii() for a in (sender, *recipients))
    with smtplib.SMTP(address.host, address.port, timeout=120) as smtp:
        smtp.ehlo("exim-policy-release")
        if utf8:
            if not smtp.has_extn("smtputf8"):
                raise QuarantineError(f"{where} does not offer SMTPUTF8, which the "
                                      "addresses need")
            smtp.command_encoding = "utf-8"
        code, text = smtp.docmd(f"MAIL FROM:<{sender}>" + (" SMTPUTF8" if utf8 else ""))
        if code != 250:
            raise QuarantineError(f"MAIL FROM refused: {code} {_text(text)}")
        results: dict[str, tuple[bool, str]] = {}
        for rcpt in recipients:
            code, text = smtp.docmd(f"RCPT TO:<{rcpt}>")
            results[rcpt] = (code in (250, 251), f"{code} {_text(text)}")
        accepted = [rcpt for rcpt, (ok, _) in results.items() if ok]
        if not accepted:
            smtp.docmd("RSET")
            return results
        code, text = smtp.docmd("DATA")
        if code != 354:
            raise QuarantineError(f"DATA refused: {code} {_text(text)}")
        encoder = DataEncoder()
        with open(path, "rb") as message:
            while chunk := message.read(CHUNK):
                smtp.send(encoder.feed(chunk))
        smtp.send(encoder.end())
        code, text = smtp.getreply()
        if code != 250:
            raise QuarantineError(f"message refused after DATA: {code} {_text(text)}")
        for rcpt in accepted:
            results[rcpt] = (True, f"{code} {_text(text)}")
        return results


def _check_addresses(sender: str, recipients: tuple[str, ...]) -> None:
    if not recipients:
        raise QuarantineError("no recipient left to release to")
    for address in (sender, *recipients):
        if any(c in address for c in "\r\n\0<>"):
            raise QuarantineError(f"{address!r} cannot be used as an envelope address")


def _text(text: bytes) -> str:
    return text.decode("utf-8", "replace").replace("\n", " ")


def learn_ham(store: QuarantineStore, entry: Entry, config: Config) -> str:
    """Post the message to Rspamd's controller ``/learnham``; Rspamd's answer, as text."""
    import requests

    url = config.rspamd.controller_url + "/learnham"
    headers = {"Password": config.rspamd.controller_password} \
        if config.rspamd.controller_password else {}
    try:
        with open(store.path_of(entry.id), "rb") as message:
            reply = requests.post(url, data=message, headers=headers, timeout=60)
    except (OSError, requests.RequestException) as exc:
        raise QuarantineError(f"learn-ham: {url}: {exc}") from None
    try:
        body = reply.json()
    except ValueError:
        body = {}
    if reply.status_code == 200 and body.get("success"):
        return "learned as ham"
    error = body.get("error") or reply.text[:200] or reply.reason
    if reply.status_code == 208:  # Rspamd: this message was learned before
        return f"not learned again: {error}"
    raise QuarantineError(f"learn-ham: {url}: HTTP {reply.status_code}: {error}")
