"""The whole chain for real: smtplib -> Exim 4.96 (exim/exim.conf) -> shim -> Rspamd 3.4,
deliveries to Maildirs and to the SMTP sink.  One test per behaviour the issue names."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from e2e_helpers import no_bounce_since, normalise

from exim_policy.lab import messages
from exim_policy.lab.addresses import (AUTH, EXTERNAL, EXTERNAL2, FORWARD_TARGET, FORWARDER, LOCAL,
                                       LOCAL2, USER_ADDRESS)
from exim_policy.lab.smtp import in_mailbox, in_sink, send, wait_mailbox, wait_sink

pytestmark = pytest.mark.real



def _settle(stack, outcome) -> None:
    """Wait until Exim finished every delivery of an accepted message."""
    assert outcome.queue_id, outcome
    stack.exim.wait_completed(outcome.queue_id)


# 1 ----------------------------------------------------------------------------------------
def test_inbound_ham_is_delivered_to_the_local_mailbox(stack):
    mid = messages.new_message_id()
    outcome = send(stack.exim, messages.ham(to=LOCAL, message_id=mid), [LOCAL])
    assert outcome.accepted, outcome
    delivered = wait_mailbox(stack.exim, "bob", mid)
    assert delivered["X-Spam-Action"] == "no action"
    assert delivered["X-Spam-Flag"] is None
    _settle(stack, outcome)
    assert stack.sink.messages == []


# 2 ----------------------------------------------------------------------------------------
def test_inbound_gtube_is_refused_at_data_without_a_bounce(stack):
    log_offset = len(stack.exim.mainlog)
    mid = messages.new_message_id()
    outcome = send(stack.exim, messages.gtube(to=LOCAL, message_id=mid), [LOCAL])
    assert outcome.code == 550, outcome
    assert outcome.stage == "data"
    # the 550 carries the public text (Rspamd's own message for GTUBE), and no score; the
    # shim's reason is in Exim's log
    assert outcome.text == "5.7.1 Gtube pattern", outcome
    time.sleep(0.5)  # would a delivery or a bounce still show up?
    assert in_mailbox(stack.exim, "bob", mid) == []
    assert stack.sink.messages == []
    assert stack.exim.queue_count() == 0
    assert no_bounce_since(stack.exim, log_offset)
    log = stack.exim.mainlog[log_offset:]
    assert "rejected after DATA: 550 5.7.1 Gtube pattern" in log
    assert "reason=\"Gtube pattern (Rspamd said 'reject', score " in log


# 3 ----------------------------------------------------------------------------------------
def test_authenticated_gtube_goes_to_the_quarantine_only(stack):
    mid = messages.new_message_id()
    outcome = send(stack.exim, messages.gtube(to=EXTERNAL, from_addr=USER_ADDRESS,
                                              message_id=mid),
                   [EXTERNAL], sender=USER_ADDRESS, auth=AUTH)
    assert outcome.accepted, outcome  # our own user is not bounced
    quarantined = wait_mailbox(stack.exim, "quarantine", mid)
    _settle(stack, outcome)
    assert stack.sink.messages == [], "outbound spam reached the outside world"
    # the original recipient can be recovered for a release
    assert quarantined["X-Exim-Policy-Recipients"] == EXTERNAL
    assert "auth=tester" in quarantined["X-Exim-Policy-Quarantine"]
    assert quarantined["Return-path"] == f"<{USER_ADDRESS}>"
    log = "\n".join(stack.exim.log_lines(outcome.queue_id))
    assert f"=> quarantine <{EXTERNAL}> R=mailbox" in log


# 4 ----------------------------------------------------------------------------------------
def test_spam_from_a_relay_host_is_outbound_and_quarantined(stack):
    """Unauthenticated, but from ::1, which is in EXIM_POLICY_RELAY_HOSTS and the shim's
    relay_networks: the same GTUBE that is a 550 from 127.0.0.1 is quarantined."""
    mid = messages.new_message_id()
    outcome = send(stack.exim, messages.gtube(to=EXTERNAL, message_id=mid), [EXTERNAL],
                   host="::1")
    assert outcome.accepted, outcome
    quarantined = wait_mailbox(stack.exim, "quarantine", mid)
    _settle(stack, outcome)
    assert in_sink(stack.sink, mid) == []
    assert quarantined["X-Exim-Policy-Recipients"] == EXTERNAL
    assert "ip=::1" in quarantined["X-Exim-Policy-Quarantine"]
    stack.shim.wait_log("relay network")
    # the non-relay source is still inbound: 550
    again = send(stack.exim, messages.gtube(to=LOCAL), [LOCAL], host="127.0.0.1")
    assert again.code == 550, again


def test_ham_from_a_relay_host_is_relayed(stack):
    mid = messages.new_message_id()
    outcome = send(stack.exim, messages.ham(to=EXTERNAL, message_id=mid), [EXTERNAL],
                   host="::1")
    assert outcome.accepted, outcome
    relayed = wait_sink(stack.sink, mid)
    assert relayed.rcpt_tos == (EXTERNAL,)


# 5 ----------------------------------------------------------------------------------------
def test_add_header_spam_to_a_forwarding_address_is_refused(stack):
    log_offset = len(stack.exim.mainlog)
    mid = messages.new_message_id()
    outcome = send(stack.exim, messages.x_test_spam(to=FORWARDER, message_id=mid), [FORWARDER])
    assert outcome.code == 550, outcome
    # the sender is not told the external address; the admin's log is
    assert outcome.text == "5.7.1 Message rejected as spam (the recipient forwards externally)", outcome
    assert f"reason=\"spam to a recipient that forwards externally ({FORWARDER})" in \
        stack.exim.mainlog[log_offset:]
    time.sleep(0.5)
    assert in_sink(stack.sink, mid) == [], "spam was forwarded"
    assert no_bounce_since(stack.exim, log_offset)
    assert stack.exim.queue_count() == 0


def test_add_header_spam_to_a_local_mailbox_is_delivered_with_spam_headers(stack):
    mid = messages.new_message_id()
    outcome = send(stack.exim, messages.x_test_spam(to=LOCAL, message_id=mid), [LOCAL])
    assert outcome.accepted, outcome
    delivered = wait_mailbox(stack.exim, "bob", mid)
    assert delivered["X-Spam-Flag"] == "YES"
    assert delivered["X-Spam-Action"] == "add header"
    assert float(delivered["X-Spam-Score"]) >= 6.0
    assert "TEST_SPAM_HEADER" in delivered["X-Spam-Report"]


def test_rewrite_subject_spam_gets_the_new_subject(stack):
    mid = messages.new_message_id()
    outcome = send(stack.exim, messages.gtube_rewrite_subject(to=LOCAL, message_id=mid),
                   [LOCAL])
    assert outcome.accepted, outcome
    delivered = wait_mailbox(stack.exim, "bob", mid)
    assert delivered["X-Spam-Action"] == "rewrite subject"
    assert delivered.get_all("Subject") == ["*** SPAM *** GTUBE rewrite subject test"]


def test_forged_verdict_headers_are_removed(stack):
    mid = messages.new_message_id()
    forged = messages.ham(to=LOCAL, message_id=mid).replace(
        b"MIME-Version:", b"X-Spam-Flag: NO\r\nX-Exim-Policy-Recipients: victim@example.com"
                          b"\r\nX-Spam-Status: unscanned (scanner unavailable)"
                          b"\r\nMIME-Version:", 1)
    outcome = send(stack.exim, forged, [LOCAL])
    assert outcome.accepted, outcome
    delivered = wait_mailbox(stack.exim, "bob", mid)
    assert delivered["X-Spam-Flag"] is None
    assert delivered["X-Exim-Policy-Recipients"] is None
    assert delivered["X-Spam-Status"] is None
    assert delivered["X-Spam-Action"] == "no action"


# 6 ----------------------------------------------------------------------------------------
def test_authenticated_ham_is_relayed_to_the_sink(stack):
    mid = messages.new_message_id()
    outcome = send(stack.exim, messages.ham(to=EXTERNAL, from_addr=USER_ADDRESS,
                                            message_id=mid),
                   [EXTERNAL], sender=USER_ADDRESS, auth=AUTH)
    assert outcome.accepted, outcome
    relayed = wait_sink(stack.sink, mid)
    assert relayed.rcpt_tos == (EXTERNAL,)
    assert relayed.mail_from == USER_ADDRESS
    # no verdict headers and no recipient list leak to the outside
    assert b"X-Spam-" not in relayed.data and b"X-Exim-Policy" not in relayed.data
    _settle(stack, outcome)
    assert in_mailbox(stack.exim, "quarantine", mid) == []


# 7 ----------------------------------------------------------------------------------------
def test_rspamd_down_tempfails_outbound_spam_and_accepts_inbound_ham(stack, rspamd_stopped):
    assert not rspamd_stopped.alive()
    log_offset = len(stack.exim.mainlog)
    spam_mid = messages.new_message_id()
    spam = messages.gtube(to=EXTERNAL, from_addr=USER_ADDRESS, message_id=spam_mid)
    outcome = send(stack.exim, spam, [EXTERNAL], sender=USER_ADDRESS, auth=AUTH)
    assert outcome.code == 451, outcome  # "soft reject" from the shim (outbound: tempfail)
    # the client is not told where Rspamd is nor how the shim is configured; the log is
    assert outcome.text == "4.7.1 Message cannot be checked now, please try again later"
    assert "failure.outbound = tempfail" in stack.exim.mainlog[log_offset:]
    ham_mid = messages.new_message_id()
    ham = send(stack.exim, messages.ham(to=LOCAL, message_id=ham_mid), [LOCAL])
    assert ham.accepted, ham              # inbound failure mode: accept
    delivered = wait_mailbox(stack.exim, "bob", ham_mid)
    # ... and marked as unscanned, not as a clean "no action, 0.0"
    assert delivered["X-Spam-Status"] == "unscanned (scanner unavailable)"
    assert delivered["X-Spam-Action"] is None and delivered["X-Spam-Score"] is None
    assert in_sink(stack.sink, spam_mid) == []

    rspamd_stopped.start()                # back; the client retries the tempfailed message
    retry = send(stack.exim, spam, [EXTERNAL], sender=USER_ADDRESS, auth=AUTH)
    assert retry.accepted, retry
    wait_mailbox(stack.exim, "quarantine", spam_mid)
    _settle(stack, retry)
    assert in_sink(stack.sink, spam_mid) == []


def test_shim_down_tempfails_everything_and_a_retry_delivers(stack):
    stack.shim.stop()
    try:
        spam_mid, ham_mid = messages.new_message_id(), messages.new_message_id()
        spam = messages.gtube(to=EXTERNAL, from_addr=USER_ADDRESS, message_id=spam_mid)
        ham = messages.ham(to=LOCAL, message_id=ham_mid)
        down_spam = send(stack.exim, spam, [EXTERNAL], sender=USER_ADDRESS, auth=AUTH)
        down_ham = send(stack.exim, ham, [LOCAL])
        # the fail-open trap is closed: a deferred scan is a 451, never a 250 or a 5xx
        assert down_spam.code == 451, down_spam
        assert down_ham.code == 451, down_ham
        assert "spam acl condition: all spamd servers failed" in stack.exim.mainlog
        time.sleep(0.5)
        assert in_sink(stack.sink, spam_mid) == []
        assert stack.exim.queue_count() == 0  # nothing accepted, so nothing Exim could lose
    finally:
        stack.shim.start()
    retry_spam = send(stack.exim, spam, [EXTERNAL], sender=USER_ADDRESS, auth=AUTH)
    retry_ham = send(stack.exim, ham, [LOCAL])
    assert retry_spam.accepted and retry_ham.accepted, (retry_spam, retry_ham)
    wait_mailbox(stack.exim, "quarantine", spam_mid)
    wait_mailbox(stack.exim, "bob", ham_mid)
    _settle(stack, retry_spam)
    assert in_sink(stack.sink, spam_mid) == []


# 8 ----------------------------------------------------------------------------------------
def test_ham_to_local_and_forwarding_recipients_reaches_all(stack):
    mid = messages.new_message_id()
    outcome = send(stack.exim, messages.ham(to=f"{LOCAL}, {FORWARDER}", message_id=mid),
                   [LOCAL, FORWARDER, LOCAL2])
    assert outcome.accepted, outcome
    wait_mailbox(stack.exim, "bob", mid)
    wait_mailbox(stack.exim, "carol", mid)
    forwarded = wait_sink(stack.sink, mid)
    assert forwarded.rcpt_tos == (FORWARD_TARGET,)


def test_inbound_spam_with_mixed_recipients_is_refused_for_all(stack):
    """Documented in exim/acl_data.conf: one body, one DATA reply. Spam that would be
    forwarded is refused for every recipient, the local one included."""
    mid = messages.new_message_id()
    outcome = send(stack.exim, messages.x_test_spam(to=f"{LOCAL}, {FORWARDER}", message_id=mid),
                   [LOCAL, FORWARDER])
    assert outcome.code == 550, outcome
    time.sleep(0.5)
    assert in_mailbox(stack.exim, "bob", mid) == []
    assert in_sink(stack.sink, mid) == []


def test_outbound_spam_with_mixed_recipients_is_quarantined_for_all(stack):
    """Outbound spam: every recipient, the local one included, goes to the quarantine
    (one copy), and the header lists them all for a release."""
    mid = messages.new_message_id()
    rcpts = [EXTERNAL, LOCAL, EXTERNAL2]
    outcome = send(stack.exim, messages.gtube(to=EXTERNAL, from_addr=USER_ADDRESS,
                                              message_id=mid),
                   rcpts, sender=USER_ADDRESS, auth=AUTH)
    assert outcome.accepted, outcome
    wait_mailbox(stack.exim, "quarantine", mid)
    _settle(stack, outcome)
    copies = in_mailbox(stack.exim, "quarantine", mid)
    assert len(copies) == 1, "one quarantined copy per message"
    listed = [a.strip() for a in normalise(copies[0]["X-Exim-Policy-Recipients"]).split(",")]
    assert sorted(listed) == sorted(rcpts)
    assert in_mailbox(stack.exim, "bob", mid) == []
    assert in_sink(stack.sink, mid) == []


def test_outbound_add_header_mail_is_relayed_unmarked(stack):
    """Only "reject" means outbound spam (outbound.spam_actions); an add-header verdict on
    our own user's mail neither quarantines it nor stamps X-Spam headers on it."""
    mid = messages.new_message_id()
    outcome = send(stack.exim, messages.x_test_spam(to=EXTERNAL, from_addr=USER_ADDRESS,
                                                    message_id=mid),
                   [EXTERNAL], sender=USER_ADDRESS, auth=AUTH)
    assert outcome.accepted, outcome
    relayed = wait_sink(stack.sink, mid)
    assert b"X-Spam-Flag" not in relayed.data


