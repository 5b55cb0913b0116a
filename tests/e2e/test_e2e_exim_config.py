"""The bundled Exim configuration in the real Exim 4.96, against a canned-reply server
instead of the shim (fast, and able to produce every kind of answer on demand):

- exim/exim.conf passes ``exim -bV`` with its own defaults;
- the Debian snippets equal the canonical files and build a valid Debian split config
  (update-exim4.conf) that scans, refuses and quarantines;
- the DATA ACL's handling of each answer: soft reject, no answer at all, the reason line,
  unscanned large messages (no stale verdict), the quarantine address as a recipient.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from canned_spamd import CannedRequest, CannedSpamd, rspamc_reply
from e2e_helpers import build_debian_config

from exim_policy.lab import LabError, LabUnavailable
from exim_policy.lab.addresses import AUTH, EXTERNAL, LOCAL, USER_ADDRESS
from exim_policy.lab.exim import QUARANTINE, EximLab, check_prerequisites, find_exim_dir
from exim_policy.lab.smtp import send, wait_mailbox

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parents[2]
EXIM_DIR = REPO / "exim"


def _exim_available() -> None:
    try:
        check_prerequisites()
    except LabUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def private_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="exim-policy-conf-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _copy_exim_dir(target: Path) -> Path:
    """exim/ copied with mode 644: Exim refuses a group/world-writable -C file, and a
    checkout made under umask 002 would be one."""
    dest = target / "exim"
    dest.mkdir()
    for conf in EXIM_DIR.glob("*.conf"):
        shutil.copyfile(conf, dest / conf.name)
        (dest / conf.name).chmod(0o644)
    return dest


# ------------------------------------------------------------------ defaults, -bV --
def test_exim_conf_passes_bV_with_its_defaults(private_dir):
    _exim_available()
    conf = _copy_exim_dir(private_dir) / "exim.conf"
    result = subprocess.run(["exim", "-C", str(conf), "-bV"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Configuration file is {conf}" in result.stdout

    def option(name: str) -> str:
        out = subprocess.run(["exim", "-C", str(conf), "-bP", name], capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert option("spamd_address") == "spamd_address = 127.0.0.1 11335 variant=rspamd tmo=30s"
    assert option("acl_smtp_data") == "acl_smtp_data = acl_check_data"
    routers = option("router_list").split()  # -bP router_list: one name per line
    assert routers[:2] == ["exim_policy_quarantine_receiver", "exim_policy_quarantine"], routers


def test_lab_finds_the_repository_exim_dir():
    assert find_exim_dir() == EXIM_DIR


# ---------------------------------------------------------------- Debian snippets --
def test_debian_snippets_equal_the_canonical_files():
    result = subprocess.run([sys.executable, str(EXIM_DIR / "debian" / "regenerate.py"),
                             "--check"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, ("run python3 exim/debian/regenerate.py: "
                                    + result.stdout + result.stderr)


def _responder(request: CannedRequest) -> bytes | None:
    body = request.body
    if b"XJS*C4JDBQADN1" in body:  # GTUBE, as Rspamd would answer it
        return rspamc_reply("reject", 15.0, lines=("Symbol: GTUBE(0.00)",
                                                   "Message: Gtube pattern",
                                                   "Message-ID: t@example.org"))
    if b"CANNED-SOFT-REJECT" in body:
        return rspamc_reply("soft reject", 0.0, lines=("Message: scanner is busy, retry",))
    if b"CANNED-NO-ANSWER" in body:
        return None  # close without a reply: Exim's spam condition DEFERs
    if b"CANNED-TWO-MESSAGES" in body:
        return rspamc_reply("reject", 9.0, lines=("Symbol: X(9.00)", "Message: first reason",
                                                  "Message: second reason"))
    return rspamc_reply("no action", 0.0, lines=("Symbol: ARC_NA(0.00)",))


@pytest.fixture
def canned() -> Iterator[CannedSpamd]:
    server = CannedSpamd(_responder).start()
    yield server
    server.stop()


SESSION = ("EHLO client.test\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<{rcpt}>\r\n"
           "DATA\r\nFrom: alice@example.org\r\nTo: {rcpt}\r\nSubject: t\r\n\r\n{body}\r\n.\r\n"
           "QUIT\r\n")
GTUBE_LINE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def _bh(conf: Path, ip: str, rcpt: str, body: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["exim", "-C", str(conf), "-bh", ip],
                          input=SESSION.format(rcpt=rcpt, body=body),
                          capture_output=True, text=True, timeout=60)


def test_debian_split_config_with_the_snippets_scans_and_quarantines(private_dir, canned):
    """update-exim4.conf builds /etc/exim4's split config plus the snippets; the result
    passes -bV, runs the quarantine routers first, has the receiver's transport and
    handles the verdicts."""
    _exim_available()
    # the test's own site macros: the shim address, a relay host
    output = build_debian_config(
        private_dir, EXIM_DIR,
        f"EXIM_POLICY_SPAMD = {canned.spamd_address}\n"
        "EXIM_POLICY_RELAY_HOSTS = <; ::1\n")
    checked = subprocess.run(["exim", "-C", str(output), "-bV"], capture_output=True,
                             text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    routers = subprocess.run(["exim", "-C", str(output), "-bP", "router_list"],
                             capture_output=True, text=True, timeout=30).stdout
    assert routers.split()[:2] == ["exim_policy_quarantine_receiver",
                                   "exim_policy_quarantine"], routers
    transports = subprocess.run(["exim", "-C", str(output), "-bP", "transport_list"],
                                capture_output=True, text=True, timeout=30).stdout
    assert "exim_policy_quarantine_smtp" in transports.split(), transports

    inbound = _bh(output, "127.0.0.1", "postmaster@localhost", GTUBE_LINE)
    assert "550 5.7.1 Gtube pattern" in inbound.stdout, inbound.stdout + inbound.stderr
    outbound = _bh(output, "::1", EXTERNAL, GTUBE_LINE)
    assert re.search(r"^250 OK id=", outbound.stdout, re.M), outbound.stdout + outbound.stderr
    # (-bh writes the address in full: 0000:...:0001)
    assert re.search(r"exim-policy: outbound spam from [0:]+1 quarantined", outbound.stderr), \
        outbound.stderr
    ham = _bh(output, "127.0.0.1", "postmaster@localhost", "just a note")
    assert re.search(r"^250 OK id=", ham.stdout, re.M), ham.stdout + ham.stderr
    assert len(canned.requests) == 3, "every message was scanned through spamd_address"


# ------------------------------------------------------- DATA ACL, canned answers --
@pytest.fixture
def canned_exim(private_dir, canned, sink) -> Iterator[EximLab]:
    _exim_available()
    lab = EximLab(private_dir, spamd_address=canned.spamd_address, sink_port=sink.port,
                  extra_macros={"EXIM_POLICY_MAX_SCAN_SIZE": "8K"}, ipv6=False)
    try:
        lab.start()
    except LabError as exc:
        lab.stop()
        pytest.fail(str(exc), pytrace=False)
    yield lab
    lab.stop()


def _message(token: str, *, to: str = LOCAL, size: int = 0) -> bytes:
    filler = ("x" * 70 + "\r\n") * (size // 72)
    return (f"From: alice@example.org\r\nTo: {to}\r\nSubject: canned {token}\r\n"
            f"Message-ID: <{token}@example.org>\r\n\r\n{token}\r\n{filler}").encode()


def test_soft_reject_is_a_451_with_the_reason(canned_exim):
    outcome = send(canned_exim, _message("CANNED-SOFT-REJECT"), [LOCAL])
    assert outcome.code == 451, outcome
    assert outcome.text == "4.7.1 scanner is busy, retry"


def test_no_answer_from_the_scanner_is_a_451(canned_exim, canned):
    outcome = send(canned_exim, _message("CANNED-NO-ANSWER"), [LOCAL])
    assert outcome.code == 451, outcome
    assert len(canned.requests) == 1
    assert "cannot parse spamd" in canned_exim.mainlog


def test_the_first_message_line_is_the_reason(canned_exim):
    outcome = send(canned_exim, _message("CANNED-TWO-MESSAGES"), [LOCAL])
    assert (outcome.code, outcome.text) == (550, "5.7.1 first reason"), outcome


def test_large_messages_are_not_scanned_and_inherit_no_verdict(canned_exim, canned):
    """Exim's $spam_action survives from one message to the next in the same SMTP
    session; a large (unscanned) message after a rejected one must not be refused."""
    import smtplib
    with smtplib.SMTP("127.0.0.1", canned_exim.port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("alice@example.org")
        smtp.rcpt(LOCAL)
        code, _ = smtp.data(_message("CANNED-TWO-MESSAGES"))  # (code, text) after DATA
        assert code == 550
        smtp.mail("alice@example.org")
        smtp.rcpt(LOCAL)
        code, _ = smtp.data(_message("CANNED-BIG", size=20_000))
        assert code == 250
    delivered = wait_mailbox(canned_exim, "bob", "CANNED-BIG@example.org")
    assert delivered["X-Spam-Action"] is None  # not scanned, so no verdict headers
    assert len(canned.requests) == 1           # only the small message went to the scanner


def test_outbound_spam_to_the_quarantine_address_itself_does_not_loop(canned_exim):
    body = _message("loop", to=QUARANTINE).replace(b"loop\r\n", f"{GTUBE_LINE}\r\n".encode())
    outcome = send(canned_exim, body, [QUARANTINE, EXTERNAL], sender=USER_ADDRESS, auth=AUTH)
    assert outcome.accepted, outcome
    lines = canned_exim.wait_completed(outcome.queue_id)
    assert len(canned_exim.maildir_files("quarantine")) == 1, lines
    assert not any("loop" in line.lower() and "routing" in line.lower() for line in lines)


def test_bh_runs_the_acl_with_the_scan(canned_exim, canned):
    result = canned_exim.bh(SESSION.format(rcpt=LOCAL, body=GTUBE_LINE))
    assert "550 5.7.1 Gtube pattern" in result.replies(), result.stdout + result.stderr
    assert len(canned.requests) == 1


def test_relay_failure_keeps_the_message_queued_until_a_flush(private_dir, canned):
    """Accepted mail is never lost: with the next hop down it waits in the queue, and a
    queue run delivers it once the next hop is back."""
    from exim_policy.lab import SmtpSink
    from exim_policy.lab.ports import free_port

    _exim_available()
    port = free_port()  # nothing listens there yet
    lab = EximLab(private_dir, spamd_address=canned.spamd_address, sink_port=port, ipv6=False)
    later_sink = SmtpSink(private_dir / "sink", port=port)
    try:
        lab.start()
        outcome = send(lab, _message("queued", to=EXTERNAL), [EXTERNAL], sender=USER_ADDRESS,
                       auth=AUTH)
        assert outcome.accepted, outcome
        lab.wait_log(rf"{outcome.queue_id} == {EXTERNAL} .*defer")
        assert lab.queue_count() == 1
        later_sink.start()
        lab.flush_queue()
        assert later_sink.wait_for(1, timeout=15)[0].rcpt_tos == (EXTERNAL,)
        lab.wait_completed(outcome.queue_id)
        assert lab.queue_count() == 0
    finally:
        later_sink.stop()
        lab.stop()
