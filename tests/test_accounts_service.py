"""Accounts through the pipeline (in-process): counting, incidents, hold, lock, throttle,
store failure, the helper's answers, and what ``exim-policy test`` must not record.

A scripted scanner stands in for Rspamd here; the real chain (Exim, Rspamd, Redis, the
daemon) is in tests/e2e/test_e2e_accounts.py and tests/test_accounts_daemon.py.
"""
from __future__ import annotations

import asyncio

import pytest

from exim_policy.config import from_dict
from exim_policy.forwarding.mapfile import ForwardingMap
from exim_policy.model import AccountStatus, Envelope, ScanResult
from exim_policy.protocol.mbox import exim_mbox_wrap
from exim_policy.pipeline import PolicyService
from exim_policy.state.base import StoreError
from exim_policy.state.memory import MemoryStore
from exim_policy.state.tracker import AccountTracker

T0 = 1_800_000_000.0
ACCOUNTS = {"enabled": True, "store": "memory",
            "limits": [{"window": "1m", "messages": 3}],
            "incident": {"window": "1h", "spam_verdicts": 2, "on_open": "hold",
                         "lock_after": 2}}


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Scripted:
    """Rejects messages that say GTUBE, passes the rest; counts its scans."""

    def __init__(self) -> None:
        self.scans = 0

    async def scan(self, message, envelope, traffic):
        self.scans += 1
        spam = b"GTUBE" in bytes(message)
        return ScanResult("reject" if spam else "no action", 15.0 if spam else 0.0, 15.0)


class BrokenStore(MemoryStore):
    broken = False

    async def state(self, *args):
        if self.broken:
            raise StoreError("account store redis://127.0.0.1:1/0: Connection refused")
        return await super().state(*args)

    async def record(self, *args):
        if self.broken:
            raise StoreError("account store redis://127.0.0.1:1/0: Connection refused")
        return await super().record(*args)


def setup(accounts=None, failure=None, store_cls=MemoryStore):
    config = from_dict({"accounts": {**ACCOUNTS, **(accounts or {})},
                        "failure": failure or {}})
    clock = Clock()
    notices = []
    store = store_cls(config.accounts)
    tracker = AccountTracker(config, store, notices.append, clock=clock)
    scanner = Scripted()
    service = PolicyService(config, scanner, ForwardingMap().forwards, tracker, clock=clock)
    return service, tracker, clock, notices, scanner


def message(spam: bool = False, subject: str = "hello") -> bytes:
    body = (f"Subject: {subject}\nFrom: alice@example.com\n\n"
            + ("XJS*GTUBE*test\n" if spam else "hi\n")).encode()
    return exim_mbox_wrap(body, sender="alice@example.com", recipients=["x@example.net"])


def send(service, spam=False, user="alice", rcpts=("x@example.net",)):
    envelope = Envelope(sender="alice@example.com", recipients=rcpts, ip="192.0.2.7",
                        user=user, queue_id="1abc-000001-00")
    return asyncio.run(service.evaluate(envelope, message(spam))).decision


def test_spam_opens_an_incident_then_everything_is_held_then_locked():
    service, tracker, clock, notices, _ = setup()
    assert send(service, spam=True).action == "reject"
    clock.now += 1
    opened = send(service, spam=True)
    assert opened.action == "reject" and "opens an incident (hold)" in opened.reason
    [notice] = notices
    assert notice.incident.state == "held" and notice.incident.evidence["subjects"] == ["hello"]
    clock.now += 1
    ham = send(service)  # ham from a held account: quarantined too
    assert ham.action == "reject" and "account alice is held: incident 1" in ham.reason
    for _ in range(2):
        clock.now += 1
        send(service, spam=True)
    assert [n.transition.kind.value for n in notices] == ["opened", "locked"]
    assert asyncio.run(tracker.status("alice")) is AccountStatus.LOCKED


def test_the_message_over_a_limit_gets_a_451_and_is_not_scanned():
    service, tracker, clock, _, scanner = setup()
    answers = []
    for _ in range(4):
        clock.now += 1
        answers.append(send(service).action)
    assert answers == ["no action"] * 3 + ["soft reject"]
    assert scanner.scans == 3
    assert asyncio.run(tracker.status("alice")) is AccountStatus.THROTTLED
    clock.now += 61  # the window moved on
    assert send(service).action == "no action"
    assert asyncio.run(tracker.status("alice")) is AccountStatus.OK


def test_other_accounts_and_inbound_mail_are_not_affected():
    service, _, clock, _, _ = setup()
    for _ in range(4):
        clock.now += 1
        send(service)
    assert send(service, user="bob").action == "no action"
    inbound = send(service, user=None)
    assert inbound.action == "no action" and inbound.account is None


def test_shadow_mode_counts_and_notifies_but_answers_the_verdict():
    service, tracker, clock, notices, _ = setup(accounts={"mode": "shadow"})
    actions = []
    for spam in (True, True, False, False, False, False):
        clock.now += 1
        actions.append(send(service, spam=spam).action)
    assert actions == ["reject", "reject"] + ["no action"] * 4
    [notice] = notices
    assert notice.transition.shadow and notice.incident.shadow
    assert asyncio.run(tracker.status("alice")) is AccountStatus.OK


def test_a_store_outage_is_the_configured_decision_and_a_seen_hold_stays():
    service, tracker, clock, _, _ = setup(store_cls=BrokenStore)
    store = tracker.store
    store.broken = True
    assert send(service).action == "no action"  # failure.accounts = open
    store.broken = False
    for _ in range(2):
        clock.now += 1
        send(service, spam=True)       # held now, and this daemon saw it
    store.broken = True
    clock.now += 1
    held = send(service)
    assert held.action == "reject" and "as last seen" in held.reason
    assert asyncio.run(tracker.status("alice")) is AccountStatus.HELD
    assert tracker.store_errors >= 2


def test_tempfail_when_the_store_is_down():
    service, tracker, _, _, _ = setup(failure={"accounts": "tempfail"}, store_cls=BrokenStore)
    tracker.store.broken = True
    decision = send(service)
    assert decision.action == "soft reject" and decision.account.store_failed
    assert decision.message == service.config.texts.tempfail


def test_the_test_command_path_records_nothing():
    service, tracker, clock, notices, _ = setup()
    reader = PolicyService(service.config, service.scanner, service.forwards, tracker,
                           record=False, clock=clock)
    clock.now += 1
    send(service, spam=True)  # one spam verdict recorded: the next one opens an incident
    for _ in range(3):
        decision = asyncio.run(reader.evaluate(
            Envelope(sender="a@example.com", recipients=("x@example.net",), user="alice"),
            message(spam=True))).decision
        assert decision.account.transitions  # it would open an incident...
    assert notices == []                     # ...but nothing was recorded
    state = asyncio.run(tracker.store.state("alice", (), clock.now))
    assert state.spam_verdicts == 1 and state.status is AccountStatus.OK


@pytest.mark.parametrize("user", ["evil\x00name", "x" * 10_000, "a\\b", "\xff\xfe\xfd"])
def test_hostile_account_names_are_escaped_everywhere(user, caplog):
    service, tracker, clock, notices, _ = setup()
    with caplog.at_level("INFO"):
        for _ in range(2):
            clock.now += 1
            decision = send(service, spam=True, user=user)
    account = decision.account.account
    assert "\x00" not in account and len(account) <= 256 and "\n" not in account
    assert notices and notices[0].incident.account == account
    for record in caplog.records:
        text = record.getMessage()
        assert "\x00" not in text and len(text) < 5000
