"""The HTTP front with the real clients: rspamc 3.4 and Haraka 3.3.4 (+ haraka-plugin-rspamd
1.6.1) against the real shim and Rspamd; rspamd_proxy behind Postfix is in
test_e2e_postfix.py.

    rspamc ----------------HTTP /checkv2---> shim (http_listen) --HTTP--> Rspamd
    smtplib --SMTP--> Haraka --HTTP------^

The shim is the session's e2e shim (forwarding map: fwd@lab.test; relay_networks ::1), so
what Haraka relays from 127.0.0.1 is inbound unless authenticated. Haraka uses
contrib/haraka/rspamd.ini with only host and port changed: what is tested is what ships.
"""
from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e_helpers import start_or_fail
from exim_policy.config import TextsConfig
from exim_policy.lab import RspamdLab, SmtpSink, messages
from exim_policy.lab.addresses import EXTERNAL, FORWARDER
from exim_policy.lab.haraka import HarakaLab
from exim_policy.lab.shim import ShimLab
from exim_policy.lab.smtp import Outcome, in_sink, transaction, wait_sink

pytestmark = pytest.mark.real

LOCAL = "bob@lab.test"
OUTSIDE_SENDER = "dave@example.org"
USER, PASSWORD = "alice@lab.test", "secret"
HELO = "client.example.net"


