"""The quarantine receiver under hostile clients (found by bench/bench_hostile.py): its
sessions are few (MAX_SESSIONS), so none may stay taken by a client that has gone."""
from __future__ import annotations

import ipaddress
import smtplib
import socket
import threading
import time

import pytest

from exim_policy.lab.ports import LOOPBACK
from exim_policy.quarantine.receiver import MAX_SESSIONS
from test_quarantine_receiver import Running

uvloop = pytest.importorskip("uvloop")  # the daemon's loop whenever it is installed


class Receiver(Running):
    """The receiver on a uvloop event loop in a thread (the test is the client)."""

    def __init__(self, tmp_path, **keys) -> None:
        super().__init__(tmp_path, new_loop=uvloop.new_event_loop, **keys)

    def block_loop(self, seconds: float) -> None:
        """Keep the loop busy (as under load) for ``seconds``: nothing is accepted."""
        busy = threading.Event()

        def sleep() -> None:
            busy.set()
            time.sleep(seconds)  # noqa: ASYNC251 - the point: the loop does nothing else

        self.loop.call_soon_threadsafe(sleep)
        assert busy.wait(5)

    def deliver(self) -> dict:
        """One delivery as Exim makes it; smtplib's refused recipients ({}: held)."""
        with smtplib.SMTP(LOOPBACK, self.port, timeout=10) as client:
            return client.sendmail("tester@lab.test", ["x@example.com"],
                                   b"Subject: held\r\n\r\nspam\r\n")


def test_connections_closed_before_they_were_accepted_give_their_sessions_back(tmp_path):
    """Port probes (connect, close) that the receiver accepts only once they have closed,
    as it does when busy: under uvloop aiosmtpd cancelled each session's handler before it
    ever ran and kept the socket half open (CLOSE-WAIT) until its idle timeout (300 s),
    counted among the MAX_SESSIONS: 200 probes shut the quarantine for five minutes, a 421
    to every delivery."""
    running = Receiver(tmp_path)
    try:
        running.block_loop(1.0)
        for _ in range(MAX_SESSIONS + 10):
            socket.create_connection((LOOPBACK, running.port), timeout=5).close()
        time.sleep(1.5)  # the loop runs again and accepts them
        deadline = time.monotonic() + 5
        while running.receiver.sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running.receiver.sessions == 0, "sessions still taken by clients long gone"
        assert running.deliver() == {} and len(running.store.list()) == 1
    finally:
        running.stop()


def hold_sessions(port: int, count: int, source: str | None = None) -> list[socket.socket]:
    """``count`` connections that read the greeting, then say nothing."""
    held = []
    for _ in range(count):
        sock = socket.create_connection((LOOPBACK, port), timeout=5,
                                        source_address=(source, 0) if source else None)
        held.append(sock)
        assert sock.recv(512).startswith(b"220 ")
    return held


def closed_with(sock: socket.socket) -> bytes:
    """What the receiver sent before closing ``sock`` (b"" if it is still open)."""
    sock.settimeout(2)
    try:
        data = sock.recv(512)
        return data if data else b"closed"
    except TimeoutError:
        return b""


def test_silent_clients_on_every_session_do_not_shut_the_mtas_out(tmp_path, caplog):
    """200 silent connections (a slowloris, a port scan left open) used to take every
    session for IDLE_TIMEOUT (300 s): each delivery got 421. Now the session silent
    longest makes room, with a log line, as the spamd listener's table does."""
    running = Receiver(tmp_path)
    held = hold_sessions(running.port, MAX_SESSIONS)
    try:
        assert running.deliver() == {} and len(running.store.list()) == 1
        assert closed_with(held[0]).startswith(b"421 ")  # the oldest made room
        assert closed_with(held[-1]) == b""  # the newest is still open
        assert "to make room" in caplog.text
    finally:
        for sock in held:
            sock.close()
        running.stop()


def test_clients_outside_allowed_clients_cannot_hold_the_sessions(tmp_path):
    """Clients outside quarantine.allowed_clients are refused at MAIL (550), but their
    connections used to count among the sessions until then: 200 of them, silent, shut
    the MTAs out. Now an MTA's connection sheds them; a further outsider is refused."""
    running = Receiver(tmp_path, allowed_clients=(ipaddress.ip_network("127.0.0.1/32"),))
    held = hold_sessions(running.port, MAX_SESSIONS, source="127.0.0.2")
    try:
        assert running.deliver() == {} and len(running.store.list()) == 1
        held += hold_sessions(running.port, 1, source="127.0.0.2")  # full again
        late = socket.create_connection((LOOPBACK, running.port), timeout=5,
                                        source_address=("127.0.0.2", 0))
        held.append(late)
        assert closed_with(late).startswith(b"421 ")  # an outsider makes no room
    finally:
        for sock in held:
            sock.close()
        running.stop()


def test_clients_outside_allowed_clients_do_not_flood_the_log(tmp_path, caplog):
    """Each refusal at MAIL was a log line of its own: an outsider connecting at full
    speed wrote thousands a second. Now one line, then a count (as the spamd listener's
    refusals are logged)."""
    running = Receiver(tmp_path, allowed_clients=(ipaddress.ip_network("127.0.0.1/32"),))
    try:
        for _ in range(20):
            with smtplib.SMTP(LOOPBACK, running.port, timeout=10,
                              source_address=("127.0.0.2", 0)) as client:
                client.ehlo("outsider.test")
                assert client.mail("a@example.com")[0] == 550
        lines = [r for r in caplog.records if "quarantine.allowed_clients" in r.getMessage()]
        assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]
    finally:
        running.stop()
