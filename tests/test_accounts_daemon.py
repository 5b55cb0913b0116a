"""Accounts across real daemons: two shims on one real Redis (several MX nodes), restarts
of the shim and of Redis, a Redis outage, and the helper seeing the CLI's changes.

Requests are the bytes Exim sends (``CHECK RSPAMC/1.3``), scanned by the real Rspamd;
notices go to the lab's SMTP sink.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid

import pytest

from exim_policy.lab import messages
from exim_policy.lab.ports import LOOPBACK
from exim_policy.lab.shim import ShimLab
from exim_policy.protocol.mbox import exim_mbox_wrap

pytestmark = pytest.mark.real

RCPT = "carol@example.com"


def request(message: bytes, user: str) -> bytes:
    body = exim_mbox_wrap(message, sender=f"{user}@lab.test", recipients=[RCPT])
    return (f"CHECK RSPAMC/1.3\r\nContent-length: {len(body)}\r\nQueue-Id: 1q-{uuid.uuid4().hex[:6]}"
            f"\r\nFrom: <{user}@lab.test>\r\nRecipient-Number: 1\r\nRcpt: <{RCPT}>\r\n"
            f"Helo: client.test\r\nIP: 127.0.0.1\r\nUser: {user}\r\n\r\n").encode() + body


def ask(port: int, payload: bytes) -> bytes:
    with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
        sock.sendall(payload)
        return b"".join(iter(lambda: sock.recv(65536), b""))


def action(shim: ShimLab, user: str, spam: bool = False) -> str:
    message = messages.gtube(to=RCPT) if spam else messages.ham(to=RCPT)
    reply = ask(shim.port, request(message, user))
    assert reply.startswith(b"RSPAMD/1.3 0 EX_OK"), reply[:200]
    return reply.split(b"\r\n")[2].removeprefix(b"Action: ").decode()


def helper(shim: ShimLab, user: str) -> str:
    with socket.create_connection((LOOPBACK, shim.query_port), timeout=10) as sock:
        sock.sendall(f"account {user}\n".encode())
        sock.shutdown(socket.SHUT_WR)
        return sock.recv(64).decode()


def cli(shim: ShimLab, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exim_policy", "accounts", *argv,
                           "--config", str(shim.config_path)],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def shims(tmp_path, rspamd_running, redis_server, smtp_sink):
    """``shims(n, **options)``: n shims on one Redis key space (one site's MX nodes)."""
    if not redis_server.alive():
        redis_server.start()
    prefix = f"daemon-{uuid.uuid4().hex[:8]}:"
    started = []

    def make(n: int = 1, *, limits: str = "", failure: str = "open", mode: str = "enforce"):
        made = []
        for _ in range(n):
            toml = (f'\n[accounts]\nenabled = true\nstore = "redis"\n'
                    f'redis_url = "{redis_server.url}"\nredis_prefix = "{prefix}"\n'
                    f'mode = "{mode}"\n{limits}'
                    '[accounts.incident]\nspam_verdicts = 2\non_open = "hold"\nlock_after = 0\n'
                    f'[accounts.notify]\nmail_to = ["abuse@lab.test"]\n'
                    f'smtp = "127.0.0.1:{smtp_sink.port}"\n')
            shim = ShimLab(tmp_path / f"shim{len(started)}", rspamd_url=rspamd_running.url,
                           extra_toml=toml, failure={"accounts": failure})
            shim.start()
            started.append(shim)
            made.append(shim)
        return made

    yield make
    for shim in started:
        shim.stop()
    if not redis_server.alive():
        redis_server.start()


def test_two_shims_on_one_redis_add_up_and_share_incidents(shims, smtp_sink):
    a, b = shims(2, limits='[[accounts.limits]]\nwindow = "1h"\nmessages = 5\n')
    answers = [action(node, "alice") for node in (a, a, a, b, b)]
    assert answers == ["no action"] * 5
    assert action(a, "alice") == "soft reject"  # the sixth, whichever node gets it
    assert action(b, "alice") == "soft reject"
    # one spam verdict through each node opens the incident (spam_verdicts = 2)...
    assert action(a, "bob", spam=True) == "reject"
    assert action(b, "bob", spam=True) == "reject"
    # ...and the account is held on the other node from its next message on
    assert action(a, "bob") == "reject"
    assert helper(a, "bob") == "held" and helper(b, "bob") == "held"
    [notice] = smtp_sink.wait_for(1, timeout=15)
    time.sleep(1.0)
    assert len(smtp_sink.messages) == 1, "one incident, one notice"
    assert b"incident" in notice.data and b"account bob is held" in notice.data


def test_a_lock_survives_a_shim_restart_and_a_redis_restart(shims, redis_server):
    [shim] = shims(1)
    done = cli(shim, "lock", "carol", "--reason", "phished")
    assert done.returncode == 0, done.stderr
    assert action(shim, "carol") == "reject"
    shim.stop()
    shim.start()
    assert helper(shim, "carol") == "locked"
    redis_server.restart()  # persistence on: the append-only file has it
    time.sleep(1.1)         # past the helper's cache
    assert helper(shim, "carol") == "locked"
    assert action(shim, "carol") == "reject"
    show = json.loads(cli(shim, "show", "carol", "--json").stdout)
    assert show["state"] == "locked" and show["audit"][0]["reason"] == "locked by root: phished"


def test_the_helper_sees_a_change_of_the_cli_within_a_second(shims):
    [shim] = shims(1)
    assert helper(shim, "dave") == "ok"
    assert cli(shim, "lock", "dave", "--reason", "test").returncode == 0
    started = time.monotonic()
    while helper(shim, "dave") != "locked":
        assert time.monotonic() - started < 1.5, "the daemon did not see the lock"
        time.sleep(0.05)
    assert cli(shim, "unlock", "dave", "--reason", "test").returncode == 0
    started = time.monotonic()
    while helper(shim, "dave") != "ok":
        assert time.monotonic() - started < 1.5, "the daemon did not see the unlock"
        time.sleep(0.05)


def test_a_redis_outage_is_the_configured_decision(shims, redis_server):
    open_shim, strict = shims(2, failure="open")[0], shims(1, failure="tempfail")[0]
    for node in (open_shim, strict):  # a hold both nodes have seen
        if node is open_shim:
            action(node, "erin", spam=True)
            action(node, "erin", spam=True)
        assert action(node, "erin") == "reject"
    redis_server.stop()
    try:
        # open: Rspamd's verdict applies, nothing is counted; the hold seen stays
        assert action(open_shim, "frank") == "no action"
        assert action(open_shim, "frank", spam=True) == "reject"
        assert action(open_shim, "erin") == "reject"
        # tempfail: outbound mail of accounts gets a 451, except what is known held
        assert action(strict, "frank") == "soft reject"
        assert action(strict, "erin") == "reject"
        for _ in range(20):
            action(open_shim, "frank")
        errors = [line for line in open_shim.wait_log("account store").splitlines()
                  if "ERROR" in line and "account store" in line]
        assert 1 <= len(errors) <= 2, errors  # at most once per few seconds
    finally:
        redis_server.start()
    assert action(open_shim, "frank") == "no action"  # back: counted again
    assert helper(open_shim, "frank") == "ok"
