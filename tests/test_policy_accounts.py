"""decide() with an account's state: limits, incidents, hold, lock, shadow, store failure.

Tables: (account state, Rspamd's action, configuration) -> (answer, what to record).
"""
from __future__ import annotations

import pytest

from exim_policy.config import from_dict
from exim_policy.model import (AccountFacts, AccountState, AccountStatus, Context, Counts,
                               Envelope, Incident, ScanFailure, ScanResult, ScanSkipped, Symbol,
                               TransitionKind)
from exim_policy.policy import (SYM_ACCOUNT, account_of, account_status, decide, must_scan,
                                over_limit)

NOW = 1_800_000_000.0
BASE = {"enabled": True, "store": "memory",
        "limits": [{"window": "1h", "messages": 3, "recipients": 5, "unique_recipients": 4}],
        "incident": {"window": "1h", "spam_verdicts": 3, "on_open": "hold", "lock_after": 2}}


def config(**accounts):
    return from_dict({"accounts": {**BASE, **accounts},
                      "outbound": {"relay_networks": ["192.0.2.0/24"]}})


CONFIG = config()
SHADOW = config(mode="shadow")
AUTH = Envelope(sender="alice@example.com", recipients=("x@example.net",), ip="198.51.100.7",
                user="alice", queue_id="1abc-000001-00")
GTUBE = ScanResult("reject", 15.0, 15.0, symbols=(Symbol("GTUBE", 0.0), Symbol("BIG", 9.0)))
HAM = ScanResult("no action", 0.5, 15.0)


def state(status=AccountStatus.OK, messages=0, recipients=0, unique=0, fresh=1, spam=0,
          since_hold=0, incident=None):
    return AccountState(account="alice", status=status, incident=incident, spam_verdicts=spam,
                        spam_since_hold=since_hold,
                        windows=(Counts(3600.0, messages, recipients, unique, fresh),))


def facts(st, remembered=AccountStatus.OK):
    return Context(account=AccountFacts("alice", st, remembered), subject="Hello")


INCIDENT = Incident(id=7, account="alice", opened=NOW - 60, state="held", reason="3 spam")


@pytest.mark.parametrize("st, scan, action, status, counted, kinds", [
    # under every limit: Rspamd's verdict, counted
    (state(), HAM, "no action", "ok", True, []),
    (state(), GTUBE, "reject", "ok", True, []),
    # the message that crosses a limit is the first one refused; it is not counted
    (state(messages=2), HAM, "no action", "ok", True, []),
    (state(messages=3), HAM, "soft reject", "throttled", False, []),
    (state(recipients=4), HAM, "no action", "ok", True, []),
    (state(recipients=5), HAM, "soft reject", "throttled", False, []),
    (state(unique=3, fresh=1), HAM, "no action", "ok", True, []),
    (state(unique=4, fresh=1), HAM, "soft reject", "throttled", False, []),
    (state(unique=4, fresh=0), HAM, "no action", "ok", True, []),  # a known recipient
    # the third spam verdict in the window opens an incident: hold
    (state(spam=1), GTUBE, "reject", "ok", True, []),
    (state(spam=2), GTUBE, "reject", "ok", True, [TransitionKind.OPENED]),
    (state(spam=2), HAM, "no action", "ok", True, []),
    # held: everything is rejected (quarantined), ham included, whatever the rate
    (state(AccountStatus.HELD, incident=INCIDENT), HAM, "reject", "held", True, []),
    (state(AccountStatus.HELD, messages=9, incident=INCIDENT), HAM, "reject", "held", True, []),
    (state(AccountStatus.HELD, incident=INCIDENT), GTUBE, "reject", "held", True, []),
    # lock_after = 2 more spam verdicts while held
    (state(AccountStatus.HELD, since_hold=1, incident=INCIDENT), GTUBE, "reject", "held", True,
     [TransitionKind.LOCKED]),
    (state(AccountStatus.LOCKED, incident=INCIDENT), HAM, "reject", "locked", True, []),
    (state(AccountStatus.LOCKED, since_hold=5, incident=INCIDENT), GTUBE, "reject", "locked",
     True, []),
    # a scanner failure counts as a message, not as a verdict
    (state(spam=2), ScanFailure("down"), "soft reject", "ok", True, []),
])
def test_account_table(st, scan, action, status, counted, kinds):
    decision = decide(AUTH, scan, facts(st), CONFIG, NOW)
    assert decision.action == action
    outcome = decision.account
    assert outcome.account == "alice" and outcome.status.value == status
    assert outcome.event.counted is counted and outcome.event.at == NOW
    assert outcome.event.spam is (scan is GTUBE)
    assert [t.kind for t in outcome.transitions] == kinds
    # the reply names the account when it changes something (not for plain ok mail)
    noted = status != "ok" or bool(kinds) or action != scan_action(scan)
    assert any(s.name == SYM_ACCOUNT for s in decision.symbols) is noted


