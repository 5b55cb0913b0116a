"""systemd's readiness protocol (``Type=notify``): a datagram per state change to the unix
socket named by ``$NOTIFY_SOCKET``.

The protocol is newline-separated ``KEY=value`` assignments in one datagram; a name
starting with ``@`` is in the abstract namespace. Without ``$NOTIFY_SOCKET`` (not run by
systemd, or another service type) every call does nothing. A failed send is logged and
never stops the daemon: the manager then only sees the start or reload take long.

The states the daemon sends: ``READY=1`` once every listener accepts; ``RELOADING=1`` (with
``MONOTONIC_USEC``, which systemd 253's ``Type=notify-reload`` asks for) when a SIGHUP
reload starts and ``READY=1`` when it is done, whatever its outcome; ``STOPPING=1`` when
SIGTERM arrives; ``STATUS=`` lines say what the daemon is doing.
"""
from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends to ``$NOTIFY_SOCKET`` as it was at construction (systemd sets it once)."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        name = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
        if name.startswith("@"):
            name = "\0" + name[1:]
        self.address = name if name.startswith(("/", "\0")) else None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **state: str | int) -> bool:
        """One datagram with ``state`` (``ready=1`` -> ``READY=1``); False if not sent."""
        if self.address is None:
            return False
        payload = "\n".join(f"{key.upper()}={value}" for key, value in state.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)  # a full queue drops the datagram, never waits
                sock.sendto(payload.encode("utf-8"), self.address)
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", self.address.replace("\0", "@"),
                        exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(ready=1, status=status)

    def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(reloading=1, monotonic_usec=usec, status="reloading the configuration")

    def stopping(self) -> bool:
        return self.send(stopping=1, status="stopping: finishing the open requests")
