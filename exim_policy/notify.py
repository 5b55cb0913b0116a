"""Incident notices: a mail through an SMTP server and/or a JSON webhook, off the event loop.

:class:`Notifier` takes each transition the account store made (opened, locked, unlocked:
one notice each) and delivers it from a thread of its own, so a slow or dead mail server
never delays or changes a verdict. A failed delivery is logged and tried again, backing off
from :data:`FIRST_RETRY` to :data:`LAST_RETRY` seconds, up to ``notify.attempts`` times per
channel. Notices still waiting when the daemon stops get a last try of at most a few
seconds and are otherwise logged as lost.

The texts hold only safe one-line values: account ids and subjects are escaped by the
store (:func:`~exim_policy.protocol.text.printable`), and the mail is built with
:mod:`email`, which refuses a header with a line break.
"""
from __future__ import annotations

import email.message
import email.policy
import email.utils
import heapq
import itertools
import logging
import smtplib
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .config import NotifyConfig
from .state.base import Applied

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("exim_policy.notify")

FIRST_RETRY = 5.0
LAST_RETRY = 300.0

_WHAT = {
    "notify": "nothing is stopped (incident.on_open = notify): a human should look",
    "held": "the account is held: all its outbound mail is quarantined",
    "locked": "the account is locked: it is refused at MAIL (and AUTH) time, "
              "and what still reaches DATA is quarantined",
    "closed": "the incident is closed and the account's counters cleared: "
              "its mail flows again",
}


@dataclass(frozen=True)
class Notice:
    account: str
    incident: int
    transition: str
    state: str
    shadow: bool
    reason: str
    opened: float
    at: float
    evidence: dict = field(compare=False)
    who: str = ""

    @classmethod
    def of(cls, made: Applied) -> Notice:
        step, incident = made.transition, made.incident
        return cls(account=incident.account, incident=incident.id,
                   transition=step.kind.value, state=incident.state, shadow=step.shadow,
                   reason=step.reason, opened=incident.opened,
                   at=float(incident.evidence.get("at") or incident.opened),
                   evidence=incident.evidence, who=step.who)

    @property
    def headline(self) -> str:
        shadow = "(shadow mode) " if self.shadow else ""
        verb = "would be" if self.shadow else "is"
        state = {"notify": "to be checked", "closed": "released"}.get(self.state, self.state)
        return (f"{shadow}incident {self.incident} {self.transition}: account "
                f"{self.account} {verb} {state}")

    def as_json(self) -> dict:
        return {"event": "exim-policy.incident", "account": self.account,
                "incident": self.incident, "transition": self.transition,
                "state": self.state, "shadow": self.shadow, "reason": self.reason,
                "opened": self.opened, "at": self.at, "who": self.who,
                "evidence": self.evidence}

    def as_text(self) -> str:
        ev = self.evidence

        def when(t) -> str:
            return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else "-"

        counts = "; ".join(f"{w}: {c['messages']} messages, {c['recipients']} recipients, "
                           f"{c['unique_recipients']} unique"
                           for w, c in (ev.get("counts") or {}).items()) or "-"
        spam = ", ".join(f"{n} within {w}" for w, n in (ev.get("spam_verdicts") or {}).items())
        what = _WHAT.get(self.state, "")
        if self.shadow:
            what = "shadow mode: nothing was stopped; enforcing, " + what[0].lower() + what[1:]
        lines = [
            f"Account:      {self.account}",
            f"Transition:   {self.transition}" + (f" by {self.who}" if self.who else ""),
            f"State:        {self.state} - {what}",
            f"Incident:     {self.incident}, opened {when(self.opened)}",
            f"Reason:       {self.reason}",
            f"Counts:       {counts}",
            f"Spam:         {spam or '-'}; first {when(ev.get('first_spam'))}, "
            f"last {when(ev.get('last_spam'))}",
            f"Client IPs:   {', '.join(ev.get('client_ips') or []) or '-'}",
            f"Top symbols:  {', '.join(ev.get('top_symbols') or []) or '-'}",
            "Subjects:     " + ("\n              ".join(ev.get("subjects") or []) or "-"),
            f"Queue ids:    {', '.join(ev.get('queue_ids') or []) or '-'}",
            "",
            f"Details:      exim-policy accounts show {self.account}",
        ]
        if self.state != "closed":
            lines.append(f"To end it:    exim-policy accounts unlock {self.account} "
                         "--reason '...'")
        return "\n".join(lines) + "\n"


def build_mail(notice: Notice, config: NotifyConfig) -> email.message.EmailMessage:
    mail = email.message.EmailMessage(policy=email.policy.SMTP)
    mail["From"] = config.mail_from
    mail["To"] = ", ".join(config.mail_to)
    mail["Subject"] = f"[exim-policy] {notice.headline}"
    mail["Date"] = email.utils.formatdate(notice.at or None, usegmt=True)
    mail["Message-ID"] = email.utils.make_msgid("exim-policy",
                                                domain=config.mail_from.rpartition("@")[2])
    mail["X-Exim-Policy-Incident"] = str(notice.incident)
    mail["Auto-Submitted"] = "auto-generated"
    mail.set_content(notice.as_text())
    return mail


