"""The account store's interface, and what every backend shares.

A store keeps, per account: the status (``ok``, ``held``, ``locked``) and the open
incident; the counted messages of the last ``accounts.retention`` seconds (time,
recipient count), each recipient's last counted time, the spam verdicts' times, the last
:data:`EVIDENCE_KEPT` spam messages' evidence; its incidents and audit trail (a bounded
number, kept ``accounts.history`` after the account's last activity unless it is held or
locked). Nothing grows without bound: every list is cut at a fixed length and every time
series at the longest window.

Backends (memory, sqlite, redis) implement :class:`AccountStore`; one contract test
(tests/test_state_contract.py) runs over all of them.
"""
from __future__ import annotations

import collections
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..config import AccountsConfig, format_duration
from ..model import (AccountState, AccountStatus, Counts, Incident, MessageEvent, Transition,
                     TransitionKind)

#: spam messages whose evidence is kept per account (the notice shows the newest)
EVIDENCE_KEPT = 50
#: incidents and audit entries kept per account
INCIDENTS_KEPT = 20
AUDIT_KEPT = 100
#: in a notice: at most this many subjects, IPs, queue ids, symbols
SUBJECTS_SHOWN = 3
LIST_SHOWN = 10


class StoreError(Exception):
    """The store cannot be reached or failed; the message says why, for the log."""


@dataclass(frozen=True)
class AuditEntry:
    at: float
    who: str
    action: str
    reason: str


@dataclass(frozen=True)
class Applied:
    """A transition the store made (it was allowed from the stored state)."""

    transition: Transition
    incident: Incident


@dataclass(frozen=True)
class AccountSummary:
    account: str
    status: AccountStatus
    last_seen: float
    incident: int | None
    #: counted messages in the first configured window (or the incident window)
    messages: int
    spam_verdicts: int


@dataclass(frozen=True)
class AccountDetail:
    state: AccountState
    last_seen: float | None
    incidents: tuple[Incident, ...] = ()
    audit: tuple[AuditEntry, ...] = ()
    #: the newest spam messages' evidence, newest first
    evidence: tuple[MessageEvent, ...] = ()


@dataclass
class AccountImage:
    """An account's working state as a store holds it (for a cache in front of a store)."""

    account: str
    status: AccountStatus
    incident: Incident | None
    since_hold: int
    last_seen: float
    #: (time, recipients) of counted messages, oldest first
    messages: list[tuple[float, int]]
    #: recipient -> the last time a counted message went to it
    recipients: dict[str, float]
    #: times of spam verdicts, oldest first
    spam: list[float]
    #: the newest spam messages' evidence, oldest first
    evidence: list[MessageEvent]


class AccountStore(Protocol):
    async def state(self, account: str, recipients: Sequence[str], now: float) -> AccountState:
        """The account at ``now``, with ``recipients`` (of the message being decided) counted
        as fresh where a window has not seen them."""
        ...

    async def record(self, account: str, event: MessageEvent | None,
                     transitions: Sequence[Transition], now: float) -> tuple[Applied, ...]:
        """Add the event and make each transition the stored state allows, in one atomic
        step; returns the transitions made (only those are notified)."""
        ...

    async def reset(self, account: str, who: str, reason: str, now: float) -> bool:
        """Forget the account's counters (not its status or incidents); audited."""
        ...

    async def detail(self, account: str, now: float) -> AccountDetail | None:
        """Everything known of one account (None: never seen)."""
        ...

    async def accounts(self, now: float) -> list[AccountSummary]:
        """Every account seen within the retention, or held, or locked."""
        ...

    async def prune(self, now: float) -> None:
        """Drop what is older than the retention and the history (called now and then)."""
        ...

    async def refresh(self, now: float) -> None:
        """Take in what other processes changed (called at start and a few times a
        second; a store that reads through to its backend has nothing to do)."""
        ...

    async def close(self) -> None:
        ...


