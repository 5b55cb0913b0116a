"""Loopback port helpers for the lab: pick a free port, wait until a TCP port accepts.

Other test sessions run services on the same machine at the same time, so nothing in the
lab uses a fixed port: ``free_port`` asks the kernel for one (bind to port 0).  The port is
released before the caller's server binds it, so a collision is possible but rare; callers
that start servers treat "address in use" as a reason to pick another port and retry.
"""
from __future__ import annotations

import socket
import time
from collections.abc import Callable

LOOPBACK = "127.0.0.1"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = LOOPBACK, *, udp: bool = False) -> int:
    """Return a port on ``host`` that was free a moment ago (TCP, or UDP with ``udp=True``)."""
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    with socket.socket(_family(host), kind) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tcp_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a TCP connection to ``host:port`` succeeds right now (it is closed at once)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_tcp(host: str, port: int, deadline: float, *,
             alive: Callable[[], bool] | None = None, interval: float = 0.05) -> None:
    """Block until ``host:port`` accepts a TCP connection.

    ``deadline`` is an absolute ``time.monotonic()`` value.  ``alive`` (optional) is polled
    between attempts; when it returns False the wait ends early, because a server whose
    process died will never listen.  Raises ``TimeoutError`` (deadline passed) or
    ``RuntimeError`` (``alive()`` returned False).
    """
    while True:
        remaining = deadline - time.monotonic()
        if tcp_accepts(host, port, timeout=max(0.05, min(0.5, remaining))):
            return
        if alive is not None and not alive():
            raise RuntimeError(f"{host}:{port}: the server process exited before listening")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port}: nothing accepted a TCP connection in time")
        time.sleep(interval)