def send_mail(notice: Notice, config: NotifyConfig) -> None:
    host, _, port = config.smtp.rpartition(":")
    with smtplib.SMTP(host.strip("[]"), int(port), timeout=config.timeout,
                      local_hostname=socket.gethostname() or "localhost") as smtp:
        smtp.send_message(build_mail(notice, config), from_addr=config.mail_from,
                          to_addrs=list(config.mail_to))


def post_webhook(notice: Notice, config: NotifyConfig) -> None:
    import requests  # the [notify] extra; only a webhook needs it

    reply = requests.post(config.webhook_url, json=notice.as_json(), timeout=config.timeout,
                          headers={"User-Agent": "exim-policy"})
    reply.raise_for_status()


def channels(config: NotifyConfig) -> list[tuple[str, object]]:
    found: list[tuple[str, object]] = []
    if config.mail_to:
        found.append((f"mail to {', '.join(config.mail_to)} via {config.smtp}", send_mail))
    if config.webhook_url:
        found.append((f"webhook {config.webhook_url}", post_webhook))
    return found


def deliver_once(notice: Notice, config: NotifyConfig) -> list[str]:
    """Try every channel once, now (the CLI's notices); returns what failed, as text."""
    failed = []
    for name, deliver in channels(config):
        try:
            deliver(notice, config)  # type: ignore[operator]
        except Exception as exc:  # any failure of a channel is reported, none is fatal
            failed.append(f"{name}: {exc}")
    return failed


class Notifier:
    """The daemon's notices: ``send()`` queues, a worker thread delivers and retries."""

    #: counts deliveries by channel and result (None: metrics off); set by
    #: Metrics.instrument. Called from the worker thread: its counters are thread-safe
    metrics: Metrics | None = None

    def __init__(self, config: NotifyConfig) -> None:
        self.config = config
        self._channels = channels(config)
        self._heap: list[tuple[float, int, Notice, int, int]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.sent = 0
        self.failed = 0

    def __call__(self, made: Applied) -> None:
        self.send(Notice.of(made))

    def send(self, notice: Notice) -> None:
        if not self._channels:
            return
        with self._wake:
            for index in range(len(self._channels)):
                heapq.heappush(self._heap, (time.monotonic(), next(self._order), notice,
                                            index, 1))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="exim-policy-notify",
                                                daemon=True)
                self._thread.start()
            self._wake.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Give queued notices a last try within ``timeout`` seconds, then stop."""
        with self._wake:
            self._stopping = True
            self._heap = [(0.0, order, n, i, a) for _, order, n, i, a in self._heap]
            heapq.heapify(self._heap)
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._wake:
            for _, _, notice, index, _ in self._heap:
                log.error("notice lost at shutdown: %s (%s)", notice.headline,
                          self._channels[index][0])
            self._heap.clear()

    def _work(self) -> None:
        while True:
            with self._wake:
                while True:
                    if not self._heap:
                        if self._stopping:
                            return
                        self._wake.wait()
                        continue
                    due = self._heap[0][0]
                    if due <= time.monotonic():
                        _, _, notice, index, attempt = heapq.heappop(self._heap)
                        break
                    if self._stopping:
                        return
                    self._wake.wait(due - time.monotonic())
            self._attempt(notice, index, attempt)

    def _attempt(self, notice: Notice, index: int, attempt: int) -> None:
        name, deliver = self._channels[index]
        try:
            deliver(notice, self.config)  # type: ignore[operator]
        except Exception as exc:  # every channel failure is logged and retried
            self._retry(notice, index, attempt, name, exc)
            return
        self.sent += 1
        self._count(name, "sent")
        log.info("notice sent: %s (%s)", notice.headline, name)

    def _retry(self, notice: Notice, index: int, attempt: int, name: str,
               exc: Exception) -> None:
        if attempt >= self.config.attempts or self._stopping:
            self.failed += 1
            self._count(name, "failed")
            log.error("notice not delivered after %d attempt(s): %s (%s): %s", attempt,
                      notice.headline, name, exc)
            return
        delay = min(FIRST_RETRY * 3 ** (attempt - 1), LAST_RETRY)
        self._count(name, "retried")
        log.warning("notice delivery failed, retrying in %gs: %s (%s): %s", delay,
                    notice.headline, name, exc)
        with self._wake:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._order), notice,
                                        index, attempt + 1))
            self._wake.notify()

    def _count(self, name: str, result: str) -> None:
        if self.metrics is not None:
            # the channel's kind is the first word of its name ("mail to ...", "webhook ...")
            self.metrics.notification(name.split(None, 1)[0], result)
