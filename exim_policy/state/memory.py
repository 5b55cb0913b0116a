"""The in-process account store: the daemon's cache in front of SQLite (state/cached.py),
and a store of its own for tests (lost on restart, not shared between processes).

Counting is incremental, so that reading an account costs the same whatever it sent: each
configured window keeps its counted messages and its recipient deliveries in time order,
with running totals; what falls out of the window is taken off as time moves on
(``_Window.expire``). Reading or recording a message is O(its recipients) plus what
expired since the last call.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
from collections.abc import Sequence

from ..config import AccountsConfig
from ..model import (AccountState, AccountStatus, Counts, Incident, MessageEvent, Transition,
                     TransitionKind)
from .base import (AUDIT_KEPT, EVIDENCE_KEPT, INCIDENTS_KEPT, AccountDetail, AccountImage,
                   AccountSummary, Applied, AuditEntry, allowed, audit_action,
                   event_from_json, event_json, evidence, incident_state, recipient_key,
                   windows_of)

DAEMON = "exim-policy"


class _Window:
    """One sliding window's counts: messages, recipients, unique recipients."""

    __slots__ = ("span", "messages", "total", "deliveries", "last")

    def __init__(self, span: float) -> None:
        self.span = span
        # lists, not deques: an empty deque costs ~600 bytes, and 100,000 accounts hold
        # three each; the few entries that expire at a time are cut off the front at once
        self.messages: list[tuple[float, int]] = []
        self.total = 0  # recipients of the messages in the window
        #: (time, recipient) of every counted delivery, oldest first
        self.deliveries: list[tuple[float, str]] = []
        #: recipient -> its latest delivery in the window
        self.last: dict[str, float] = {}

    def expire(self, now: float) -> None:
        start = now - self.span
        messages = self.messages
        gone = 0
        while gone < len(messages) and messages[gone][0] < start:
            self.total -= messages[gone][1]
            gone += 1
        if gone:
            del messages[:gone]
        deliveries, last = self.deliveries, self.last
        gone = 0
        while gone < len(deliveries) and deliveries[gone][0] < start:
            at, rcpt = deliveries[gone]
            if last.get(rcpt) == at:  # its latest delivery left: so does the recipient
                del last[rcpt]
            gone += 1
        if gone:
            del deliveries[:gone]

    def add(self, at: float, count: int, recipients: Sequence[str]) -> None:
        self.messages.append((at, count))
        self.total += count
        for rcpt in recipients:
            self.deliveries.append((at, rcpt))
            self.last[rcpt] = at

    def counts(self, wanted: set[str]) -> Counts:
        last = self.last
        return Counts(self.span, len(self.messages), self.total, len(last),
                      sum(1 for rcpt in wanted if rcpt not in last))

    def empty(self) -> bool:
        return not self.messages and not self.deliveries


class _Account:
    __slots__ = ("status", "incident", "since_hold", "last_seen", "windows", "spam",
                 "evidence", "incidents", "audit")

    def __init__(self, config: AccountsConfig) -> None:
        self.status = AccountStatus.OK
        self.incident: Incident | None = None
        self.since_hold = 0
        self.last_seen = 0.0
        self.windows = [_Window(span) for span in windows_of(config)]
        self.spam: list[float] = []  # times of spam verdicts in the incident window
        # made when first needed: most accounts never have any
        self.evidence: collections.deque[MessageEvent] | None = None
        self.incidents: collections.deque[Incident] | None = None
        self.audit: collections.deque[AuditEntry] | None = None

    def clear_counters(self, config: AccountsConfig) -> None:
        self.windows = [_Window(span) for span in windows_of(config)]
        self.spam.clear()
        self.evidence = None

    def idle(self) -> bool:
        return not self.spam and all(w.empty() for w in self.windows)

    def note(self, entry: AuditEntry) -> None:
        if self.audit is None:
            self.audit = collections.deque(maxlen=AUDIT_KEPT)
        self.audit.append(entry)


