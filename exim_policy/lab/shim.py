"""The shim (``exim-policy serve``) as a real subprocess on a free loopback port.

Used by the end-to-end tests and the demo: Exim talks to it exactly as in production.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Iterable, Mapping

from ..config import toml_value
from .ports import LOOPBACK, free_port, tcp_accepts, wait_tcp


def render_toml(sections: Mapping[str, Mapping[str, object]]) -> str:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(v)}" for key, v in values.items())
        lines.append("")
    return "\n".join(lines)


class ShimLab:
    """Config file, forwarding map and process of one shim instance under ``workdir``."""

    def __init__(self, workdir: str | os.PathLike, *, rspamd_url: str,
                 forwarding: Iterable[str] = (), relay_networks: Iterable[str] = (),
                 relay_networks_file: str = "",
                 failure: Mapping[str, str] | None = None, extra_toml: str = "",
                 port: int | None = None, rspamd_timeout: float = 5.0,
                 log_level: str = "info", log_format: str = "text",
                 server: Mapping[str, object] | None = None,
                 quarantine: Mapping[str, object] | None = None,
                 metrics: Mapping[str, object] | None = None,
                 workers: int | None = None, code: str | os.PathLike | None = None,
                 unix_socket: bool = False) -> None:
        """``server``: more ``[server]`` keys (limits, timeouts) over the lab's own.
        ``quarantine``: run the quarantine receiver (on :attr:`quarantine_port`, its store
        in :attr:`quarantine_path`), with these ``[quarantine]`` keys over the lab's.
        ``metrics``: serve ``GET /metrics`` on :attr:`metrics_port`, with these
        ``[metrics]`` keys over the lab's. ``workers``: ``server.workers`` (a supervisor
        and that many worker processes; :meth:`start` waits until every one serves). ``code``:
        a checkout whose ``exim_policy`` the daemon runs instead of this one's (a benchmark's
        baseline, side by side). ``unix_socket``: the spamd listener on a unix socket too
        (:attr:`socket_path`, :attr:`spamd_socket_address`)."""
        self.dir = Path(workdir) / "shim"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        #: the policy-helper (query) listener, for ${readsocket}
        self.query_port = free_port()
        #: the HTTP front (/checkv2) for Haraka, rspamc and rspamd_proxy
        self.http_port = free_port() if "http_listen" not in (server or {}) else None
        self.config_path = self.dir / "config.toml"
        self.map_path = self.dir / "forwardings.txt"
        self.log_path = self.dir / "shim.log"
        self.socket_path = self.dir / "spamd.sock" if unix_socket else None
        self.proc: subprocess.Popen | None = None
        self.quarantine_port = free_port() if quarantine is not None else None
        self.quarantine_path = self.dir / "quarantine"
        self.metrics_port = free_port() if metrics is not None else None
        self.workers = workers or 1
        self.code = str(code) if code is not None else None
        listen = [f"{LOOPBACK}:{self.port}"]  # (start() waits for this one)
        if self.socket_path is not None:
            listen.append(f"unix:{self.socket_path}")
        sections: dict[str, dict[str, object]] = {
            "server": {"listen": listen, "read_timeout": 10.0,
                       "query_listen": [f"{LOOPBACK}:{self.query_port}"],
                       "http_listen": [f"{LOOPBACK}:{self.http_port}"] if self.http_port else [],
                       **({"workers": workers} if workers else {}), **(server or {})},
            "rspamd": {"url": rspamd_url, "timeout": rspamd_timeout},
            "outbound": {"relay_networks": list(relay_networks),
                         "relay_networks_file": relay_networks_file},
            "forwarding": {"map": str(self.map_path), "reload_interval": 0.2},
            "logging": {"level": log_level, "format": log_format},
            "quarantine": {"listen": [f"{LOOPBACK}:{self.quarantine_port}"],
                           "path": str(self.quarantine_path), **quarantine}
            if quarantine is not None else {"listen": []},
        }
        if metrics is not None:
            sections["metrics"] = {"listen": [f"{LOOPBACK}:{self.metrics_port}"], **metrics}
        if failure:
            sections["failure"] = dict(failure)
        self.config_path.write_text(render_toml(sections) + extra_toml)
        self.write_forwarding(forwarding, wait=False)

    @property
    def query_address(self) -> str:
        """The value for the Exim macro EXIM_POLICY_QUERY (a ${readsocket} spec)."""
        return f"inet:{LOOPBACK}:{self.query_port}"

    @property
    def http_address(self) -> str:
        """``host:port`` of the HTTP front (rspamc -h, Haraka's and the proxy's upstream)."""
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    @property
    def spamd_address(self) -> str:
        """The value for Exim's spamd_address."""
        return f"{LOOPBACK} {self.port} variant=rspamd tmo=30s"

    @property
    def spamd_socket_address(self) -> str:
        """Exim's spamd_address for the unix socket (``unix_socket=True``)."""
        return f"{self.socket_path} variant=rspamd tmo=30s"

    def write_forwarding(self, addresses: Iterable[str], *, wait: bool = True) -> None:
        """Replace the forwarding map atomically; with ``wait``, give the running shim
        time to notice (it polls every 0.2 s here)."""
        tmp = self.map_path.with_suffix(".tmp")
        tmp.write_text("# lab forwarding map\n" + "".join(f"{a}\n" for a in addresses))
        os.replace(tmp, self.map_path)
        if wait and self.alive():
            time.sleep(0.6)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0, env: Mapping[str, str] | None = None) -> None:
        """Start it and wait until it listens; ``env``: more environment variables (such as
        systemd's NOTIFY_SOCKET)."""
        if self.alive():
            return
        started_at = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "exim_policy", "serve", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env={**os.environ, **(env or {})},
                cwd=self.code)  # (``-m`` imports from the working directory first)
        finally:
            log.close()
        try:
            deadline = time.monotonic() + timeout
            wait_tcp(LOOPBACK, self.port, deadline, alive=self.alive)
            if self.http_port is not None:
                wait_tcp(LOOPBACK, self.http_port, deadline, alive=self.alive)
            if self.quarantine_port is not None:
                wait_tcp(LOOPBACK, self.quarantine_port, deadline, alive=self.alive)
            if self.metrics_port is not None:
                wait_tcp(LOOPBACK, self.metrics_port, deadline, alive=self.alive)
            if self.workers > 1:
                ready = f"all {self.workers} workers serving".encode()
                while ready not in self.log_path.read_bytes()[started_at:]:
                    if not self.alive() or time.monotonic() >= deadline:
                        raise TimeoutError(f"not every worker serves after {timeout}s")
                    time.sleep(0.05)
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            raise RuntimeError(f"shim did not start: {exc}\n{self.log_tail()}") from None

    def worker_pids(self) -> list[int]:
        """The pids of the running workers (children of the supervisor), oldest first."""
        if self.proc is None:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            if fields[1] == str(self.proc.pid) and fields[0] not in "ZXx":
                pids.append((int(fields[19]), int(entry)))  # (start time, pid)
        return [pid for _, pid in sorted(pids)]

    def reload(self) -> None:
        """SIGHUP: the shim re-reads :attr:`config_path` and the forwarding map."""
        assert self.proc is not None and self.alive(), "the shim is not running"
        self.proc.send_signal(signal.SIGHUP)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        deadline = time.monotonic() + 5
        while tcp_accepts(LOOPBACK, self.port, 0.2) and time.monotonic() < deadline:
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no shim log)"

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        """The log once it holds ``text`` (the daemon writes it from a thread of its own,
        so a line can trail the answer it is about); raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.log_text()):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"shim log: no {text!r} after {timeout}s\n{self.log_tail()}")
            time.sleep(0.05)
        return log

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""
