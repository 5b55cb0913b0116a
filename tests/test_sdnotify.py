"""The systemd readiness datagrams, read from a socket standing where systemd's would be."""
from __future__ import annotations

import os
import socket

from exim_policy.sdnotify import SystemdNotifier


def test_without_notify_socket_nothing_is_sent():
    notifier = SystemdNotifier({})
    assert not notifier.enabled and notifier.ready("serving") is False


def test_ready_reloading_stopping_are_one_datagram_each(notify_socket):
    path, sock = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.ready("serving on 127.0.0.1:11333")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving on 127.0.0.1:11333"
    assert notifier.reloading()
    reloading = dict(line.split("=", 1) for line in sock.recv(4096).decode().split("\n"))
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    assert notifier.stopping()
    assert sock.recv(4096).startswith(b"STOPPING=1\n")


def test_abstract_namespace_address(tmp_path):
    name = f"exim-policy-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        assert SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).send(status="x")
        assert sock.recv(100) == b"STATUS=x"
    finally:
        sock.close()


def test_a_socket_that_is_gone_is_logged_not_raised(tmp_path, caplog):
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.ready("serving") is False
    assert "cannot notify systemd" in caplog.text