class MemoryStore:
    def __init__(self, config: AccountsConfig) -> None:
        self.config = config
        self._accounts: dict[str, _Account] = {}
        self._next_incident = 1

    def _expired(self, acct: _Account, now: float) -> _Account:
        for window in acct.windows:
            window.expire(now)
        spam, start = acct.spam, now - self.config.incident.window
        if spam and spam[0] < start:
            del spam[:bisect.bisect_left(spam, start)]
        return acct

    def _state(self, account: str, acct: _Account, recipients: Sequence[str]) -> AccountState:
        wanted = {recipient_key(r) for r in recipients}
        return AccountState(account, acct.status, acct.incident,
                            tuple(w.counts(wanted) for w in acct.windows), len(acct.spam),
                            acct.since_hold)

    async def state(self, account: str, recipients: Sequence[str], now: float) -> AccountState:
        found = self._accounts.get(account)
        acct = self._expired(found, now) if found is not None else _Account(self.config)
        return self._state(account, acct, recipients)

    async def record(self, account: str, event: MessageEvent | None,
                     transitions: Sequence[Transition], now: float) -> tuple[Applied, ...]:
        acct = self._accounts.get(account)
        if acct is None:
            acct = self._accounts[account] = _Account(self.config)
        self._expired(acct, now)
        if event is not None:
            acct.last_seen = now
            if event.counted:
                keys = list({recipient_key(r) for r in event.recipients})
                for window in acct.windows:
                    window.add(now, len(event.recipients), keys)
            if event.spam:
                acct.spam.append(now)
                if acct.evidence is None:
                    acct.evidence = collections.deque(maxlen=EVIDENCE_KEPT)
                acct.evidence.append(event_from_json(event_json(event)))  # as stored
                if acct.status is AccountStatus.HELD:
                    acct.since_hold += 1
        applied = []
        for transition in transitions:
            if allowed(transition, acct.status, acct.incident):
                applied.append(Applied(transition, self._make(account, acct, transition, now)))
        return tuple(applied)

    def _make(self, account: str, acct: _Account, transition: Transition,
              now: float) -> Incident:
        """Carry out an allowed transition; returns the incident as it now stands."""
        proof = evidence(account, transition, self._state(account, acct, ()),
                         list(acct.evidence or ()), self.config, now)
        old = acct.incident
        if transition.kind is TransitionKind.UNLOCKED:
            acct.status, acct.since_hold, acct.incident = AccountStatus.OK, 0, None
            acct.clear_counters(self.config)
            closed = old or Incident(0, account, now, "closed", transition.reason)
            incident = dataclasses.replace(closed, state="closed", closed=now, evidence=proof)
        elif transition.kind is TransitionKind.OPENED or old is None:
            if old is not None:  # a shadow-mode incident, superseded by an enforced one
                self._keep(acct, dataclasses.replace(old, state="closed", closed=now))
            incident = Incident(self._next_incident, account, now,
                                incident_state(transition.to), transition.reason,
                                shadow=transition.shadow, evidence=proof)
            self._next_incident += 1
            acct.status, acct.since_hold, acct.incident = transition.to, 0, incident
        else:
            incident = dataclasses.replace(old, state=incident_state(transition.to),
                                           evidence=proof)
            acct.status, acct.incident = transition.to, incident
        self._keep(acct, incident)
        acct.note(AuditEntry(now, transition.who or DAEMON, audit_action(transition),
                             transition.reason))
        return incident

    @staticmethod
    def _keep(acct: _Account, incident: Incident) -> None:
        """Store ``incident``, replacing the earlier version of the same id."""
        if incident.id == 0:  # an unlock with nothing open keeps no incident
            return
        if acct.incidents is None:
            acct.incidents = collections.deque(maxlen=INCIDENTS_KEPT)
        for i, old in enumerate(acct.incidents):
            if old.id == incident.id:
                acct.incidents[i] = incident
                return
        acct.incidents.append(incident)

    async def reset(self, account: str, who: str, reason: str, now: float) -> bool:
        acct = self._accounts.get(account)
        if acct is None:
            return False
        acct.clear_counters(self.config)
        acct.note(AuditEntry(now, who, "reset", reason))
        return True

    async def detail(self, account: str, now: float) -> AccountDetail | None:
        acct = self._accounts.get(account)
        if acct is None:
            return None
        self._expired(acct, now)
        return AccountDetail(self._state(account, acct, ()), acct.last_seen,
                             tuple(reversed(acct.incidents or ())),
                             tuple(reversed(acct.audit or ())),
                             tuple(reversed(acct.evidence or ())))

    async def accounts(self, now: float) -> list[AccountSummary]:
        summaries = []
        for account, acct in sorted(self._accounts.items()):
            state = self._state(account, self._expired(acct, now), ())
            summaries.append(AccountSummary(
                account, acct.status, acct.last_seen,
                acct.incident.id if acct.incident else None,
                state.windows[0].messages if state.windows else 0, state.spam_verdicts))
        return summaries

    async def prune(self, now: float) -> None:
        for account in list(self._accounts):
            acct = self._expired(self._accounts[account], now)
            if acct.status is not AccountStatus.OK or acct.incident is not None \
                    or not acct.idle():
                continue
            # nothing counted any more: keep it only for its history, if it has one
            last = max([acct.last_seen] + [entry.at for entry in acct.audit or ()])
            if not (acct.audit or acct.incidents) or last < now - self.config.history:
                del self._accounts[account]

    async def refresh(self, now: float) -> None:
        pass

    async def close(self) -> None:
        pass

    # ------------------------------------------------------------ as a cache --
    def install(self, image: AccountImage) -> None:
        """Replace what is held of ``image.account`` by ``image`` (its history stays where
        the image came from)."""
        acct = _Account(self.config)
        acct.status, acct.incident = image.status, image.incident
        acct.since_hold, acct.last_seen = image.since_hold, image.last_seen
        deliveries = sorted((at, rcpt) for rcpt, at in image.recipients.items())
        for window in acct.windows:
            for at, count in image.messages:
                window.messages.append((at, count))
                window.total += count
            for at, rcpt in deliveries:
                window.deliveries.append((at, rcpt))
                window.last[rcpt] = at
        acct.spam.extend(image.spam)
        if image.evidence:
            acct.evidence = collections.deque(image.evidence, maxlen=EVIDENCE_KEPT)
        self._accounts[image.account] = acct

    def forget(self, account: str) -> None:
        self._accounts.pop(account, None)
