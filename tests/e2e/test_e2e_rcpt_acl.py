"""exim/acl_rcpt.conf in the real Exim 4.96: inbound recipients that forward externally and
local mailboxes are kept in separate SMTP transactions, so spam for a forwarder never
takes the local copies down with it.

Layout: the session's Rspamd and SMTP sink (tests/conftest.py), plus this module's own
shim (its forwarding map has two forwarders, and its policy helper is what Exim's
``${readsocket}`` asks) and its own Exim with EXIM_POLICY_QUERY = that helper:

    smtplib -> Exim (acl_rcpt.conf --readsocket--> shim query port) --spamd--> shim -> Rspamd

The flows use smtplib command by command (MAIL, RCPT, RCPT, DATA) to see each reply.
Also here: the helper down (refused inet port, missing Unix socket) or hung, a real Exim
as the sending MTA, ``${readsocket}`` in ``exim -be``, and the Debian split configuration
with the RCPT snippet.
"""
from __future__ import annotations

import re
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import Stack, build_debian_config, no_bounce_since, running_stack, start_or_fail

from exim_policy.lab import LabUnavailable, RspamdLab, SmtpSink, messages
from exim_policy.lab.addresses import (AUTH, FORWARD_TARGET, FORWARDER, INBOUND_SENDER, LOCAL,
                                       LOCAL2, USER_ADDRESS)
from exim_policy.lab.exim import EximLab, check_prerequisites, ipv6_loopback_available
from exim_policy.lab.ports import LOOPBACK
from exim_policy.lab.shim import ShimLab
from exim_policy.lab.smtp import in_mailbox, in_sink, wait_mailbox, wait_sink

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parents[2]
EXIM_DIR = REPO / "exim"
FORWARDER2 = "fwd2@lab.test"
FORWARD_TARGET2 = "ext-fwd2@example.net"
ALIASES = {"fwd": FORWARD_TARGET, "fwd2": FORWARD_TARGET2}
#: addresses of the Debian test (a system user on localhost); the helper calls it a forwarder
DEBIAN_FORWARDER = "mail@localhost"
DEBIAN_MAILBOX = "daemon@localhost"
SPLIT_TEXT = "4.5.3 Different spam policy, please send this recipient separately"


# ------------------------------------------------------------------------ fixtures --
def _fresh_dir(parent: Path, name: str) -> Path:
    """A world-searchable directory (Exim re-executes as Debian-exim and must reach it)."""
    path = parent / name
    path.mkdir(exist_ok=True)
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def split_shim(e2e_dir: Path, rspamd: RspamdLab) -> Iterator[ShimLab]:
    lab = ShimLab(_fresh_dir(e2e_dir, "rcpt-acl"), rspamd_url=rspamd.url,
                  forwarding=(FORWARDER, FORWARDER2, DEBIAN_FORWARDER),
                  relay_networks=("::1/128",))
    start_or_fail(lab, "the shim")
    yield lab
    lab.stop()


def _start_exim(workdir: Path, shim: ShimLab, sink: SmtpSink, query_address: str, *,
                ipv6: bool = False) -> EximLab:
    lab = EximLab(workdir, spamd_address=shim.spamd_address, sink_port=sink.port,
                  relay_hosts="<; ::1", aliases=ALIASES, ipv6=ipv6,
                  query_address=query_address)
    start_or_fail(lab, "the lab's Exim")
    return lab


@pytest.fixture(scope="module")
def split_exim(e2e_dir: Path, split_shim: ShimLab, sink: SmtpSink) -> Iterator[EximLab]:
    if not ipv6_loopback_available():
        pytest.fail("these tests use ::1 as the relay host: this machine has no IPv6 "
                    "loopback", pytrace=False)
    lab = _start_exim(_fresh_dir(e2e_dir, "rcpt-acl"), split_shim, sink,
                      split_shim.query_address, ipv6=True)
    yield lab
    lab.stop()


@pytest.fixture
def split(split_exim: EximLab, split_shim: ShimLab, rspamd_running: RspamdLab,
          smtp_sink: SmtpSink) -> Stack:
    return running_stack(split_exim, split_shim, rspamd_running, smtp_sink)


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it) but not
    listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        yield sock.getsockname()[1]