# -------------------------------------------------------------- shared semantics --
def allowed(transition: Transition, status: AccountStatus, incident: Incident | None) -> bool:
    """May ``transition`` be made on an account with this stored status and incident?

    OPENED: while no incident is open, or the open one is a shadow-mode one and this is
    not (enforcing supersedes it). Others: from the statuses the transition names (any,
    when it names none); UNLOCKED also needs something to end.
    """
    if transition.kind is TransitionKind.OPENED:
        return incident is None or (incident.shadow and not transition.shadow)
    if transition.expect and status not in transition.expect:
        return False
    if transition.kind is TransitionKind.UNLOCKED:
        return status is not AccountStatus.OK or incident is not None
    return True


def incident_state(status: AccountStatus) -> str:
    return {AccountStatus.OK: "notify", AccountStatus.HELD: "held",
            AccountStatus.LOCKED: "locked"}[status]


def audit_action(transition: Transition) -> str:
    """The audit trail's word for a transition."""
    if transition.kind is TransitionKind.OPENED:
        return f"incident opened ({transition.mode})"
    return str(transition.kind.value)


def evidence(account: str, transition: Transition, state: AccountState,
             spam_events: Sequence[MessageEvent], config: AccountsConfig,
             now: float) -> dict[str, object]:
    """The evidence a notice carries (JSON-ready): counts per window, first and last spam
    message, client IPs, top symbols, up to three subjects, queue ids."""
    events = sorted(spam_events, key=lambda e: e.at)
    symbols = collections.Counter(name for e in events for name in e.symbols)

    def distinct(values: Iterable[str | None]) -> list[str]:
        return list(dict.fromkeys(v for v in values if v))[:LIST_SHOWN]

    counts = {format_duration(c.window): {"messages": c.messages, "recipients": c.recipients,
                                          "unique_recipients": c.unique_recipients}
              for c in state.windows}
    return {
        "account": account,
        "transition": transition.kind.value,
        "mode": transition.mode,
        "shadow": transition.shadow,
        "reason": transition.reason,
        "at": now,
        "counts": counts,
        "spam_verdicts": {format_duration(config.incident.window): state.spam_verdicts},
        "first_spam": events[0].at if events else None,
        "last_spam": events[-1].at if events else None,
        "client_ips": distinct(e.ip for e in reversed(events)),
        "top_symbols": [name for name, _ in symbols.most_common(LIST_SHOWN)],
        "subjects": distinct(e.subject for e in reversed(events))[:SUBJECTS_SHOWN],
        "queue_ids": distinct(e.queue_id for e in reversed(events)),
    }


def windows_of(config: AccountsConfig) -> tuple[float, ...]:
    return tuple(limit.window for limit in config.limits)


def empty_counts(config: AccountsConfig, fresh: int) -> tuple[Counts, ...]:
    return tuple(Counts(window, fresh_recipients=fresh) for window in windows_of(config))



# --------------------------------------------------------- stored forms (JSON) --
def event_json(event: MessageEvent) -> str:
    return json.dumps({"at": event.at, "recipients": list(event.recipients[:LIST_SHOWN]),
                       "n": len(event.recipients), "counted": event.counted,
                       "spam": event.spam, "ip": event.ip, "queue_id": event.queue_id,
                       "subject": event.subject, "action": event.action,
                       "score": event.score, "symbols": list(event.symbols)},
                      separators=(",", ":"))


def event_from_json(text: str | bytes) -> MessageEvent:
    doc = json.loads(text)
    return MessageEvent(at=doc["at"], recipients=tuple(doc["recipients"]),
                        counted=doc["counted"], spam=doc["spam"], ip=doc["ip"],
                        queue_id=doc["queue_id"], subject=doc["subject"],
                        action=doc["action"], score=doc["score"],
                        symbols=tuple(doc["symbols"]))


def incident_from_json(text: str | bytes) -> Incident:
    doc = json.loads(text)
    return Incident(id=doc["id"], account=doc["account"], opened=doc["opened"],
                    state=doc["state"], reason=doc["reason"], shadow=doc["shadow"],
                    closed=doc.get("closed"), evidence=doc.get("evidence") or {})


def recipient_key(address: str) -> str:
    """Unique recipients are counted case-insensitively (as Exim's lsearch matches)."""
    return address.lower()
