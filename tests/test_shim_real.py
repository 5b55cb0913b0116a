"""The shim as a real process in front of the real Rspamd 3.4 (session fixture), spoken to
with the exact bytes Exim sends, and with the real ``spamc`` client on the SA side."""
from __future__ import annotations

import shutil
import socket
import subprocess

import pytest

from exim_policy.lab import messages
from exim_policy.lab.shim import ShimLab
from exim_policy.protocol.mbox import exim_mbox_wrap

pytestmark = pytest.mark.real

LOCAL = "bob@lab.test"
FORWARDER = "fwd@lab.test"


def exim_rspamc(message: bytes, *, rcpts=(LOCAL,), sender="alice@example.org",
                user: str | None = None, ip: str = "127.0.0.1") -> bytes:
    """The request Exim 4.96 sends with variant=rspamd (header order fixed, mbox body)."""
    body = exim_mbox_wrap(message, sender=sender, recipients=list(rcpts))
    head = (f"CHECK RSPAMC/1.3\r\nContent-length: {len(body)}\r\nQueue-Id: 1xV0ZC-0003TR-0m\r\n"
            f"From: <{sender}>\r\nRecipient-Number: {len(rcpts)}\r\n"
            + "".join(f"Rcpt: <{r}>\r\n" for r in rcpts)
            + f"Helo: client.test\r\nIP: {ip}\r\n" + (f"User: {user}\r\n" if user else "")
            + "\r\n")
    return head.encode() + body


def exim_sa(message: bytes, *, rcpts=(LOCAL,), name="nobody", sender="alice@example.org") -> bytes:
    """The request Exim sends with the default (SpamAssassin) variant, minus the half-close."""
    body = exim_mbox_wrap(message, sender=sender, recipients=list(rcpts))
    return (f"REPORT SPAMC/1.2\r\nUser: {name}\r\nContent-length: {len(body)}\r\n\r\n"
            .encode() + body)