# ------------------------------------------------------------------------- helpers --
def _reply(code: int, text: bytes | str) -> tuple[int, str]:
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return code, " ".join(text.split())


class Session:
    """One SMTP connection, command by command, every reply kept as (code, one-line text)."""

    def __init__(self, exim: EximLab, host: str = LOOPBACK) -> None:
        """``host`` is also the client's source address ("::1": a relay host)."""
        self.smtp = smtplib.SMTP(host, exim.port, local_hostname="client.test", timeout=60)
        self.smtp.ehlo("client.test")

    def mail(self, sender: str = INBOUND_SENDER) -> tuple[int, str]:
        return _reply(*self.smtp.mail(sender))

    def rcpt(self, address: str) -> tuple[int, str]:
        return _reply(*self.smtp.rcpt(address))

    def data(self, message: bytes) -> tuple[int, str]:
        return _reply(*self.smtp.data(message))

    def close(self) -> None:
        try:
            self.smtp.quit()
        except smtplib.SMTPException:
            self.smtp.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _queue_id(reply: tuple[int, str]) -> str:
    found = re.search(r"\bid=(\S+)", reply[1])
    assert reply[0] == 250 and found, reply
    return found.group(1)


def _split_reply(reply: tuple[int, str]) -> None:
    assert reply == (451, SPLIT_TEXT), reply


# --------------------------------------------------------------- the split flows --
def test_spam_to_a_mailbox_and_a_forwarder_is_split_and_only_the_mailbox_gets_it(split):
    """Mailbox first: its RCPT and DATA are accepted, the forwarder is deferred; the
    forwarder's own transaction (here on the same connection: acl_m_* state starts afresh
    with MAIL) is refused at DATA. Nothing is forwarded, nothing bounces."""
    log_offset = len(split.exim.mainlog)
    mid = messages.new_message_id()
    spam = messages.x_test_spam(to=f"{LOCAL}, {FORWARDER}", message_id=mid)
    with Session(split.exim) as smtp:
        assert smtp.mail()[0] == 250
        assert smtp.rcpt(LOCAL)[0] == 250
        _split_reply(smtp.rcpt(FORWARDER))
        accepted = smtp.data(spam)
        queue_id = _queue_id(accepted)
        # the retry of the deferred recipient, alone
        assert smtp.mail()[0] == 250
        assert smtp.rcpt(FORWARDER)[0] == 250
        refused = smtp.data(spam)
    assert refused[0] == 550 and "forwards externally" in refused[1], refused
    delivered = wait_mailbox(split.exim, "bob", mid)
    assert delivered["X-Spam-Flag"] == "YES"
    assert delivered["X-Spam-Action"] == "add header"
    assert delivered["Envelope-to"] == LOCAL
    lines = split.exim.wait_completed(queue_id)
    assert not any(" => " in line and FORWARD_TARGET in line for line in lines), lines
    assert in_sink(split.sink, mid) == [], "spam was forwarded"
    assert no_bounce_since(split.exim, log_offset)
    assert split.exim.queue_count() == 0
    log = split.exim.mainlog[log_offset:]
    assert f"temporarily rejected RCPT <{FORWARDER}>: exim-policy: forwarding class yes " \
           "differs from the transaction's (no); split" in log


def test_forwarder_first_then_mailbox_is_split_the_other_way(split):
    log_offset = len(split.exim.mainlog)
    mid = messages.new_message_id()
    spam = messages.x_test_spam(to=f"{FORWARDER}, {LOCAL}", message_id=mid)
    with Session(split.exim) as smtp:
        assert smtp.mail()[0] == 250
        assert smtp.rcpt(FORWARDER)[0] == 250
        _split_reply(smtp.rcpt(LOCAL))
        refused = smtp.data(spam)
    assert refused[0] == 550 and "forwards externally" in refused[1], refused
    # the mailbox's own transaction, on a new connection (a client's later retry)
    with Session(split.exim) as smtp:
        assert smtp.mail()[0] == 250
        assert smtp.rcpt(LOCAL)[0] == 250
        queue_id = _queue_id(smtp.data(spam))
    delivered = wait_mailbox(split.exim, "bob", mid)
    assert delivered["X-Spam-Flag"] == "YES"
    split.exim.wait_completed(queue_id)
    assert in_sink(split.sink, mid) == []
    assert no_bounce_since(split.exim, log_offset)
    assert f"temporarily rejected RCPT <{LOCAL}>" in split.exim.mainlog[log_offset:]


