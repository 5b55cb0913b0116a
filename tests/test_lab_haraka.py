"""The Haraka lab: a real Haraka 3.3.4 + haraka-plugin-rspamd in front of the lab's Rspamd.

Haraka talks straight to Rspamd here (no shim yet), with contrib/haraka/rspamd.ini, so these
tests pin what the shipped snippet does with a scanner that speaks /checkv2: spam from
outside is refused at DATA, ham is delivered, and -- the part the plugin skips by default
-- authenticated mail is scanned too and a reject verdict refuses it.  Accepted mail goes
to the session SMTP sink (local recipients and relayed ones alike).

Haraka comes from ``contrib/setup-haraka.sh``; when it is missing the fixture *fails*.
"""
from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from exim_policy.lab import LabError, LabUnavailable, RspamdLab, SmtpSink, messages
from exim_policy.lab.haraka import HarakaLab, contrib_rspamd_ini, render_rspamd_ini

pytestmark = pytest.mark.real

CLIENT_HELO = "client.example.net"
LOCAL_RCPT = "bob@example.com"
EXTERNAL_RCPT = "carol@example.net"
OUTSIDE_SENDER = "dave@example.org"
USER, PASSWORD = "alice@example.com", "secret"


@pytest.fixture(scope="module")
def haraka(lab_dir: Path, rspamd: RspamdLab, sink: SmtpSink) -> Iterator[HarakaLab]:
    lab = HarakaLab(lab_dir / "haraka-lab", rspamd_host=rspamd.host, rspamd_port=rspamd.port,
                    sink_host=sink.host, sink_port=sink.port, users={USER: PASSWORD})
    problem = None
    try:
        lab.start()
    except LabUnavailable as exc:
        problem = f"Haraka is needed for this test: {exc}"
    except LabError as exc:
        lab.stop()
        problem = f"cannot start the lab's Haraka: {exc}"
    if problem:  # outside the except: no "during handling" traceback noise
        pytest.fail(problem, pytrace=False)
    yield lab
    lab.stop()


def send(haraka: HarakaLab, sender: str, rcpt: str, message: bytes, *,
         login: bool = False) -> tuple[int, bytes]:
    """One SMTP transaction; the reply to the end of DATA (smtplib does not raise on it)."""
    with smtplib.SMTP(haraka.host, haraka.port, local_hostname=CLIENT_HELO, timeout=30) as smtp:
        smtp.ehlo()
        if login:
            smtp.login(USER, PASSWORD)  # AUTH PLAIN: offered to loopback without TLS
        code, reply = smtp.mail(sender)
        assert code == 250, reply
        code, reply = smtp.rcpt(rcpt)
        assert code == 250, reply
        return smtp.data(message)


def in_sink(sink: SmtpSink, message_id: str) -> list:
    return [m for m in sink.messages if message_id.encode() in m.data]


def test_inbound_gtube_is_refused_at_data(haraka: HarakaLab, smtp_sink: SmtpSink) -> None:
    mid = messages.new_message_id()
    since = haraka.log_size()
    code, reply = send(haraka, OUTSIDE_SENDER, LOCAL_RCPT,
                       messages.gtube(LOCAL_RCPT, OUTSIDE_SENDER, mid))
    assert code == 550, reply
    haraka.wait_log(r"\[rspamd\] action: reject", since=since)
    assert not in_sink(smtp_sink, mid)


def test_inbound_ham_is_delivered(haraka: HarakaLab, smtp_sink: SmtpSink) -> None:
    mid = messages.new_message_id()
    code, reply = send(haraka, OUTSIDE_SENDER, LOCAL_RCPT,
                       messages.ham(LOCAL_RCPT, OUTSIDE_SENDER, mid))
    assert code == 250, reply
    smtp_sink.wait_for(1, timeout=10)
    [got] = in_sink(smtp_sink, mid)
    assert (got.mail_from, got.rcpt_tos) == (OUTSIDE_SENDER, (LOCAL_RCPT,))
    assert b"by haraka.lab.test (Haraka/" in got.data  # its own Received: header, fixed name


def test_authenticated_gtube_is_refused(haraka: HarakaLab, smtp_sink: SmtpSink) -> None:
    """[check] authenticated + [reject] authenticated: without them this would be relayed."""
    mid = messages.new_message_id("example.com")
    since = haraka.log_size()
    code, reply = send(haraka, USER, EXTERNAL_RCPT, messages.gtube(EXTERNAL_RCPT, USER, mid),
                       login=True)
    assert code == 550, reply
    haraka.wait_log(r"\[rspamd\] action: reject", since=since)
    assert not in_sink(smtp_sink, mid)


def test_authenticated_ham_is_relayed(haraka: HarakaLab, smtp_sink: SmtpSink) -> None:
    mid = messages.new_message_id("example.com")
    since = haraka.log_size()
    code, reply = send(haraka, USER, EXTERNAL_RCPT, messages.ham(EXTERNAL_RCPT, USER, mid),
                       login=True)
    assert code == 250, reply
    haraka.wait_log(r"\[rspamd\] action: no action", since=since)  # scanned, not skipped
    smtp_sink.wait_for(1, timeout=10)
    [got] = in_sink(smtp_sink, mid)
    assert (got.mail_from, got.rcpt_tos) == (USER, (EXTERNAL_RCPT,))
    assert b"auth=pass" in got.data


def test_rspamd_ini_is_the_contrib_snippet_with_host_and_port() -> None:
    template = contrib_rspamd_ini().read_text()
    rendered = render_rspamd_ini(template, "127.0.0.9", 4242, "[request]\nsettings_id = x\n")
    head = rendered.split("\n[", 1)[0]
    assert [line for line in head.splitlines() if line.startswith(("host", "port"))] == [
        "host = 127.0.0.9", "port = 4242"]
    # everything from the first section on is the snippet's own text
    assert rendered.split("\n[check]", 1)[1].startswith(template.split("\n[check]", 1)[1])
    assert rendered.rstrip().endswith("[request]\nsettings_id = x")


def test_rspamd_ini_template_without_port_fails() -> None:
    with pytest.raises(LabError, match="'port ='"):
        render_rspamd_ini("host = 127.0.0.1\n[check]\nport = 1\n", "127.0.0.1", 1)