def scan_action(scan):
    return scan.action if isinstance(scan, ScanResult) else "soft reject"


def test_the_throttle_answer_has_the_public_text_and_the_full_reason():
    decision = decide(AUTH, HAM, facts(state(messages=3)), CONFIG, NOW)
    assert decision.message == "Sending rate limit exceeded, please try again later"
    assert "account alice is over its limit of 3 messages per 1h" in decision.reason
    assert decision.account.limit == "3 messages per 1h"


def test_an_account_over_its_limit_is_not_scanned():
    assert not must_scan(AUTH, facts(state(messages=3)), CONFIG)
    assert must_scan(AUTH, facts(state(messages=2)), CONFIG)
    assert must_scan(AUTH, facts(state(AccountStatus.HELD, messages=3)), CONFIG)  # evidence
    assert must_scan(AUTH, facts(state(messages=3)), SHADOW)  # shadow answers the verdict
    decision = decide(AUTH, ScanSkipped("over a limit"), facts(state(messages=3)), CONFIG, NOW)
    assert decision.action == "soft reject" and decision.scan is None
    assert decision.traffic.value == "outbound" and not decision.account.event.counted


def test_opening_straight_into_hold_or_lock_is_one_transition():
    for mode, to in (("notify", "ok"), ("hold", "held"), ("lock", "locked")):
        decision = decide(AUTH, GTUBE, facts(state(spam=2)),
                          config(incident={**BASE["incident"], "on_open": mode}), NOW)
        [step] = decision.account.transitions
        assert (step.kind, step.to.value, step.mode) == (TransitionKind.OPENED, to, mode)
        assert step.expect == (AccountStatus.OK,)
        assert step.reason == "3 spam verdicts within 1h"
        assert "opens an incident" in decision.reason


def test_an_open_notify_incident_opens_no_second_one():
    notify = Incident(id=3, account="alice", opened=NOW, state="notify", reason="")
    decision = decide(AUTH, GTUBE, facts(state(spam=9, incident=notify)),
                      config(incident={**BASE["incident"], "on_open": "notify"}), NOW)
    assert decision.action == "reject" and decision.account.transitions == ()


def test_incidents_and_locks_can_be_switched_off():
    off = config(incident={"spam_verdicts": 0, "lock_after": 0})
    assert decide(AUTH, GTUBE, facts(state(spam=50)), off, NOW).account.transitions == ()
    held = state(AccountStatus.HELD, since_hold=99, incident=INCIDENT)
    assert decide(AUTH, GTUBE, facts(held), off, NOW).account.transitions == ()


def test_shadow_mode_records_the_same_and_answers_the_verdict():
    for st, scan in ((state(messages=3), HAM), (state(AccountStatus.HELD, incident=INCIDENT),
                                                  HAM), (state(spam=2), GTUBE)):
        enforced = decide(AUTH, scan, facts(st), CONFIG, NOW)
        shadow = decide(AUTH, scan, facts(st), SHADOW, NOW)
        assert shadow.action == scan.action
        assert shadow.account.event == enforced.account.event
        assert [t.kind for t in shadow.account.transitions] == \
            [t.kind for t in enforced.account.transitions]
        assert all(t.shadow for t in shadow.account.transitions)
        assert "would" in shadow.reason


def test_policy_shadow_mode_makes_accounts_count_only():
    """policy.mode = "shadow" with accounts.mode = "enforce": as accounts' own shadow mode."""
    whole = from_dict({"accounts": BASE, "policy": {"mode": "shadow"},
                       "outbound": {"relay_networks": ["192.0.2.0/24"]}})
    assert whole.accounts.mode == "enforce" and whole.accounts_shadow
    for st, scan in ((state(messages=3), HAM), (state(AccountStatus.HELD, incident=INCIDENT),
                                                  HAM), (state(spam=2), GTUBE)):
        assert must_scan(AUTH, facts(st), whole)
        shadow = decide(AUTH, scan, facts(st), whole, NOW)
        assert shadow.action == scan.action
        assert all(t.shadow for t in shadow.account.transitions)
        assert account_status(st, whole) is AccountStatus.OK  # the helper answers ok too