def test_ham_to_a_mailbox_and_a_forwarder_reaches_both_in_two_transactions(split):
    mid = messages.new_message_id()
    ham = messages.ham(to=f"{LOCAL}, {FORWARDER}", message_id=mid)
    with Session(split.exim) as smtp:
        assert smtp.mail()[0] == 250
        assert smtp.rcpt(LOCAL)[0] == 250
        _split_reply(smtp.rcpt(FORWARDER))
        first = _queue_id(smtp.data(ham))
        assert smtp.mail()[0] == 250
        assert smtp.rcpt(FORWARDER)[0] == 250
        second = _queue_id(smtp.data(ham))
    delivered = wait_mailbox(split.exim, "bob", mid)
    assert delivered["X-Spam-Action"] == "no action"
    forwarded = wait_sink(split.sink, mid)
    assert forwarded.rcpt_tos == (FORWARD_TARGET,)
    split.exim.wait_completed(first)
    split.exim.wait_completed(second)
    assert len(in_mailbox(split.exim, "bob", mid)) == 1
    assert len(in_sink(split.sink, mid)) == 1


def test_two_mailboxes_in_one_transaction_are_not_split(split):
    log_offset = len(split.exim.mainlog)
    mid = messages.new_message_id()
    with Session(split.exim) as smtp:
        assert smtp.mail()[0] == 250
        assert smtp.rcpt(LOCAL)[0] == 250
        assert smtp.rcpt(LOCAL2)[0] == 250
        queue_id = _queue_id(smtp.data(messages.x_test_spam(to=LOCAL, message_id=mid)))
    assert wait_mailbox(split.exim, "bob", mid)["X-Spam-Flag"] == "YES"
    assert wait_mailbox(split.exim, "carol", mid)["X-Spam-Flag"] == "YES"
    split.exim.wait_completed(queue_id)
    assert "exim-policy: forwarding" not in split.exim.mainlog[log_offset:]  # helper answered


def test_two_forwarders_in_one_transaction_are_not_split(split):
    """Same class, one transaction: the spam is refused for both at DATA; the ham is
    forwarded to both targets."""
    log_offset = len(split.exim.mainlog)
    spam_mid, ham_mid = messages.new_message_id(), messages.new_message_id()
    with Session(split.exim) as smtp:
        assert smtp.mail()[0] == 250
        assert smtp.rcpt(FORWARDER)[0] == 250
        assert smtp.rcpt(FORWARDER2)[0] == 250
        refused = smtp.data(messages.x_test_spam(to=FORWARDER, message_id=spam_mid))
        assert refused[0] == 550, refused
        assert smtp.mail()[0] == 250
        assert smtp.rcpt(FORWARDER)[0] == 250
        assert smtp.rcpt(FORWARDER2)[0] == 250
        queue_id = _queue_id(smtp.data(messages.ham(to=FORWARDER, message_id=ham_mid)))
    split.exim.wait_completed(queue_id)
    targets = sorted(rcpt for m in in_sink(split.sink, ham_mid) for rcpt in m.rcpt_tos)
    assert targets == sorted([FORWARD_TARGET, FORWARD_TARGET2])
    assert in_sink(split.sink, spam_mid) == []
    assert "exim-policy: forwarding" not in split.exim.mainlog[log_offset:]  # helper answered


