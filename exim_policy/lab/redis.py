"""A private redis-server on a free loopback port, as user ``redis`` (Debian's redis-server).

``RedisLab(workdir, persistent=False)`` keeps its data dir and log under
``<workdir>/redis/``. It listens on 127.0.0.1 only, with protected mode on. With
``persistent`` it writes an append-only file (fsync every second) so that a restart keeps
the data, as a production Redis for the account store should; without, it saves nothing.
``restart()`` keeps the port. Redis never resolves names, so nothing leaves the machine.
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import time
from pathlib import Path

from .errors import LabError, LabUnavailable
from .ports import LOOPBACK, free_port
from .process import ManagedProcess

REDIS_BINARY = "redis-server"
REDIS_USER = "redis"


def check_prerequisites() -> None:
    if shutil.which(REDIS_BINARY) is None:
        raise LabUnavailable("redis-server not found: install the Debian package 'redis-server'")
    try:
        pwd.getpwnam(REDIS_USER)
    except KeyError:
        raise LabUnavailable("no user redis: install the Debian package 'redis-server'") from None
    if os.geteuid() != 0:
        raise LabUnavailable("the Redis lab must run as root (it starts redis as user redis)")


class RedisLab:
    def __init__(self, workdir: str | os.PathLike[str], *, persistent: bool = False) -> None:
        self.dir = Path(workdir) / "redis"
        self.persistent = persistent
        self.port = 0
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def start(self, timeout: float = 15.0) -> None:
        if self.alive():
            return
        check_prerequisites()
        user = pwd.getpwnam(REDIS_USER)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chown(self.dir, user.pw_uid, user.pw_gid)
        os.chmod(self.dir, 0o750)
        if not self.port:
            self.port = free_port()
        persistence = (["--appendonly", "yes", "--appendfsync", "everysec"] if self.persistent
                       else ["--appendonly", "no"])
        self.process = ManagedProcess(
            [REDIS_BINARY, "--bind", LOOPBACK, "--port", str(self.port), "--protected-mode",
             "yes", "--dir", str(self.dir), "--save", "", *persistence, "--daemonize", "no",
             "--logfile", str(self.dir / "redis.log")],
            name="redis", logdir=self.dir, user=REDIS_USER)
        self.process.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ping():
                return
            if not self.process.alive():
                break
            time.sleep(0.05)
        self.process.stop(5.0)
        raise LabError(f"redis-server did not answer PING on {LOOPBACK}:{self.port}\n"
                       f"{self.process.tail()}\n{self.log_tail()}")

    def ping(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            self.process.stop(timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.dir / "redis.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> RedisLab:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
