"""Accounts through the whole chain: smtplib -> Exim 4.96 (exim/exim.conf with
acl_mail.conf and the authenticators' lock check) -> shim ([accounts] on Redis) -> Rspamd,
deliveries to Maildirs and the SMTP sink, notices to the abuse mailbox through Exim itself.

Each test runs its own shim (its own configuration and Redis key prefix) and its own Exim
pointed at it, so that limits and incidents of one scenario do not touch another.
"""
from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import pytest
from e2e_helpers import start_or_fail

from exim_policy.lab import SmtpSink, messages
from exim_policy.lab.addresses import EXTERNAL, USER_ADDRESS
from exim_policy.lab.exim import DEFAULT_USERS, EximLab, free_port_v4_v6
from exim_policy.lab.shim import ShimLab
from exim_policy.lab.smtp import send, wait_mailbox, wait_sink

pytestmark = pytest.mark.real

ABUSE = "abuse@lab.test"
TESTER = ("tester", "testpass")
MALLORY = ("mallory", "malpass")
MALLORY_ADDRESS = "mallory@lab.test"


def accounts_toml(redis_url: str, notify_port: int, *, mode: str = "enforce",
                  limits: str = "", incident: str = "") -> str:
    return (f'\n[accounts]\nenabled = true\nstore = "redis"\nredis_url = "{redis_url}"\n'
            f'redis_prefix = "e2e-{uuid.uuid4().hex[:8]}:"\nmode = "{mode}"\n{limits}'
            f'[accounts.incident]\n{incident or "spam_verdicts = 5"}\n'
            f'[accounts.notify]\nmail_to = ["{ABUSE}"]\nmail_from = "exim-policy@lab.test"\n'
            f'smtp = "127.0.0.1:{notify_port}"\n')


@dataclass
class Chain:
    exim: EximLab
    shim: ShimLab
    sink: SmtpSink


@pytest.fixture
def chain(e2e_dir, rspamd_running, redis_server, sink):
    """``chain(**accounts_toml kwargs)`` -> Chain: Exim and the shim started (stopped
    afterwards), the session's sink cleared."""
    started = []
    base = e2e_dir / f"accounts-{uuid.uuid4().hex[:8]}"  # traversable by Debian-exim
    base.mkdir()
    base.chmod(0o755)

    def make(**kwargs):
        if not redis_server.alive():
            redis_server.start()
        port = free_port_v4_v6()
        workdir = base / f"chain{len(started)}"
        workdir.mkdir()
        workdir.chmod(0o755)
        shim = ShimLab(workdir, rspamd_url=rspamd_running.url,
                       extra_toml=accounts_toml(redis_server.url, port, **kwargs))
        started.append(start_or_fail(shim, "the shim"))
        exim = EximLab(workdir, spamd_address=shim.spamd_address, sink_port=sink.port,
                       query_address=shim.query_address,
                       local_users=(*DEFAULT_USERS, "abuse"),
                       auth_users=dict([TESTER, MALLORY]))
        exim.port = port
        started.append(start_or_fail(exim, "the lab's Exim"))
        sink.clear()
        return Chain(exim, shim, sink)

    yield make
    for lab in reversed(started):
        lab.stop()


def accounts_cli(shim: ShimLab, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exim_policy", "accounts", *argv, "--config",
                           str(shim.config_path)], capture_output=True, text=True, timeout=60)


def gtube(exim, sender=USER_ADDRESS, auth=TESTER, rcpts=(EXTERNAL,)):
    return send(exim, messages.gtube(to=rcpts[0], from_addr=sender), list(rcpts),
                sender=sender, auth=auth)


def ham(exim, sender=USER_ADDRESS, auth=TESTER, rcpts=(EXTERNAL,), mid=None):
    mid = mid or messages.new_message_id()
    return mid, send(exim, messages.ham(to=rcpts[0], from_addr=sender, message_id=mid),
                     list(rcpts), sender=sender, auth=auth)


def notices(exim) -> list:
    return exim.maildir_messages("abuse")


def subject(notice) -> str:
    """The Subject unfolded (a long one is folded; the parser may keep a leading space)."""
    return " ".join(str(notice["Subject"]).split())


def wait_notices(exim, count: int, timeout: float = 20.0) -> list:
    deadline = time.monotonic() + timeout
    while len(notices(exim)) < count:
        assert time.monotonic() < deadline, \
            f"{len(notices(exim))} notice(s) in the abuse mailbox, expected {count}"
        time.sleep(0.1)
    return notices(exim)