@pytest.mark.parametrize("how", ["authenticated", "relay host"])
def test_outbound_mail_is_never_split(split, how):
    """Authenticated, or from a relay host (::1 is in EXIM_POLICY_RELAY_HOSTS): the helper
    is not asked and nothing is deferred."""
    log_offset = len(split.exim.mainlog)
    mid = messages.new_message_id()
    host = "::1" if how == "relay host" else LOOPBACK
    with Session(split.exim, host=host) as smtp:
        if how == "authenticated":
            smtp.smtp.login(*AUTH)
        assert smtp.mail(USER_ADDRESS)[0] == 250
        assert smtp.rcpt(LOCAL)[0] == 250
        assert smtp.rcpt(FORWARDER)[0] == 250
        queue_id = _queue_id(smtp.data(messages.ham(to=LOCAL, from_addr=USER_ADDRESS,
                                                    message_id=mid)))
    wait_mailbox(split.exim, "bob", mid)
    assert wait_sink(split.sink, mid).rcpt_tos == (FORWARD_TARGET,)
    split.exim.wait_completed(queue_id)
    assert "exim-policy: forwarding" not in split.exim.mainlog[log_offset:]


def test_an_unknown_recipient_gets_the_sites_550_not_a_451(split):
    """The defer statement verifies the recipient last: a typo is refused at once."""
    with Session(split.exim) as smtp:
        assert smtp.mail()[0] == 250
        assert smtp.rcpt(FORWARDER)[0] == 250
        assert smtp.rcpt("nosuchuser@lab.test")[0] == 550


# ---------------------------------------------------------------- helper failures --
@pytest.fixture(params=["inet", "unix"])
def helper_down(request, e2e_dir: Path, split_shim: ShimLab, rspamd_running: RspamdLab,
                smtp_sink: SmtpSink, refused_port: int) -> Iterator[tuple[EximLab, str]]:
    """An Exim whose helper is unreachable: EXIM_POLICY_QUERY is a loopback port that
    refuses connections, or a Unix socket path where nothing listens. Yields the lab and
    the spec."""
    workdir = Path(tempfile.mkdtemp(prefix=f"helper-down-{request.param}-", dir=e2e_dir))
    workdir.chmod(0o755)
    if not split_shim.alive():
        split_shim.start()
    spec = f"inet:{LOOPBACK}:{refused_port}" if request.param == "inet" \
        else str(workdir / "no-helper.sock")
    lab = _start_exim(workdir, split_shim, smtp_sink, spec)
    yield lab, spec
    lab.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def test_helper_down_means_no_split_and_mail_still_flows(helper_down, sink):
    """Documented: an unreachable helper never defers; the transaction is not split and
    the DATA verdict is for all recipients, as without acl_rcpt.conf; the helper is asked
    once per connection only.
    The Unix case also checks the workaround for an Exim 4.96 bug (a failed connect leaves
    a stale descriptor cached): without it the second transaction's RCPTs got "421
    Unexpected failure", or the receiving process lost its main log lines."""
    exim, spec = helper_down
    log_offset = len(exim.mainlog)
    spam_mid, ham_mid = messages.new_message_id(), messages.new_message_id()
    with Session(exim) as smtp:
        assert smtp.mail()[0] == 250
        assert smtp.rcpt(LOCAL)[0] == 250
        assert smtp.rcpt(FORWARDER)[0] == 250
        refused = smtp.data(messages.x_test_spam(to=LOCAL, message_id=spam_mid))
        assert refused[0] == 550, refused  # spam that would be forwarded: 550 for all
        assert smtp.mail()[0] == 250
        for rcpt in (LOCAL, FORWARDER, LOCAL2, FORWARDER2):
            assert smtp.rcpt(rcpt)[0] == 250, rcpt
        queue_id = _queue_id(smtp.data(messages.ham(to=LOCAL, message_id=ham_mid)))
    wait_mailbox(exim, "bob", ham_mid)
    wait_mailbox(exim, "carol", ham_mid)
    exim.wait_completed(queue_id)
    targets = sorted(rcpt for m in in_sink(sink, ham_mid) for rcpt in m.rcpt_tos)
    assert targets == sorted([FORWARD_TARGET, FORWARD_TARGET2])
    assert in_mailbox(exim, "bob", spam_mid) == []
    log = exim.mainlog[log_offset:]
    failures = re.findall(r"exim-policy: forwarding query for .*", log)
    assert failures == [f'exim-policy: forwarding query for {LOCAL} failed ("unreachable" '
                        f"from {spec}); not splitting"], failures
    # the receiving process still writes its main log after the failure
    assert "rejected after DATA: 550 " in log
    assert f'reason="spam to a recipient that forwards externally ({FORWARDER})' in log, log
    assert re.search(rf"{queue_id} <= {re.escape(INBOUND_SENDER)} .* for {re.escape(LOCAL)} ",
                     log), log


