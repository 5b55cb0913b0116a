"""Incident notices: the mail (to the lab's SMTP sink), the webhook (requests, to a local
HTTP server), retries after failures, and never waiting on a slow peer."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from exim_policy.config import from_dict
from exim_policy.lab.ports import LOOPBACK, free_port
from exim_policy.model import AccountStatus, Incident, Transition, TransitionKind
from exim_policy.notify import Notice, Notifier, build_mail, deliver_once
from exim_policy.state.base import Applied

EVIDENCE = {"account": "alice", "transition": "opened", "at": 1_800_000_000.0,
            "counts": {"1h": {"messages": 9, "recipients": 30, "unique_recipients": 25}},
            "spam_verdicts": {"1h": 5}, "first_spam": 1_799_999_000.0,
            "last_spam": 1_800_000_000.0, "client_ips": ["192.0.2.7", "198.51.100.3"],
            "top_symbols": ["GTUBE", "BAYES_SPAM"], "subjects": ["Win", "Prize", "Now"],
            "queue_ids": ["1abc-000001-00"]}


def applied(shadow: bool = False, account: str = "alice") -> Applied:
    step = Transition(TransitionKind.OPENED, AccountStatus.HELD, expect=(AccountStatus.OK,),
                      reason="5 spam verdicts within 1h", mode="hold", shadow=shadow)
    return Applied(step, Incident(7, account, 1_800_000_000.0, "held", step.reason,
                                  shadow=shadow, evidence={**EVIDENCE, "account": account}))


def notify_config(**keys):
    return from_dict({"accounts": {"notify": {"mail_from": "exim-policy@lab.test",
                                              "timeout": 2.0, **keys}}}).accounts.notify


def test_the_mail_carries_the_evidence():
    mail = build_mail(Notice.of(applied()), notify_config(mail_to=["abuse@lab.test"]))
    assert mail["Subject"] == "[exim-policy] incident 7 opened: account alice is held"
    assert mail["To"] == "abuse@lab.test" and mail["X-Exim-Policy-Incident"] == "7"
    body = mail.get_content()
    for text in ("Account:      alice", "the account is held: all its outbound mail is "
                 "quarantined", "1h: 9 messages, 30 recipients, 25 unique",
                 "5 within 1h", "192.0.2.7, 198.51.100.3", "GTUBE, BAYES_SPAM",
                 "Win\n              Prize\n              Now", "1abc-000001-00",
                 "exim-policy accounts unlock alice"):
        assert text in body, text
    shadow = build_mail(Notice.of(applied(shadow=True)), notify_config(mail_to=["a@b.c"]))
    assert "(shadow mode)" in shadow["Subject"] and "would be held" in shadow["Subject"]
    assert "shadow mode: nothing was stopped" in shadow.get_content()


def test_an_escaped_hostile_account_name_stays_in_one_header_line():
    name = "evil\\r\\nBcc: victim@example.com"  # as the store keeps it: escaped
    mail = build_mail(Notice.of(applied(account=name)), notify_config(mail_to=["a@b.c"]))
    assert mail["Bcc"] is None and "\n" not in str(mail["Subject"]).replace("\n ", "")


def test_the_notifier_mails_through_the_smtp_server(smtp_sink):
    notifier = Notifier(notify_config(mail_to=["abuse@lab.test"],
                                      smtp=f"{LOOPBACK}:{smtp_sink.port}"))
    started = time.monotonic()
    notifier(applied())
    assert time.monotonic() - started < 0.1  # queued; the thread delivers
    [mail] = smtp_sink.wait_for(1, timeout=10)
    assert mail.rcpt_tos == ("abuse@lab.test",) and b"incident 7 opened" in mail.data
    notifier.close()
    assert notifier.sent == 1 and notifier.failed == 0


class Hook(BaseHTTPRequestHandler):
    received: list = []
    fail_first = 0

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if Hook.fail_first > 0:
            Hook.fail_first -= 1
            self.send_response(503)
            self.end_headers()
            return
        Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def hook():
    Hook.received, Hook.fail_first = [], 0
    server = ThreadingHTTPServer((LOOPBACK, 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{LOOPBACK}:{server.server_address[1]}/incident"
    server.shutdown()
    server.server_close()


def test_the_webhook_gets_json_and_a_failure_is_retried(hook, monkeypatch, caplog):
    import exim_policy.notify as notify

    monkeypatch.setattr(notify, "FIRST_RETRY", 0.2)
    Hook.fail_first = 1
    notifier = Notifier(notify_config(webhook_url=hook, attempts=3))
    with caplog.at_level("WARNING", logger="exim_policy.notify"):
        notifier(applied())
        deadline = time.monotonic() + 10
        while not Hook.received and time.monotonic() < deadline:
            time.sleep(0.05)
    notifier.close()
    [doc] = Hook.received
    assert doc["event"] == "exim-policy.incident" and doc["account"] == "alice"
    assert doc["incident"] == 7 and doc["state"] == "held"
    assert doc["evidence"]["client_ips"] == ["192.0.2.7", "198.51.100.3"]
    assert any("retrying in 0.2s" in r.getMessage() for r in caplog.records)


def test_a_dead_mail_server_is_logged_and_given_up_after_the_attempts(monkeypatch, caplog):
    import exim_policy.notify as notify

    monkeypatch.setattr(notify, "FIRST_RETRY", 0.05)
    notifier = Notifier(notify_config(mail_to=["abuse@lab.test"],
                                      smtp=f"{LOOPBACK}:{free_port()}", attempts=2))
    with caplog.at_level("WARNING", logger="exim_policy.notify"):
        notifier(applied())
        deadline = time.monotonic() + 10
        while notifier.failed == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    notifier.close()
    assert notifier.failed == 1 and notifier.sent == 0
    assert any("not delivered after 2 attempt(s)" in r.getMessage() for r in caplog.records)


def test_deliver_once_reports_each_failed_channel():
    failed = deliver_once(Notice.of(applied()), notify_config(
        mail_to=["abuse@lab.test"], smtp=f"{LOOPBACK}:{free_port()}",
        webhook_url=f"http://{LOOPBACK}:{free_port()}/x"))
    assert len(failed) == 2 and failed[0].startswith("mail to abuse@lab.test")
    assert failed[1].startswith("webhook http://")
