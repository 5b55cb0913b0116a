"""The quarantine receiver (aiosmtpd + our streaming DATA) against a real SMTP client:
stored only after the file is on disk, 4xx whenever it cannot keep a message, bounded."""
from __future__ import annotations

import asyncio
import dataclasses
import smtplib
import socket
import threading
import time

import pytest

from exim_policy.config import Config, QuarantineConfig, parse_listen
from exim_policy.lab.ports import LOOPBACK, free_port
from exim_policy.quarantine.receiver import QuarantineReceiver
from exim_policy.quarantine.store import QuarantineStore

EVIDENCE = (b'X-Exim-Policy-Quarantine: reason="Gtube pattern"; auth=tester; ip=192.0.2.5;'
            b"\r\n\thelo=client.test; queue=1abcde-000001-AB; host=mx1; score=15.0; "
            b"action=reject\r\n"
            b"X-Exim-Policy-Report: Action: reject\r\n Symbol: GTUBE(0.00)\r\n")


def message(body: bytes = b"spam\r\n", extra: bytes = b"") -> bytes:
    return (b"From: tester@lab.test\r\nTo: x@example.com\r\nSubject: hello\r\n"
            b"Message-ID: <r1@lab.test>\r\n" + extra + EVIDENCE + b"\r\n" + body)


class Running:
    """The receiver on its own event loop in a thread (the test is the SMTP client)."""

    def __init__(self, tmp_path, incident_of=None, new_loop=asyncio.new_event_loop,
                 **keys) -> None:
        """``new_loop``: the event loop's constructor (tests/test_hostile_quarantine.py:
        uvloop's, the daemon's whenever it is installed)."""
        self.port = free_port()
        quarantine = QuarantineConfig(listen=(parse_listen(f"{LOOPBACK}:{self.port}"),),
                                      path=str(tmp_path / "q"), **keys)
        self.config = Config(quarantine=quarantine)
        self.store = QuarantineStore(quarantine.path)
        self.receiver = QuarantineReceiver(self.config, self.store, incident_of)
        self.loop = new_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.receiver.start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.receiver.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.store.close()

    def smtp(self) -> smtplib.SMTP:
        client = smtplib.SMTP(LOOPBACK, self.port, timeout=20)
        client.ehlo("mx1.test")
        return client


@pytest.fixture
def receiver(tmp_path):
    running = Running(tmp_path)
    yield running
    running.stop()


def test_a_message_is_held_with_its_envelope_and_evidence(receiver):
    with receiver.smtp() as client:
        refused = client.sendmail("tester@lab.test",
                                  ["x@example.com", "y@example.net", "bcc@example.org"],
                                  message(b".leading dot\r\nlast\r\n"))
    assert refused == {}
    [entry] = receiver.store.list()
    assert entry.sender == "tester@lab.test"
    assert [r.address for r in entry.recipients] == ["x@example.com", "y@example.net",
                                                     "bcc@example.org"]
    ev = entry.evidence
    assert (ev.account, ev.ip, ev.queue_id, ev.host, ev.score) == (
        "tester", "192.0.2.5", "1abcde-000001-AB", "mx1", 15.0)
    assert ev.symbols == (("GTUBE", 0.0),) and entry.subject == "hello"
    stored = receiver.store.path_of(entry.id).read_bytes()
    assert b"X-Exim-Policy" not in stored and stored.endswith(b"\r\n\r\n.leading dot\r\nlast\r\n")
    assert entry.size == len(stored) and entry.source == "smtp from 127.0.0.1"


def test_the_reply_names_the_entry_and_a_resend_is_merged(receiver):
    with receiver.smtp() as client:
        client.mail("tester@lab.test")
        client.rcpt("x@example.com")
        code, text = client.data(message())
        assert code == 250 and text.startswith(b"2.0.0 held as ")
        first = text.split()[-1].decode()
        client.mail("tester@lab.test")
        client.rcpt("z@example.org")
        code, text = client.data(message())  # the same bytes: Exim after a lost 250
    assert code == 250 and text.decode().endswith(first)
    [entry] = receiver.store.list()
    assert [r.address for r in entry.recipients] == ["x@example.com", "z@example.org"]