def test_spam_opens_an_incident_holds_then_locks_and_a_human_unlocks(chain):
    c = chain(incident='spam_verdicts = 5\non_open = "hold"\nlock_after = 2')
    exim, shim = c.exim, c.shim
    for _ in range(5):
        outcome = gtube(exim)
        assert outcome.accepted, outcome  # quarantined, as any outbound spam
    [notice] = wait_notices(exim, 1)
    assert subject(notice) == "[exim-policy] incident 1 opened: account tester is held"
    body = notice.get_content()
    assert "Account:      tester" in body and "5 spam verdicts within 1h" in body
    assert "Client IPs:   127.0.0.1" in body and "Top symbols:  GTUBE" in body
    time.sleep(1.0)
    assert len(notices(exim)) == 1, "one notice per transition, not one per message"

    # held: its next ham is quarantined, not relayed
    mid, outcome = ham(exim)
    assert outcome.accepted, outcome
    held = wait_mailbox(exim, "quarantine", mid)
    assert "account tester is held: incident 1" in held["X-Exim-Policy-Quarantine"]
    assert not [m for m in c.sink.messages if mid.encode() in m.data]

    # lock_after = 2 more spam verdicts: locked. A session that logged in before the lock
    # is refused at its next MAIL; a new one at AUTH.
    with smtplib.SMTP("127.0.0.1", exim.port, local_hostname="client.test",
                      timeout=30) as live:
        live.ehlo("client.test")
        live.login(*TESTER)
        for _ in range(2):
            assert gtube(exim).accepted
        second = wait_notices(exim, 2)[-1]
        assert subject(second) == "[exim-policy] incident 1 locked: account tester is locked"
        code, text = live.mail(USER_ADDRESS)
        assert code == 550 and b"This account may not send mail now" in text, (code, text)
    with smtplib.SMTP("127.0.0.1", exim.port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            smtp.login(*TESTER)
        assert info.value.smtp_code == 535
    assert "exim-policy: account tester is locked" in exim.mainlog

    # a human unlocks: the next ham is relayed, the audit trail shows it
    done = accounts_cli(shim, "unlock", "tester", "--reason", "password changed")
    assert done.returncode == 0, done.stderr
    time.sleep(1.1)  # the daemon sees a change within a second (its helper's cache)
    mid, outcome = ham(exim)
    assert outcome.accepted, outcome
    wait_sink(c.sink, mid)
    show = json.loads(accounts_cli(shim, "show", "tester", "--json").stdout)
    assert show["state"] == "ok"
    assert show["audit"][0]["action"] == "unlocked"
    assert show["audit"][0]["reason"] == "password changed"
    assert [i["state"] for i in show["incidents"]] == ["closed"]
    third = wait_notices(exim, 3)[-1]
    assert "unlocked" in subject(third)


def test_over_a_limit_is_a_451_until_the_window_moves_on(chain):
    c = chain(limits='[[accounts.limits]]\nwindow = "3s"\nmessages = 2\nrecipients = 3\n')
    exim = c.exim
    four = ("a@example.com", "b@example.com", "c@example.com", "d@example.com")
    _, too_many = ham(exim, MALLORY_ADDRESS, MALLORY, rcpts=four)
    # MAIL passes (one more message is allowed); DATA knows the 4 recipients: over 3
    assert (too_many.code, too_many.stage) == (451, "data"), too_many
    assert "Sending rate limit exceeded" in too_many.text
    started = time.monotonic()
    for _ in range(2):
        mid, outcome = ham(exim, MALLORY_ADDRESS, MALLORY)
        assert outcome.accepted, outcome
        wait_sink(c.sink, mid)
    _, third = ham(exim, MALLORY_ADDRESS, MALLORY)
    # the helper says "throttled" now, so the MAIL ACL defers before any data is sent
    assert (third.code, third.stage) == (451, "mail"), third
    assert "Sending rate limit exceeded" in third.text
    time.sleep(max(0.0, 3.3 - (time.monotonic() - started)))
    mid, later = ham(exim, MALLORY_ADDRESS, MALLORY)
    assert later.accepted, later
    wait_sink(c.sink, mid)
    # another account is not affected by mallory's limit
    mid, other = ham(exim)
    assert other.accepted, other


def test_shadow_mode_holds_nothing_and_says_would(chain):
    c = chain(mode="shadow", incident='spam_verdicts = 5\non_open = "lock"')
    exim, shim = c.exim, c.shim
    for _ in range(5):
        assert gtube(exim).accepted
    [notice] = wait_notices(exim, 1)
    assert subject(notice) == ("[exim-policy] (shadow mode) incident 1 opened: account "
                                 "tester would be locked")
    assert "shadow mode: nothing was stopped" in notice.get_content()
    mid, outcome = ham(exim)
    assert outcome.accepted, outcome
    wait_sink(c.sink, mid)  # relayed: nothing is held
    _, again = ham(exim)
    assert again.accepted  # the MAIL ACL got "ok" from the helper too
    shim.wait_log("would be locked")
