"""exim_outcome(): a Decision -> what exim/acl_data.conf does with it, as a table.

The table is written from reading the ACL (statement order: defer on no answer, soft reject
-> 451, inbound reject -> 550, outbound reject -> quarantine, inbound add header / rewrite
subject -> X-Spam headers, anything else -> accepted); the e2e tests drive the real Exim.
"""
from __future__ import annotations

import dataclasses

import pytest

from exim_policy.commands.test.exim_outcome import (
    ACCEPTED,
    DEFAULT_QUARANTINE,
    DEFAULT_REJECT_TEXT,
    DEFAULT_TEMPFAIL_TEXT,
    MARKED,
    REDIRECTED,
    REJECTED,
    TEMPFAIL,
    EximOutcome,
    acl_text,
    exim_outcome,
)
from exim_policy.model import (
    ADD_HEADER,
    GREYLIST,
    NO_ACTION,
    REJECT,
    REWRITE_SUBJECT,
    SOFT_REJECT,
    Decision,
    ScanFailure,
    ScanResult,
    Traffic,
)
from exim_policy.protocol.rspamc import MAX_VALUE_BYTES

IN, OUT, FWD = Traffic.INBOUND, Traffic.OUTBOUND, Traffic.FORWARDING
Q = "quarantine@example.net"


def decision(action: str, traffic: Traffic, reason: str = "the reason", **kw) -> Decision:
    scan = kw.pop("scan", ScanResult(action=action, score=1.0, required_score=15.0))
    return Decision(action=action, traffic=traffic, reason=reason, scan=scan, **kw)


# (action, traffic, outcome, smtp code, start of the message)
TABLE = [
    (NO_ACTION, IN, ACCEPTED, 250, "accepted (with the X-Spam-Action, X-Spam-Score"),
    (NO_ACTION, FWD, ACCEPTED, 250, "accepted (with the X-Spam-Action"),
    (NO_ACTION, OUT, ACCEPTED, 250, "accepted unchanged (outbound"),
    (GREYLIST, IN, ACCEPTED, 250, "accepted (with"),
    (GREYLIST, OUT, ACCEPTED, 250, "accepted unchanged"),
    ("discard", IN, ACCEPTED, 250, "accepted (with"),       # custom actions: no ACL branch
    ("quarantine", OUT, ACCEPTED, 250, "accepted unchanged"),
    (ADD_HEADER, IN, MARKED, 250, "accepted with X-Spam headers (X-Spam-Flag: YES"),
    (ADD_HEADER, FWD, MARKED, 250, "accepted with X-Spam headers"),
    (ADD_HEADER, OUT, ACCEPTED, 250, "accepted unchanged (outbound"),
    (REWRITE_SUBJECT, IN, MARKED, 250, "accepted with X-Spam headers"),
    (REWRITE_SUBJECT, OUT, ACCEPTED, 250, "accepted unchanged"),
    (REJECT, IN, REJECTED, 550, "550 5.7.1 the reason (rejected at DATA)"),
    (REJECT, FWD, REJECTED, 550, "550 5.7.1 the reason (rejected at DATA)"),
    (REJECT, OUT, REDIRECTED, 250, f"accepted, redirected to {Q} (acl_m_outspam=1)"),
    (SOFT_REJECT, IN, TEMPFAIL, 451, "451 4.7.1 the reason (tempfail at DATA"),
    (SOFT_REJECT, FWD, TEMPFAIL, 451, "451 4.7.1 the reason"),
    (SOFT_REJECT, OUT, TEMPFAIL, 451, "451 4.7.1 the reason"),
]


@pytest.mark.parametrize("action,traffic,outcome,code,message", TABLE)
def test_table(action, traffic, outcome, code, message):
    got = exim_outcome(decision(action, traffic), quarantine=Q)
    assert (got.outcome, got.smtp_code) == (outcome, code)
    assert got.message.startswith(message), got.message
    assert got.accepted_as_is == (outcome in (ACCEPTED, MARKED))


def test_outcome_is_frozen():
    got = exim_outcome(decision(REJECT, IN), quarantine=Q)
    assert isinstance(got, EximOutcome)
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.outcome = ACCEPTED  # type: ignore[misc]


def test_defer_is_exims_own_451_whatever_the_action():
    # failure mode "defer": the shim closes without answering, Exim's spam condition defers
    d = Decision(action=SOFT_REJECT, traffic=OUT, reason="scanner unavailable (x)",
                 failure=ScanFailure("x"), defer=True)
    got = exim_outcome(d, quarantine=Q)
    assert (got.outcome, got.smtp_code) == (TEMPFAIL, 451)
    assert got.message.startswith("451 Temporary local problem - please try later")


def test_failure_mode_accept_is_acceptance_marked_unscanned():
    d = Decision(action=NO_ACTION, traffic=IN, reason="scanner unavailable (x)",
                 failure=ScanFailure("x"))
    got = exim_outcome(d, quarantine=Q)
    assert got.outcome == ACCEPTED
    assert "X-Spam-Status: unscanned (scanner unavailable)" in got.message


def test_failure_mode_tempfail_uses_the_reason():
    d = Decision(action=SOFT_REJECT, traffic=FWD, reason="scanner unavailable (down)",
                 failure=ScanFailure("down"))
    got = exim_outcome(d, quarantine=Q)
    assert got.message.startswith("451 4.7.1 scanner unavailable (down)")


def test_custom_message_is_the_first_message_line():
    d = decision(REJECT, IN, reason="long internal reason", message="Go away, spammer")
    assert exim_outcome(d, quarantine=Q).message.startswith("550 5.7.1 Go away, spammer ")


def test_empty_reason_falls_back_to_the_macro_texts():
    # the ACL's "(.+)$" does not match an empty Message line: EXIM_POLICY_*_TEXT is used
    assert DEFAULT_REJECT_TEXT in exim_outcome(decision(REJECT, IN, reason=""),
                                               quarantine=Q).message
    assert DEFAULT_TEMPFAIL_TEXT in exim_outcome(decision(SOFT_REJECT, IN, reason=""),
                                                 quarantine=Q).message


def test_reason_is_one_line_and_cut_like_the_reply():
    d = decision(REJECT, IN, reason="first\r\nSecond: injected\n" + "é" * 3000)
    reason = acl_text(d)
    assert "\n" not in reason and "\r" not in reason
    assert reason.startswith("first  Second: injected ")
    assert len(reason.encode()) <= MAX_VALUE_BYTES
    assert "\ufffd" not in reason  # cut at a character boundary


def test_rewrite_subject_names_the_new_subject():
    scan = ScanResult(action=REWRITE_SUBJECT, score=9.0, required_score=15.0,
                      subject="*** SPAM *** hello")
    got = exim_outcome(decision(REWRITE_SUBJECT, IN, scan=scan), quarantine=Q)
    assert got.outcome == MARKED
    assert got.message.endswith("and Subject: *** SPAM *** hello")


def test_default_quarantine_text():
    got = exim_outcome(decision(REJECT, OUT))
    assert got.message == (f"accepted, redirected to {DEFAULT_QUARANTINE} (acl_m_outspam=1)")
    assert DEFAULT_QUARANTINE == "the quarantine address (EXIM_POLICY_QUARANTINE)"