def _bh(exim: EximLab, rcpts: list[str], *defines: str) -> list[str]:
    """RCPT replies of an ``exim -bh 127.0.0.1`` session (no daemon, no DATA); ``defines``
    are -D macro overrides."""
    session = "EHLO client.test\r\nMAIL FROM:<alice@example.org>\r\n" + "".join(
        f"RCPT TO:<{rcpt}>\r\n" for rcpt in rcpts) + "QUIT\r\n"
    result = exim.exim(*(f"-D{d}" for d in defines), "-bh", LOOPBACK, input=session,
                       timeout=60)
    replies = [line for line in result.stdout.splitlines() if re.match(r"^\d{3} ", line)]
    # 220, EHLO's last line, MAIL, then one per RCPT, 221
    assert len(replies) == len(rcpts) + 4, result.stdout + result.stderr[-3000:]
    return replies[3:-1]


def test_a_hung_helper_costs_one_3s_timeout_per_connection_and_splits_nothing(split_exim):
    """A helper that takes the connection but never answers: ${readsocket} gives up after
    3 s and yields its fail string; the recipients are accepted (not split), and the
    helper is not asked again in this connection (three recipients, one timeout)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as hung:
        hung.bind((LOOPBACK, 0))
        hung.listen(8)  # the kernel completes the connect; nobody ever reads or answers
        spec = f"inet:{LOOPBACK}:{hung.getsockname()[1]}"
        started = time.monotonic()
        replies = _bh(split_exim, [LOCAL, FORWARDER, LOCAL2], f"EXIM_POLICY_QUERY={spec}")
        took = time.monotonic() - started
    assert all(reply.startswith("250 ") for reply in replies), replies
    assert 2.5 < took < 7.5, f"{took:.1f}s (one 3 s timeout expected, not three)"


#: a sending MTA: every address goes by SMTP to CLIENT_TARGET_PORT on 127.0.0.1 (the lab's
#: SITE_* macros give it its own spool and log)
CLIENT_TEMPLATE = """
primary_hostname = client.test
qualify_domain = example.org
spool_directory = SITE_SPOOL
log_file_path = SITE_LOG_PATH
pid_file_path = SITE_PID
keep_environment =
host_lookup =
host_lookup_order =
rfc1413_hosts =
rfc1413_query_timeout = 0s
begin routers
to_server:
  driver = manualroute
  route_list = * 127.0.0.1
  self = send
  transport = to_server
begin transports
to_server:
  driver = smtp
  port = CLIENT_TARGET_PORT
  allow_localhost
  hosts_avoid_tls = *