def ask(port: int, payload: bytes, half_close: bool = False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def action_of(reply: bytes) -> str:
    lines = reply.split(b"\r\n")
    assert lines[0] == b"RSPAMD/1.3 0 EX_OK", reply[:200]
    assert lines[1].startswith(b"Metric: default; "), reply[:200]
    assert lines[2].startswith(b"Action: "), reply[:200]  # Exim needs it on the very next line
    return lines[2][len(b"Action: "):].decode()


@pytest.fixture(scope="module")
def shim(rspamd, tmp_path_factory):
    lab = ShimLab(tmp_path_factory.mktemp("shim"), rspamd_url=rspamd.url,
                  forwarding=[FORWARDER])
    lab.start()
    yield lab
    lab.stop()


def test_ham_no_action(shim):
    assert action_of(ask(shim.port, exim_rspamc(messages.ham(to=LOCAL)))) == "no action"


def test_gtube_reject(shim):
    reply = ask(shim.port, exim_rspamc(messages.gtube(to=LOCAL)))
    assert action_of(reply) == "reject"
    assert b"Metric: default; True; 15.00 / 15.00 / 0.0\r\n" in reply
    assert b"Message: Gtube pattern" in reply


def test_authenticated_gtube_reject_is_outbound(shim):
    reply = ask(shim.port, exim_rspamc(messages.gtube(to="carol@example.com"),
                                       rcpts=("carol@example.com",), user="tester"))
    assert action_of(reply) == "reject"
    assert b"Symbol: EXIM_POLICY_OUTBOUND(0.00)" in reply
    assert b"Reason: outbound spam (authenticated as tester)" in reply


def test_add_header_spam_to_a_forwarder_is_rejected_to_a_local_mailbox_kept(shim):
    to_fwd = ask(shim.port, exim_rspamc(messages.x_test_spam(to=FORWARDER), rcpts=(FORWARDER,)))
    assert action_of(to_fwd) == "reject"
    assert b"Symbol: TEST_SPAM_HEADER(" in to_fwd  # Rspamd's own verdict travels along
    assert b"Symbol: EXIM_POLICY_FORWARDING(0.00)" in to_fwd
    assert b"Reason: spam to a recipient that forwards externally (fwd@lab.test)" in to_fwd
    assert b"Message: Message rejected as spam (the recipient forwards" in to_fwd

    to_local = ask(shim.port, exim_rspamc(messages.x_test_spam(to=LOCAL)))
    assert action_of(to_local) == "add header"
    # ham to the forwarder is not touched
    assert action_of(ask(shim.port, exim_rspamc(messages.ham(to=FORWARDER),
                                                rcpts=(FORWARDER,)))) == "no action"


def test_forwarding_map_reload_without_restart(shim):
    msg = exim_rspamc(messages.x_test_spam(to="new@lab.test"), rcpts=("new@lab.test",))
    assert action_of(ask(shim.port, msg)) == "add header"
    shim.write_forwarding([FORWARDER, "new@lab.test"])
    try:
        assert action_of(ask(shim.port, msg)) == "reject"
    finally:
        shim.write_forwarding([FORWARDER])


def test_exim_sa_variant(shim):
    gtube = ask(shim.port, exim_sa(messages.gtube(to=LOCAL)), half_close=True)
    assert gtube.startswith(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 15.0 / 15.0\r\n\r\n")
    ham = ask(shim.port, exim_sa(messages.ham(to=LOCAL)), half_close=True)
    assert ham.startswith(b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; ")
    # the forwarding rule works from the mbox X-Envelope-To alone
    fwd = ask(shim.port, exim_sa(messages.x_test_spam(to=FORWARDER), rcpts=(FORWARDER,)),
              half_close=True)
    assert fwd.startswith(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; ")


def spamc(port: int, *args: str, message: bytes) -> subprocess.CompletedProcess:
    binary = shutil.which("spamc")
    assert binary, "spamc is missing: apt-get install spamc"
    return subprocess.run([binary, "-d", "127.0.0.1", "-p", str(port), "-u", "nobody", *args],
                          input=message, capture_output=True, timeout=30)


def test_real_spamc_client(shim):
    gtube = spamc(shim.port, "-c", message=messages.gtube(to=LOCAL))
    assert gtube.returncode == 1 and gtube.stdout.startswith(b"15.0/"), gtube
    ham = spamc(shim.port, "-c", message=messages.ham(to=LOCAL))
    # spamc sends no envelope (no IP, no Received): Rspamd adds a few points, still ham
    assert ham.returncode == 0 and ham.stdout.endswith(b"/15.0\n"), ham
    symbols = spamc(shim.port, "-y", message=messages.gtube(to=LOCAL))
    assert b"GTUBE" in symbols.stdout
    report = spamc(shim.port, "-R", message=messages.gtube(to=LOCAL))
    assert b"reject" in report.stdout
    ping = spamc(shim.port, "-K", message=b"")
    assert ping.returncode == 0 and ping.stdout.startswith(b"SPAMD/1.5 0"), ping  # spamc -K prints "SPAMD/1.5 0" on PONG
    processed = spamc(shim.port, message=messages.gtube(to=LOCAL))
    assert b"X-Spam-Flag: YES" in processed.stdout and b"GTUBE" in processed.stdout


@pytest.fixture()
def rspamd_stopped(rspamd):
    rspamd.stop()
    try:
        yield rspamd
    finally:
        rspamd.start()


def test_rspamd_stopped_gives_each_directions_configured_outcome(shim, rspamd_stopped,
                                                                 tmp_path):
    inbound = ask(shim.port, exim_rspamc(messages.gtube(to=LOCAL)))
    outbound = ask(shim.port, exim_rspamc(messages.gtube(to="c@example.com"),
                                          rcpts=("c@example.com",), user="tester"))
    forwarding = ask(shim.port, exim_rspamc(messages.x_test_spam(to=FORWARDER),
                                            rcpts=(FORWARDER,)))
    assert action_of(inbound) == "no action"        # failure.inbound = accept (default)
    assert action_of(outbound) == "soft reject"     # failure.outbound = tempfail (default)
    assert action_of(forwarding) == "soft reject"   # failure.forwarding = tempfail (default)
    assert b"Symbol: EXIM_POLICY_SCANNER_FAILED(0.00)" in outbound
    assert b"cannot reach Rspamd" in outbound

    deferring = ShimLab(tmp_path, rspamd_url=rspamd_stopped.url,
                        failure={"inbound": "defer", "outbound": "accept"})
    deferring.start()
    try:
        assert ask(deferring.port, exim_rspamc(messages.ham(to=LOCAL))) == b""
        accepted = ask(deferring.port, exim_rspamc(messages.gtube(to="c@example.com"),
                                                   rcpts=("c@example.com",), user="tester"))
        assert action_of(accepted) == "no action"
    finally:
        deferring.stop()
    shim.wait_log("scanner unavailable")