@pytest.mark.parametrize("remembered, mode, action", [
    (AccountStatus.OK, "open", "no action"),
    (AccountStatus.OK, "tempfail", "soft reject"),
    (AccountStatus.HELD, "open", "reject"),      # a hold seen before stays in force
    (AccountStatus.LOCKED, "tempfail", "reject"),
])
def test_store_unreachable(remembered, mode, action):
    cfg = from_dict({"accounts": BASE, "failure": {"accounts": mode}})
    decision = decide(AUTH, HAM, facts(None, remembered), cfg, NOW)
    assert decision.action == action
    assert decision.account.store_failed and decision.account.event is None


def test_evidence_of_a_message():
    decision = decide(AUTH, GTUBE, facts(state()), CONFIG, NOW)
    event = decision.account.event
    assert (event.ip, event.queue_id, event.subject, event.action, event.score) == (
        "198.51.100.7", "1abc-000001-00", "Hello", "reject", 15.0)
    assert event.symbols == ("BIG", "GTUBE") and event.recipients == ("x@example.net",)


def test_account_of():
    assert account_of(AUTH, decide(AUTH, HAM, Context(), CONFIG, NOW).traffic, CONFIG) == "alice"
    relay = Envelope(sender="web@example.com", recipients=("x@example.net",), ip="192.0.2.9")
    traffic = decide(relay, HAM, Context(), CONFIG, NOW).traffic
    assert account_of(relay, traffic, CONFIG) == "ip:192.0.2.9"
    assert account_of(relay, traffic, config(relay_key="sender")) == "sender:web@example.com"
    inbound = Envelope(sender="a@example.org", recipients=("b@example.com",), ip="198.51.100.1")
    assert account_of(inbound, decide(inbound, HAM, Context(), CONFIG, NOW).traffic,
                      CONFIG) is None
    off = from_dict({})
    assert account_of(AUTH, decide(AUTH, HAM, Context(), off, NOW).traffic, off) is None


@pytest.mark.parametrize("raw, shown", [
    ("alice", "alice"),
    ("b\xc3\xb6b@example.com", "b\u00f6b@example.com"),  # UTF-8 bytes, decoded as latin-1
    ("bad\x00user", "bad\\x00user"),
    ("back\\slash", "back\\\\slash"),
    ("ip:192.0.2.1", "user:ip:192.0.2.1"),  # never mistaken for a relay account
    ("\xff\xfe", "\xff\xfe"),                # not UTF-8: latin-1 characters, printable
])
def test_account_names_are_safe(raw, shown):
    envelope = Envelope(recipients=("x@example.net",), user=raw)
    assert account_of(envelope, decide(envelope, HAM, Context(), CONFIG, NOW).traffic,
                      CONFIG) == shown


def test_a_huge_account_name_is_cut_but_stays_unique():
    one = Envelope(recipients=("x@example.net",), user="a" * 10_000 + "1")
    two = Envelope(recipients=("x@example.net",), user="a" * 10_000 + "2")
    names = [account_of(e, decide(e, HAM, Context(), CONFIG, NOW).traffic, CONFIG)
             for e in (one, two)]
    assert names[0] != names[1] and all(len(n) <= 256 for n in names)


def test_what_the_helper_answers():
    assert account_status(state(), CONFIG) is AccountStatus.OK
    assert account_status(state(messages=3), CONFIG) is AccountStatus.THROTTLED
    assert account_status(state(unique=4, fresh=0), CONFIG) is AccountStatus.THROTTLED
    assert account_status(state(AccountStatus.LOCKED), CONFIG) is AccountStatus.LOCKED
    assert account_status(state(AccountStatus.LOCKED), SHADOW) is AccountStatus.OK
    assert account_status(None, CONFIG) is AccountStatus.OK


def test_over_limit_texts():
    assert over_limit(state(recipients=4), 2, None, CONFIG) == "5 recipients per 1h"
    assert over_limit(state(), 1, None, config(limits=[{"window": "30s", "messages": 1}])) \
        is None


def test_enforcing_ignores_what_a_shadow_incident_did():
    shadow_hold = Incident(id=9, account="alice", opened=NOW, state="held", reason="",
                           shadow=True)
    st = state(AccountStatus.HELD, spam=2, since_hold=5, incident=shadow_hold)
    decision = decide(AUTH, GTUBE, facts(st), CONFIG, NOW)
    assert decision.action == "reject" and decision.account.status is AccountStatus.OK
    [step] = decision.account.transitions  # an enforced incident opens (superseding it)
    assert step.kind is TransitionKind.OPENED and not step.shadow
    assert decide(AUTH, HAM, facts(st), CONFIG, NOW).action == "no action"
    assert account_status(st, CONFIG) is AccountStatus.OK
    assert decide(AUTH, HAM, facts(st), SHADOW, NOW).action == "no action"  # shadow: would