begin retry
*   *   F,1h,15m
"""


def test_a_real_exim_client_sends_the_deferred_recipient_in_its_own_transaction(
        split, e2e_dir):
    """Exim 4.96 as the sending MTA (not smtplib): it delivers the accepted recipient,
    keeps the deferred one in its queue, and a queue run sends it in a transaction of its
    own, which the forwarding then delivers."""
    workdir = Path(tempfile.mkdtemp(prefix="client-", dir=e2e_dir))
    workdir.chmod(0o755)
    client = EximLab(workdir, spamd_address="unused", sink_port=split.sink.port, ipv6=False,
                     template=CLIENT_TEMPLATE,
                     extra_macros={"CLIENT_TARGET_PORT": str(split.exim.port)})
    try:
        client.prepare()
        mid = messages.new_message_id()
        submitted = client.exim("-odf", "-f", INBOUND_SENDER, LOCAL, FORWARDER,
                                input=messages.ham(to=f"{LOCAL}, {FORWARDER}", message_id=mid,
                                                   eol="\n").decode())
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        client.wait_log(rf"=> {re.escape(LOCAL)} R=to_server")
        client.wait_log(rf"== {re.escape(FORWARDER)} R=to_server .*451 {re.escape(SPLIT_TEXT)}")
        wait_mailbox(split.exim, "bob", mid)
        assert client.queue_count() == 1
        assert in_sink(split.sink, mid) == []

        client.flush_queue()  # the client's next queue run (-qf: retry times ignored)
        client.wait_log(rf"=> {re.escape(FORWARDER)} R=to_server")
        forwarded = wait_sink(split.sink, mid)
        assert forwarded.rcpt_tos == (FORWARD_TARGET,)
        assert client.queue_count() == 0
        received = re.findall(rf"<= {re.escape(INBOUND_SENDER)} .* for (.+)$",
                              split.exim.mainlog, re.M)
        assert LOCAL in received and FORWARDER in received, received  # two transactions
    finally:
        client.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# ----------------------------------------------------- ${readsocket} inside Exim --
def test_readsocket_asks_the_running_helper_from_inside_exim(split_exim, split_shim):
    """``exim -be`` with the lab's configuration: EXIM_POLICY_QUERY is substituted as in the
    ACL, and the helper answers over the real socket."""
    if not split_shim.alive():
        split_shim.start()

    def ask(address: str) -> str:
        expr = ("[${readsocket{EXIM_POLICY_QUERY}{forwarding " + address
                + "\n}{3s}{}{error}}]")
        result = split_exim.exim("-be", expr)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout.strip()

    # the answer carries no newline: the expansion is exactly yes / no
    assert ask(FORWARDER) == "[yes]"
    assert ask("FWD@Lab.Test") == "[yes]"
    assert ask(LOCAL) == "[no]"
    assert ask("nobody-at-all@example.com") == "[no]"
    assert ask("not-an-address") == "[error usage: forwarding LOCALPART@DOMAIN]"


# ------------------------------------------------------------------ Debian split --
def test_debian_split_config_with_the_rcpt_snippet_splits(split_shim):
    """update-exim4.conf with the Debian snippets, CHECK_RCPT_LOCAL_ACL_FILE pointed at
    exim-policy_check_rcpt.conf as exim/debian/README.md says: the hook's place in Debian's
    acl_check_rcpt (after the relay accepts and verify = recipient) splits as well."""
    try:
        check_prerequisites()
    except LabUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    if not split_shim.alive():
        split_shim.start()
    base = Path(tempfile.mkdtemp(prefix="exim-policy-rcpt-deb-"))
    try:
        base.chmod(0o755)
        # 127.0.0.1 must be an ordinary inbound client here: Debian's relay_from_hosts
        # (MAIN_RELAY_NETS) would accept it before the hook; ::1 stays a relay host.
        output = build_debian_config(
            base, EXIM_DIR,
            f"EXIM_POLICY_QUERY = {split_shim.query_address}\n"
            "MAIN_RELAY_NETS = <; ::1\n"
            "EXIM_POLICY_RELAY_HOSTS = +relay_from_hosts\n", rcpt_hook=True)
        session = ("EHLO client.test\r\nMAIL FROM:<alice@example.org>\r\n"
                   f"RCPT TO:<{DEBIAN_MAILBOX}>\r\nRCPT TO:<{DEBIAN_FORWARDER}>\r\n"
                   "RCPT TO:<nobody@localhost>\r\nQUIT\r\n")
        result = subprocess.run(["exim", "-C", str(output), "-bh", LOOPBACK], input=session,
                                capture_output=True, text=True, timeout=60)
        replies = [line for line in result.stdout.splitlines() if re.match(r"^\d{3} ", line)]
        assert replies[3:6] == ["250 Accepted", f"451 {SPLIT_TEXT}", "250 Accepted"], \
            result.stdout + result.stderr[-3000:]
    finally:
        shutil.rmtree(base, ignore_errors=True)