def test_disk_full_is_a_4xx_before_data(tmp_path):
    running = Running(tmp_path, min_free_bytes=2 ** 62)
    try:
        with running.smtp() as client:
            code, text = client.mail("tester@lab.test")
        assert code == 452 and b"disk full" in text
        assert running.store.list() == []
    finally:
        running.stop()


def test_too_large_is_552_and_nothing_is_kept(tmp_path):
    running = Running(tmp_path, max_message_size=1000)
    try:
        big = message(b"x" * 5000 + b"\r\n")
        with running.smtp() as client:
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:  # SIZE= at MAIL
                client.sendmail("tester@lab.test", ["x@example.com"], big)
            assert refused.value.smtp_code == 552
            client.rset()
            client.mail("tester@lab.test")  # no SIZE: refused at the end of DATA
            client.rcpt("x@example.com")
            assert client.data(big)[0] == 552
        assert running.store.list() == [] and list(running.store.tmp.iterdir()) == []
    finally:
        running.stop()


def test_recipient_limit_is_452(tmp_path):
    running = Running(tmp_path, max_recipients=2)
    try:
        with running.smtp() as client:
            client.mail("tester@lab.test")
            assert client.rcpt("a@example.com")[0] == 250
            assert client.rcpt("b@example.com")[0] == 250
            assert client.rcpt("c@example.com")[0] == 452
    finally:
        running.stop()


def test_clients_outside_allowed_clients_are_refused(tmp_path):
    running = Running(tmp_path, allowed_clients=(__import__("ipaddress").ip_network(
        "192.0.2.0/24"),))
    try:
        with running.smtp() as client:
            code, _ = client.mail("tester@lab.test")
        assert code == 550 and running.store.list() == []
    finally:
        running.stop()


def test_a_connection_lost_during_data_keeps_nothing(receiver):
    with socket.create_connection((LOOPBACK, receiver.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        for line in (b"EHLO mx1\r\n", b"MAIL FROM:<a@lab.test>\r\n", b"RCPT TO:<x@example.com>\r\n",
                     b"DATA\r\n"):
            sock.sendall(line)
            while True:
                reply = reader.readline()
                if reply[3:4] != b"-":
                    break
        sock.sendall(message()[:60])
        reader.close()  # (the file holds the socket open)
    # the session is over once it is no longer counted (its temporary file may be made
    # only after this client closed, and is discarded then)
    for _ in range(100):
        if not receiver.receiver.sessions and not list(receiver.store.tmp.iterdir()):
            break
        time.sleep(0.05)
    assert receiver.store.list() == [] and list(receiver.store.tmp.iterdir()) == []


def test_pipelined_commands_after_the_end_marker_are_answered(receiver):
    """DATA never reads past the end marker: a pipelining client's next command stays."""
    with socket.create_connection((LOOPBACK, receiver.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"EHLO mx1\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        sock.sendall(b"MAIL FROM:<a@lab.test>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n")
        replies = [reader.readline() for _ in range(3)]
        assert [r[:3] for r in replies] == [b"250", b"250", b"354"]
        sock.sendall(message() + b".\r\nMAIL FROM:<b@lab.test>\r\nQUIT\r\n")
        assert reader.readline().startswith(b"250 2.0.0 held as ")
        assert reader.readline().startswith(b"250")
        assert reader.readline().startswith(b"221")


def test_the_incident_comes_from_the_account_store_when_the_reason_has_none(tmp_path):
    async def incident_of(account, at):
        return 42 if account == "tester" else None

    running = Running(tmp_path, incident_of=incident_of)
    try:
        with running.smtp() as client:
            client.sendmail("tester@lab.test", ["x@example.com"], message())
        assert running.store.list()[0].evidence.incident == 42
    finally:
        running.stop()


def test_config_defaults_are_what_the_exim_side_expects():
    quarantine = QuarantineConfig()
    assert [str(a) for a in quarantine.listen] == ["127.0.0.1:11337"]  # main.conf's default
    assert quarantine.release_via == "exim" and quarantine.retention == 30 * 86400
    assert dataclasses.replace(quarantine, listen=()).listen == ()
