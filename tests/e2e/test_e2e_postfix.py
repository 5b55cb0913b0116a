"""Postfix 3.7 -> Rspamd's proxy worker in milter mode -> the shim's HTTP front -> Rspamd.

    smtplib --SMTP--> Postfix --milter--> rspamd_proxy --GET /checkv2--> shim --> Rspamd
                         '-- accepted mail --SMTP--> sink

Postfix runs from the unpacked Debian package beside Exim (contrib/setup-postfix.sh) with
contrib/postfix/main.cf and master.cf, the proxy with contrib/postfix/worker-proxy.inc,
both with only their addresses changed. The shim is the session's e2e shim (forwarding
map: fwd@lab.test). Outbound spam is the proof that matters here: the shim answers the
proxy with a milter quarantine and Postfix keeps the message in its hold queue, where an
admin releases it (the undo).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e_helpers import start_or_fail
from exim_policy.lab import NxDns, RspamdLab, SmtpSink, messages
from exim_policy.lab.addresses import EXTERNAL, FORWARDER
from exim_policy.lab.postfix import PostfixLab
from exim_policy.lab.rspamd import RspamdProxyLab
from exim_policy.lab.shim import ShimLab
from exim_policy.lab.smtp import Outcome, in_sink, transaction, wait_sink

pytestmark = pytest.mark.real

LOCAL = "bob@lab.test"
OUTSIDE_SENDER = "dave@example.org"
USER, PASSWORD = "alice@lab.test", "secret"
HELO = "client.example.net"


@pytest.fixture(scope="module")
def proxy(e2e_dir: Path, nxdns: NxDns, shim: ShimLab) -> Iterator[RspamdProxyLab]:
    lab = RspamdProxyLab(e2e_dir, dns_port=nxdns.port, upstream=shim.http_address,
                         subdir="rspamd-proxy-shim")
    start_or_fail(lab, "rspamd_proxy")
    yield lab
    lab.stop()


@pytest.fixture(scope="module")
def postfix(e2e_dir: Path, proxy: RspamdProxyLab, sink: SmtpSink) -> Iterator[PostfixLab]:
    lab = PostfixLab(e2e_dir / "postfix-shim", milter=proxy.milter_address,
                     relay_host=sink.host, relay_port=sink.port, users={USER: PASSWORD},
                     local_domains=("lab.test",))
    start_or_fail(lab, "the lab's Postfix")
    yield lab
    lab.delete("ALL")
    lab.stop()


def send(lab: PostfixLab, sender: str, rcpts: tuple[str, ...], message: bytes, *,
         submission: bool = False) -> Outcome:
    """Port 25 unauthenticated, or the submission port with AUTH."""
    return transaction(lab.host, lab.submission_port if submission else lab.port, message,
                       rcpts, sender=sender, helo=HELO,
                       auth=(USER, PASSWORD) if submission else None)


def shim_line(shim: ShimLab, queue_id: str) -> str:
    """The shim's decision line for Postfix's queue id (the proxy sends it as Queue-ID)."""
    return next(line for line in shim.wait_log(f"qid={queue_id} ").splitlines()
                if f"qid={queue_id} " in line)


def test_authenticated_gtube_is_held_then_released(postfix: PostfixLab, shim: ShimLab,
                                                   rspamd_running: RspamdLab,
                                                   smtp_sink: SmtpSink) -> None:
    mid = messages.new_message_id("lab.test")
    rcpts = (EXTERNAL, LOCAL)
    outcome = send(postfix, USER, rcpts, messages.gtube(EXTERNAL, USER, mid), submission=True)
    assert outcome.code == 250, outcome  # accepted: the sender learns nothing, nothing is bounced
    [held] = postfix.wait_hold(1)
    assert (held.sender, sorted(held.recipients)) == (USER, sorted(rcpts))
    assert mid.encode() in postfix.message(held.queue_id)
    line = shim_line(shim, held.queue_id)
    assert "proto=http/CHECK traffic=outbound user=alice@lab.test" in line
    assert "final='reject'" in line
    postfix.flush()
    time.sleep(0.5)
    assert not in_sink(smtp_sink, mid)  # held, not delivered
    postfix.release(held.queue_id)  # an admin's undo: to the original recipients
    got = wait_sink(smtp_sink, mid)
    assert sorted(got.rcpt_tos) == sorted(rcpts)
    assert postfix.hold_queue() == []


def test_inbound_gtube_is_refused_with_554(postfix: PostfixLab, shim: ShimLab,
                                           rspamd_running: RspamdLab,
                                           smtp_sink: SmtpSink) -> None:
    mid = messages.new_message_id()
    outcome = send(postfix, OUTSIDE_SENDER, (LOCAL,), messages.gtube(LOCAL, OUTSIDE_SENDER, mid))
    # the public text, as in Exim's 550: Rspamd's own message
    assert (outcome.code, outcome.text) == (554, "5.7.1 Gtube pattern"), outcome
    assert not in_sink(smtp_sink, mid)


def test_add_header_spam_to_a_forwarding_recipient_is_refused(postfix: PostfixLab,
                                                              rspamd_running: RspamdLab,
                                                              smtp_sink: SmtpSink) -> None:
    mid = messages.new_message_id()
    outcome = send(postfix, OUTSIDE_SENDER, (FORWARDER,),
                   messages.x_test_spam(FORWARDER, OUTSIDE_SENDER, mid))
    assert outcome.code == 554, outcome
    assert outcome.text == "5.7.1 Message rejected as spam (the recipient forwards externally)", outcome
    assert not in_sink(smtp_sink, mid)


def test_ham_is_delivered(postfix: PostfixLab, shim: ShimLab, rspamd_running: RspamdLab,
                          smtp_sink: SmtpSink) -> None:
    inbound, outbound = messages.new_message_id(), messages.new_message_id("lab.test")
    assert send(postfix, OUTSIDE_SENDER, (LOCAL,),
                messages.ham(LOCAL, OUTSIDE_SENDER, inbound)).code == 250
    assert send(postfix, USER, (EXTERNAL,), messages.ham(EXTERNAL, USER, outbound),
                submission=True).code == 250
    assert wait_sink(smtp_sink, inbound).rcpt_tos == (LOCAL,)
    assert wait_sink(smtp_sink, outbound).rcpt_tos == (EXTERNAL,)
    assert postfix.hold_queue() == []
