"""SMTP client helpers for the lab, and where a message ended up.

Used by the end-to-end tests and the demo: one SMTP transaction with any MTA of the lab
(Exim, Haraka, Postfix) as an :class:`Outcome` (a 4xx/5xx reply is an outcome, never an
exception), and the copies of a message (by Message-ID) in a Maildir of the lab's Exim or
in the SMTP sink. Every call has a deadline; the waits raise ``TimeoutError``.
"""
from __future__ import annotations

import contextlib
import email.message
import re
import smtplib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from .addresses import INBOUND_SENDER

if TYPE_CHECKING:  # pragma: no cover
    from .exim import EximLab
    from .sink import SinkMessage, SmtpSink

#: the client's EHLO name
CLIENT_HELO = "client.test"

T = TypeVar("T")


@dataclass(frozen=True)
class Outcome:
    """What the SMTP client saw at the end of DATA (or earlier, if a command failed)."""

    code: int
    text: str
    #: Exim's message id from "250 OK id=...", None if not accepted
    queue_id: str | None
    #: the command that got this reply: "data", "mail", "rcpt ADDRESS" or "auth"
    stage: str = "data"

    @property
    def accepted(self) -> bool:
        return self.code == 250 and self.stage == "data"

    def __str__(self) -> str:
        return f"{self.code} {self.text} ({self.stage})"


def one_line(raw: bytes | str) -> str:
    """An SMTP reply's text on one line: Exim splits long ACL messages over several lines,
    each continuation with the enhanced status code again; that repetition is dropped."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return " ".join(re.sub(r"\n(?:\d{3}[ -])?(?:\d\.\d{1,3}\.\d{1,3} )?", " ", text).split())


@contextlib.contextmanager
def session(host: str, port: int, *, helo: str = CLIENT_HELO,
            timeout: float = 60.0) -> Iterator[smtplib.SMTP]:
    """A connected client after EHLO; QUIT on the way out. ``host`` is also the client's
    source address (loopback)."""
    with smtplib.SMTP(host, port, local_hostname=helo, timeout=timeout) as smtp:
        smtp.ehlo(helo)
        yield smtp


def data(smtp: smtplib.SMTP, message: bytes) -> Outcome:
    """DATA on an open transaction; never raises for a 4xx/5xx reply."""
    try:
        code, text = smtp.data(message)
    except smtplib.SMTPDataError as exc:
        code, text = exc.smtp_code, exc.smtp_error
    reply = one_line(text)
    found = re.search(r"\bid=(\S+)", reply)
    return Outcome(code, reply, found.group(1) if found and code == 250 else None)


def transaction(host: str, port: int, message: bytes, rcpts: Iterable[str], *,
                sender: str = INBOUND_SENDER, auth: tuple[str, str] | None = None,
                helo: str = CLIENT_HELO, timeout: float = 60.0) -> Outcome:
    """One SMTP transaction with any MTA of the lab; never raises for a 4xx/5xx reply, a
    refused AUTH included. ``auth``: (user, password) for AUTH (offered on loopback)."""
    with session(host, port, helo=helo, timeout=timeout) as smtp:
        if auth is not None:
            try:
                smtp.login(*auth)
            except smtplib.SMTPAuthenticationError as exc:
                return Outcome(exc.smtp_code, one_line(exc.smtp_error), None, "auth")
        code, text = smtp.mail(sender)
        if code != 250:
            return Outcome(code, one_line(text), None, "mail")
        for rcpt in rcpts:
            code, text = smtp.rcpt(rcpt)
            if code not in (250, 251):
                return Outcome(code, one_line(text), None, f"rcpt {rcpt}")
        return data(smtp, message)


def send(exim: EximLab, message: bytes, rcpts: Iterable[str], *,
         sender: str = INBOUND_SENDER, auth: tuple[str, str] | None = None,
         host: str = "127.0.0.1", timeout: float = 60.0) -> Outcome:
    """One SMTP transaction through the lab's Exim; never raises for a 4xx/5xx reply.

    ``host`` is also the client's source address (loopback): "::1" makes the client a
    different host from Exim's point of view than "127.0.0.1".
    """
    return transaction(host, exim.port, message, rcpts, sender=sender, auth=auth,
                       timeout=timeout)


# ------------------------------------------------------------ where it ended up --
def by_message_id(messages: Iterable[email.message.EmailMessage], message_id: str
                  ) -> list[email.message.EmailMessage]:
    """The messages whose Message-ID header is ``<message_id>``."""
    return [m for m in messages if (m.get("Message-ID") or "").strip("<> ") == message_id]


def in_mailbox(exim: EximLab, user: str, message_id: str) -> list[email.message.EmailMessage]:
    """The copies of ``message_id`` in ``user``'s Maildir."""
    return by_message_id(exim.maildir_messages(user), message_id)


def in_sink(sink: SmtpSink, message_id: str) -> list[SinkMessage]:
    """Sink messages carrying ``message_id``."""
    needle = f"<{message_id}>".encode()
    return [m for m in sink.messages if needle in m.data]


def wait_mailbox(exim: EximLab, user: str, message_id: str, timeout: float = 15.0
                 ) -> email.message.EmailMessage:
    """Wait for the message with ``message_id`` to be delivered to ``user``'s Maildir."""
    return _first(lambda: in_mailbox(exim, user, message_id), timeout,
                  lambda: f"message {message_id} not in mailbox {user} after {timeout}s\n"
                          f"{exim.log_tail()}")


def wait_sink(sink: SmtpSink, message_id: str, timeout: float = 15.0) -> SinkMessage:
    """Wait for the message with ``message_id`` to reach the SMTP sink."""
    return _first(lambda: in_sink(sink, message_id), timeout,
                  lambda: f"message {message_id} not in the SMTP sink after {timeout}s")


def _first(find: Callable[[], list[T]], timeout: float, missing: Callable[[], str]) -> T:
    """The first of what ``find`` returns once it returns something; ``TimeoutError`` with
    ``missing()`` when ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        found = find()
        if found:
            return found[0]
        if time.monotonic() >= deadline:
            raise TimeoutError(missing())
        time.sleep(0.05)