# --------------------------------------------------------------------------- rspamc --
def rspamc(shim: ShimLab, tmp_path: Path, message: bytes, *, rcpts=(LOCAL,),
           user: str | None = None, queue_id: str) -> str:
    path = tmp_path / f"{queue_id}.eml"
    path.write_bytes(message)
    # from loopback: Rspamd's host-name checks (hfilter) leave a local client alone, so ham
    # is "no action"; 127.0.0.1 is not among the shim's relay networks: inbound
    cmd = ["rspamc", "-h", shim.http_address, "-F", OUTSIDE_SENDER if user is None else user,
           "-i", "127.0.0.1", "--helo", HELO, "--header", f"Queue-Id={queue_id}"]
    for rcpt in rcpts:
        cmd += ["-r", rcpt]
    if user is not None:
        cmd += ["-u", user]
    done = subprocess.run(cmd + [str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def printed_action(output: str) -> str:
    match = re.search(r"^Action: (.+)$", output, re.MULTILINE)
    assert match, output
    return match.group(1).strip()


def logged_final(shim: ShimLab, queue_id: str) -> str:
    line = next(line for line in shim.wait_log(f"qid={queue_id} ").splitlines()
                if f"qid={queue_id} " in line)
    match = re.search(r" final='([^']+)'", line)
    assert match, line
    return match.group(1)


@pytest.mark.parametrize("case, message, rcpts, user, action, symbol", [
    ("ham", messages.ham(LOCAL, OUTSIDE_SENDER), (LOCAL,), None, "no action", None),
    ("gtube", messages.gtube(LOCAL, OUTSIDE_SENDER), (LOCAL,), None, "reject", None),
    ("auth-gtube", messages.gtube(EXTERNAL, USER), (EXTERNAL,), USER, "reject",
     "EXIM_POLICY_OUTBOUND"),
    ("forwarding", messages.gtube_add_header(FORWARDER, OUTSIDE_SENDER), (LOCAL, FORWARDER),
     None, "reject", "EXIM_POLICY_FORWARDING"),
])
def test_rspamc_prints_the_shims_decision(shim: ShimLab, rspamd_running: RspamdLab,
                                          tmp_path: Path, case, message, rcpts, user, action,
                                          symbol) -> None:
    queue_id = f"rspamc-{case}-{time.monotonic_ns()}"
    output = rspamc(shim, tmp_path, message, rcpts=rcpts, user=user, queue_id=queue_id)
    assert printed_action(output) == action == logged_final(shim, queue_id)
    if symbol:
        assert f"Symbol: {symbol}" in output


def test_ping_route(shim: ShimLab) -> None:
    done = subprocess.run(["curl", "-sS", f"http://{shim.http_address}/ping"],
                          capture_output=True, timeout=30)
    assert done.stdout == b"pong\r\n"


# --------------------------------------------------------------------------- Haraka --
@pytest.fixture(scope="module")
def haraka(e2e_dir: Path, shim: ShimLab, sink: SmtpSink) -> Iterator[HarakaLab]:
    lab = HarakaLab(e2e_dir / "haraka-http", rspamd_host="127.0.0.1",
                    rspamd_port=shim.http_port, sink_host=sink.host, sink_port=sink.port,
                    users={USER: PASSWORD}, local_domains=("lab.test",))
    start_or_fail(lab, "the lab's Haraka")
    yield lab
    lab.stop()


def send(haraka: HarakaLab, sender: str, rcpts: tuple[str, ...], message: bytes, *,
         login: bool = False) -> Outcome:
    return transaction(haraka.host, haraka.port, message, rcpts, sender=sender, helo=HELO,
                       auth=(USER, PASSWORD) if login else None)


def test_haraka_inbound_gtube_is_refused_at_data(haraka: HarakaLab, shim: ShimLab,
                                                 rspamd_running: RspamdLab,
                                                 smtp_sink: SmtpSink) -> None:
    mid = messages.new_message_id()
    outcome = send(haraka, OUTSIDE_SENDER, (LOCAL,), messages.gtube(LOCAL, OUTSIDE_SENDER, mid))
    assert outcome.code == 550 and outcome.stage == "data", outcome
    assert not in_sink(smtp_sink, mid)


def test_haraka_add_header_spam_to_a_forwarding_recipient_is_refused(
        haraka: HarakaLab, shim: ShimLab, rspamd_running: RspamdLab,
        smtp_sink: SmtpSink) -> None:
    mid = messages.new_message_id()
    outcome = send(haraka, OUTSIDE_SENDER, (FORWARDER,),
                   messages.x_test_spam(FORWARDER, OUTSIDE_SENDER, mid))
    assert (outcome.code, outcome.text) == (550, "Message rejected as spam (the recipient forwards externally)"), outcome
    assert not in_sink(smtp_sink, mid)
    # the same message to a plain local mailbox: Rspamd's own "add header" stands
    mid = messages.new_message_id()
    outcome = send(haraka, OUTSIDE_SENDER, (LOCAL,),
                   messages.x_test_spam(LOCAL, OUTSIDE_SENDER, mid))
    assert outcome.code == 250, outcome
    got = wait_sink(smtp_sink, mid)
    assert b"X-Rspamd-Score" in got.data  # Haraka's headers for an "add header" verdict


def test_haraka_authenticated_gtube_is_refused_not_relayed(haraka: HarakaLab, shim: ShimLab,
                                                           rspamd_running: RspamdLab,
                                                           smtp_sink: SmtpSink) -> None:
    mid = messages.new_message_id("lab.test")
    outcome = send(haraka, USER, (EXTERNAL,), messages.gtube(EXTERNAL, USER, mid), login=True)
    assert (outcome.code, outcome.text) == (550, TextsConfig().outbound), outcome
    log = shim.wait_log("traffic=outbound user=alice@lab.test")
    assert "final='reject'" in log.split("traffic=outbound user=alice@lab.test")[-1]
    time.sleep(0.5)
    assert not in_sink(smtp_sink, mid)


def established(port: int) -> set[str]:
    """Client ends of the established TCP connections to ``port`` on loopback."""
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return {line.split()[2] for line in out.splitlines() if line.strip()}


def test_haraka_ham_is_queued_and_messages_share_one_connection(
        haraka: HarakaLab, shim: ShimLab, rspamd_running: RspamdLab,
        smtp_sink: SmtpSink) -> None:
    """Node >= 19 keeps the plugin's HTTP connection alive (its agent drops it after 5 s
    idle): the second message goes over the connection the first one used."""
    first, second = messages.new_message_id(), messages.new_message_id("lab.test")
    outcome = send(haraka, OUTSIDE_SENDER, (LOCAL,), messages.ham(LOCAL, OUTSIDE_SENDER, first))
    assert outcome.code == 250, outcome
    after_first = established(shim.http_port)
    assert after_first, "Haraka closed its connection to the shim after the reply"
    outcome = send(haraka, USER, (EXTERNAL,), messages.ham(EXTERNAL, USER, second), login=True)
    assert outcome.code == 250, outcome
    assert established(shim.http_port) & after_first
    assert wait_sink(smtp_sink, first).rcpt_tos == (LOCAL,)
    assert wait_sink(smtp_sink, second).rcpt_tos == (EXTERNAL,)


# --------------------------------------------------------------- policy.mode = shadow --
@pytest.fixture(scope="module")
def shadow_shim(e2e_dir: Path, rspamd: RspamdLab) -> Iterator[ShimLab]:
    lab = ShimLab(e2e_dir / "shadow", rspamd_url=rspamd.url, forwarding=(FORWARDER,),
                  extra_toml='[policy]\nmode = "shadow"\n')
    start_or_fail(lab, "the shim in shadow mode")
    yield lab
    lab.stop()


def test_shadow_mode_answers_rspamd_and_logs_what_it_would(shadow_shim: ShimLab,
                                                          rspamd_running: RspamdLab,
                                                          tmp_path: Path) -> None:
    queue_id = f"rspamc-shadow-{time.monotonic_ns()}"
    output = rspamc(shadow_shim, tmp_path, messages.gtube_add_header(FORWARDER, OUTSIDE_SENDER),
                    rcpts=(FORWARDER,), queue_id=queue_id)
    assert printed_action(output) == "add header" == logged_final(shadow_shim, queue_id)
    assert "Symbol: EXIM_POLICY_SHADOW" in output and "Symbol: EXIM_POLICY_FORWARDING" in output
    line = next(line for line in shadow_shim.log_text().splitlines() if queue_id in line)
    assert "would='reject'" in line and "shadow mode, would answer 'reject'" in line
