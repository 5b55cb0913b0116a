"""The real daemon in front of the real Rspamd under a hostile client found by
bench/bench_hostile.py ("hog"): requests that declare a large body and send it a byte a
second. The body budget (server.max_bytes_in_flight) is reserved for the declared
``Content-length`` at the end of the headers, and a byte a second never trips
read_timeout: before, a handful of such connections held the whole budget for
request_timeout (110 s), and every scan behind them waited queue_timeout, then got a
temporary error (in the bench: 16 of them, p50 3.2 s, p99 5.6 s against 18 ms). Now a
request that waits for room closes the holders whose bodies cannot be complete in time at
the rate they arrive (transport/spamd.py); a whole-length reservation stays, so a burst of
large messages still never deadlocks on half-reserved bodies (tests/test_daemon_limits.py).
"""
from __future__ import annotations

import socket
import time

import pytest

from exim_policy.lab import messages
from exim_policy.lab.ports import LOOPBACK
from exim_policy.lab.shim import ShimLab
from exim_policy.protocol.mbox import exim_mbox_wrap

pytestmark = pytest.mark.real

LOCAL = "bob@lab.test"
MiB = 1024 * 1024


def exim_request(message: bytes) -> bytes:
    body = exim_mbox_wrap(message, sender="alice@example.org", recipients=[LOCAL])
    return (f"CHECK RSPAMC/1.3\r\nContent-length: {len(body)}\r\nQueue-Id: 1xV0ZC-0003TR-0m\r\n"
            f"From: <alice@example.org>\r\nRecipient-Number: 1\r\nRcpt: <{LOCAL}>\r\n"
            "Helo: client.test\r\nIP: 127.0.0.1\r\n\r\n").encode() + body


def declaring(port: int, length: int) -> socket.socket:
    """A request that declares ``length`` body bytes and sends one."""
    sock = socket.create_connection((LOOPBACK, port), timeout=10)
    sock.sendall(f"CHECK RSPAMC/1.3\r\nContent-length: {length}\r\nRcpt: <{LOCAL}>\r\n"
                 "IP: 127.0.0.1\r\n\r\nx".encode())
    return sock


def scan(port: int, payload: bytes, timeout: float) -> bytes:
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.sendall(payload)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.fixture
def shim(rspamd_running, tmp_path):
    # the defaults scaled down: a budget of two maximal bodies, a short queue
    lab = ShimLab(tmp_path, rspamd_url=rspamd_running.url, rspamd_timeout=30.0,
                  server={"max_bytes_in_flight": 2 * MiB, "max_message_size": MiB,
                          "queue_timeout": 2.0})
    lab.start()
    yield lab
    lab.stop()


def test_declared_bodies_that_never_arrive_do_not_hold_off_the_scans(shim):
    hogs = [declaring(shim.port, MiB) for _ in range(3)]  # two hold it all, one queues
    try:
        time.sleep(0.3)
        started = time.monotonic()
        reply = scan(shim.port, exim_request(messages.ham(to=LOCAL)), timeout=20)
        waited = time.monotonic() - started
        assert reply.startswith(b"RSPAMD/1.3 0 EX_OK") and b"Action: no action" in reply, \
            reply[:120]
        # (the holders are judged half a second after they got their room, and then every
        # half second: well within queue_timeout, 2 s here)
        assert waited < 1.5, f"the scan waited {waited:.1f}s"
        answers = [hog.recv(200) for hog in hogs[:2]]
    finally:
        for sock in hogs:
            sock.close()
    assert answers == [b"SPAMD/1.0 75 Service Unavailable: the message arrives too slowly, "
                       b"try again later\r\n"] * 2
    shim.wait_log("could not be complete within server.request_timeout, and other requests "
                  "wait for its room in server.max_bytes_in_flight")


def test_a_body_that_arrives_in_time_keeps_its_room(shim):
    """Slow, but fast enough to be complete before request_timeout: not closed."""
    body = exim_mbox_wrap(messages.ham(to=LOCAL), sender="alice@example.org",
                          recipients=[LOCAL]) + b"x" * (MiB - 4096)
    head = (f"CHECK RSPAMC/1.3\r\nContent-length: {len(body)}\r\nRcpt: <{LOCAL}>\r\n"
            "IP: 127.0.0.1\r\n\r\n").encode()
    slow = socket.create_connection((LOOPBACK, shim.port), timeout=20)
    other = declaring(shim.port, MiB)  # holds the rest of the budget, a byte a second
    waiting = socket.create_connection((LOOPBACK, shim.port), timeout=20)
    try:
        slow.sendall(head)
        waiting.sendall(exim_request(messages.ham(to=LOCAL)))
        for i in range(0, len(body), 64 * 1024):  # about 400 KB/s: done in 2.6 s
            slow.sendall(body[i:i + 64 * 1024])
            time.sleep(0.16)
        reply = slow.recv(200)
        assert reply.startswith(b"RSPAMD/1.3 0 EX_OK"), reply
        assert waiting.recv(200).startswith(b"RSPAMD/1.3 0 EX_OK")
    finally:
        for sock in (slow, other, waiting):
            sock.close()
