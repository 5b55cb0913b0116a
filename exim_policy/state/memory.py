"""The in-process account store: for tests and for trying the feature out (lost on restart,
not shared between processes). The plainest statement of the store's semantics."""
from __future__ import annotations

import bisect
import collections
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..config import AccountsConfig
from ..model import (AccountState, AccountStatus, Counts, Incident, MessageEvent, Transition,
                     TransitionKind)
from .base import (AUDIT_KEPT, EVIDENCE_KEPT, INCIDENTS_KEPT, AccountDetail, AccountSummary,
                   Applied, AuditEntry, allowed, audit_action, event_from_json, event_json,
                   evidence, incident_state, recipient_key, windows_of)

DAEMON = "exim-policy"


@dataclass
class _Account:
    status: AccountStatus = AccountStatus.OK
    incident: Incident | None = None
    since_hold: int = 0
    last_seen: float = 0.0
    #: (time, recipients) of counted messages, oldest first
    messages: list[tuple[float, int]] = field(default_factory=list)
    #: recipient -> the last time a counted message went to it
    recipients: dict[str, float] = field(default_factory=dict)
    spam: list[float] = field(default_factory=list)
    evidence: collections.deque = field(default_factory=lambda: collections.deque(
        maxlen=EVIDENCE_KEPT))
    incidents: collections.deque = field(default_factory=lambda: collections.deque(
        maxlen=INCIDENTS_KEPT))
    audit: collections.deque = field(default_factory=lambda: collections.deque(
        maxlen=AUDIT_KEPT))

    def clear_counters(self) -> None:
        self.messages.clear()
        self.recipients.clear()
        self.spam.clear()
        self.evidence.clear()


class MemoryStore:
    def __init__(self, config: AccountsConfig) -> None:
        self.config = config
        self._accounts: dict[str, _Account] = {}
        self._next_incident = 1

    async def state(self, account: str, recipients: Sequence[str], now: float) -> AccountState:
        found = self._accounts.get(account)
        if found is None:
            found = _Account()
        else:
            self._trim(found, now)
        return self._state(account, found, recipients, now)

    def _state(self, account: str, acct: _Account, recipients: Sequence[str],
               now: float) -> AccountState:
        wanted = {recipient_key(r) for r in recipients}
        times = [at for at, _ in acct.messages]
        windows = []
        for window in windows_of(self.config):
            start = now - window
            first = bisect.bisect_left(times, start)
            seen = {r for r, at in acct.recipients.items() if at >= start}
            windows.append(Counts(window, messages=len(times) - first,
                                  recipients=sum(n for _, n in acct.messages[first:]),
                                  unique_recipients=len(seen),
                                  fresh_recipients=len(wanted - seen)))
        spam_start = now - self.config.incident.window
        spam = len(acct.spam) - bisect.bisect_left(acct.spam, spam_start)
        return AccountState(account, acct.status, acct.incident, tuple(windows), spam,
                            acct.since_hold)

    def _trim(self, acct: _Account, now: float) -> None:
        start = now - self.config.retention
        del acct.messages[:bisect.bisect_left([at for at, _ in acct.messages], start)]
        del acct.spam[:bisect.bisect_left(acct.spam, start)]
        for rcpt in [r for r, at in acct.recipients.items() if at < start]:
            del acct.recipients[rcpt]

    async def record(self, account: str, event: MessageEvent | None,
                     transitions: Sequence[Transition], now: float) -> tuple[Applied, ...]:
        acct = self._accounts.setdefault(account, _Account())
        self._trim(acct, now)
        if event is not None:
            acct.last_seen = now
            if event.counted:
                acct.messages.append((now, len(event.recipients)))
                for rcpt in event.recipients:
                    acct.recipients[recipient_key(rcpt)] = now
            if event.spam:
                acct.spam.append(now)
                acct.evidence.append(event_from_json(event_json(event)))  # as stored
                if acct.status is AccountStatus.HELD:
                    acct.since_hold += 1
        applied = []
        for transition in transitions:
            if not allowed(transition, acct.status, acct.incident):
                continue
            incident = self._make(account, acct, transition, now)
            applied.append(Applied(transition, incident))
        return tuple(applied)

    def _make(self, account: str, acct: _Account, transition: Transition,
              now: float) -> Incident:
        """Carry out an allowed transition; returns the incident as it now stands."""
        state = self._state(account, acct, (), now)
        proof = evidence(account, transition, state, list(acct.evidence), self.config, now)
        old = acct.incident
        if transition.kind is TransitionKind.UNLOCKED:
            acct.status, acct.since_hold, acct.incident = AccountStatus.OK, 0, None
            acct.clear_counters()
            closed = old or Incident(0, account, now, "closed", transition.reason)
            incident = dataclasses.replace(closed, state="closed", closed=now, evidence=proof)
        elif transition.kind is TransitionKind.OPENED or old is None:
            if old is not None:  # a shadow-mode incident, superseded by an enforced one
                self._replace(acct, dataclasses.replace(old, state="closed", closed=now))
            incident = Incident(self._next_incident, account, now,
                                incident_state(transition.to), transition.reason,
                                shadow=transition.shadow, evidence=proof)
            self._next_incident += 1
            acct.status, acct.since_hold, acct.incident = transition.to, 0, incident
        else:
            incident = dataclasses.replace(old, state=incident_state(transition.to),
                                           evidence=proof)
            acct.status, acct.incident = transition.to, incident
        self._replace(acct, incident)
        acct.audit.append(AuditEntry(now, transition.who or DAEMON, audit_action(transition),
                                     transition.reason))
        return incident

    @staticmethod
    def _replace(acct: _Account, incident: Incident) -> None:
        """Store ``incident``, replacing the earlier version of the same id."""
        if incident.id == 0:  # an unlock with nothing open keeps no incident
            return
        for i, old in enumerate(acct.incidents):
            if old.id == incident.id:
                acct.incidents[i] = incident
                return
        acct.incidents.append(incident)

    async def reset(self, account: str, who: str, reason: str, now: float) -> bool:
        acct = self._accounts.get(account)
        if acct is None:
            return False
        acct.clear_counters()
        acct.audit.append(AuditEntry(now, who, "reset", reason))
        return True

    async def detail(self, account: str, now: float) -> AccountDetail | None:
        acct = self._accounts.get(account)
        if acct is None:
            return None
        self._trim(acct, now)
        return AccountDetail(self._state(account, acct, (), now), acct.last_seen,
                             tuple(reversed(acct.incidents)), tuple(reversed(acct.audit)),
                             tuple(reversed(acct.evidence)))

    async def accounts(self, now: float) -> list[AccountSummary]:
        summaries = []
        for account, acct in sorted(self._accounts.items()):
            self._trim(acct, now)
            state = self._state(account, acct, (), now)
            summaries.append(AccountSummary(
                account, acct.status, acct.last_seen,
                acct.incident.id if acct.incident else None,
                state.windows[0].messages if state.windows else len(acct.messages),
                state.spam_verdicts))
        return summaries

    async def prune(self, now: float) -> None:
        for account in list(self._accounts):
            acct = self._accounts[account]
            self._trim(acct, now)
            if acct.status is not AccountStatus.OK or acct.incident is not None \
                    or acct.messages or acct.spam or acct.recipients:
                continue
            # nothing counted any more: keep it only for its history, if it has one
            last = max([acct.last_seen] + [entry.at for entry in acct.audit])
            if not (acct.audit or acct.incidents) or last < now - self.config.history:
                del self._accounts[account]

    async def close(self) -> None:
        pass