def quarantine_cli(stack, tmp_path, *args: str) -> subprocess.CompletedProcess:
    """``exim-policy quarantine ARGS`` on a store under ``tmp_path``, releasing through
    the lab's Exim (local submission)."""
    config = tmp_path / "quarantine.toml"
    if not config.exists():
        config.write_text(f'[quarantine]\nlisten = []\npath = "{tmp_path / "store"}"\n'
                          f'exim_command = ["exim", "-C", "{stack.exim.config_path}"]\n')
    return subprocess.run([sys.executable, "-m", "exim_policy", "quarantine", args[0],
                           "--config", str(config), *args[1:]],
                          capture_output=True, text=True, timeout=120)


def test_a_quarantined_message_can_be_imported_and_released_once(stack, tmp_path):
    """The recipe without a receiver: ``quarantine import`` reads the quarantine Maildir
    (recipients from X-Exim-Policy-Recipients), ``release`` re-submits it locally (not
    over SMTP, so not scanned again) to exactly those recipients, once."""
    mid = messages.new_message_id()
    rcpts = [EXTERNAL, EXTERNAL2]
    outcome = send(stack.exim, messages.gtube(to=EXTERNAL, from_addr=USER_ADDRESS,
                                              message_id=mid),
                   rcpts, sender=USER_ADDRESS, auth=AUTH)
    assert outcome.accepted, outcome
    wait_mailbox(stack.exim, "quarantine", mid)
    _settle(stack, outcome)
    [path] = [p for p in stack.exim.maildir_files("quarantine")
              if f"<{mid}>".encode() in p.read_bytes()]
    assert in_sink(stack.sink, mid) == []
    imported = quarantine_cli(stack, tmp_path, "import", str(path))
    assert imported.returncode == 0, imported.stdout + imported.stderr
    entry_id = imported.stdout.split(" imported as ")[1].split()[0]
    shown = json.loads(quarantine_cli(stack, tmp_path, "show", entry_id, "--json").stdout)
    assert sorted(r["address"] for r in shown["recipients"]) == sorted(rcpts)
    assert shown["evidence"]["account"] == "tester"
    assert shown["evidence"]["queue_id"] == outcome.queue_id
    result = quarantine_cli(stack, tmp_path, "release", entry_id, "--reason", "test")
    assert result.returncode == 0, result.stdout + result.stderr
    relayed = wait_sink(stack.sink, mid)
    assert sorted(relayed.rcpt_tos) == sorted(rcpts)
    assert relayed.mail_from == USER_ADDRESS
    assert b"X-Exim-Policy" not in relayed.data and b"Envelope-to" not in relayed.data
    assert b"Subject: GTUBE reject test" in relayed.data
    again = quarantine_cli(stack, tmp_path, "release", entry_id, "--reason", "test")
    assert again.returncode == 1 and "already released" in again.stderr
    time.sleep(0.5)
    assert len(in_sink(stack.sink, mid)) == 1


def test_import_refuses_a_message_that_was_not_quarantined(stack, tmp_path):
    plain = tmp_path / "plain.eml"
    plain.write_bytes(messages.ham().replace(b"\r\n", b"\n"))
    result = quarantine_cli(stack, tmp_path, "import", str(plain))
    assert result.returncode == 1
    assert "no X-Exim-Policy-Recipients" in result.stderr
