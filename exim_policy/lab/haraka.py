"""A private Haraka 3.3.4 on a free loopback port, scanning with haraka-plugin-rspamd.

``HarakaLab(workdir, rspamd_host=..., rspamd_port=..., sink_host=..., sink_port=...)`` lays
out ``<workdir>/haraka/``:

- ``instance/`` is made by ``haraka -i`` (Haraka's own template: a hand-made config dir
  without ``connection.ini`` crashes at the greeting), then the lab replaces the files that
  matter *wholly* -- the template's ``config/plugins`` lists mail_from.is_resolvable, which
  asks DNS:
  - ``plugins``: lab_no_rdns, auth/flat_file, rcpt_to.in_host_list, rspamd,
    queue/smtp_forward -- nothing else, so nothing else can reach past loopback;
  - ``smtp.ini`` (``nodes=0``: one process, in the foreground), ``me`` (a fixed host
    name, so Haraka never asks for its own), ``host_list`` (the local domains),
    ``auth_flat_file.ini`` (AUTH PLAIN/LOGIN; Haraka offers AUTH without TLS only to
    loopback/private clients, which is all the lab has), ``smtp_forward.ini`` (every
    accepted message, relayed ones too through ``enable_outbound``, goes to the SMTP sink:
    no MX lookup), ``log.ini``;
  - ``rspamd.ini``: contrib/haraka/rspamd.ini, the file an admin installs, with only
    ``host``/``port`` replaced (one source of truth: the lab tests the shipped snippet),
    plus the caller's ``rspamd_ini_extra``.
- ``plugins/lab_no_rdns.js``: Haraka's core resolves every client address with
  ``dns.reverse()`` through the system resolver, a server off this machine; this hook
  answers ``lookup_rdns`` at once.
- ``log/haraka.stdout.log`` (``log_path``): Haraka logs to stdout, which ManagedProcess
  appends there.

The install is found in ``$EXIM_POLICY_LAB_HARAKA_DIR`` (default
``/var/cache/exim-policy-lab/haraka``), where ``contrib/setup-haraka.sh`` puts it; tests run
without network, so nothing is ever fetched here.  ``start()`` waits for the 220 banner
(then says QUIT) and fails early, with the log tail, if node exits; a port that was taken
in the meantime ("address in use") makes it pick another and retry.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from .contrib import contrib_path
from .errors import LabError, LabUnavailable
from .ports import LOOPBACK, free_port
from .process import ManagedProcess

INSTALL_ENV = "EXIM_POLICY_LAB_HARAKA_DIR"
DEFAULT_INSTALL_DIR = "/var/cache/exim-policy-lab/haraka"
SETUP_HINT = "bash contrib/setup-haraka.sh as root"
HOSTNAME = "haraka.lab.test"
DEFAULT_USERS: Mapping[str, str] = {"alice@example.com": "secret"}
DEFAULT_LOCAL_DOMAINS = ("example.com",)
#: a start takes ~0.5 s; generous for loaded CI machines and strace
DEFAULT_START_TIMEOUT = 60.0

#: the hook plugin that keeps Haraka's core from asking DNS for the client's name
NO_RDNS_PLUGIN = """\
'use strict'
// exim-policy lab: Haraka's core resolves every client address with dns.reverse(), i.e.
// through the system resolver, a server off this machine.  Answer at once instead.
exports.hook_lookup_rdns = function (next, connection) {
    const ip = connection.remote.ip || ''
    const loopback = ip === '::1' || /^(::ffff:)?127\\./.test(ip)
    next(OK, loopback ? 'localhost' : 'unknown.lab.test')
}
"""

PLUGINS = ("lab_no_rdns", "auth/flat_file", "rcpt_to.in_host_list", "rspamd",
           "queue/smtp_forward")

_ADDRESS_IN_USE = re.compile(r"EADDRINUSE|address already in use", re.IGNORECASE)
_INI_NAME = re.compile(r"^[^\s=\[\];]+$")


def install_dir() -> Path:
    return Path(os.environ.get(INSTALL_ENV) or DEFAULT_INSTALL_DIR)


def find_haraka(root: str | os.PathLike[str] | None = None) -> tuple[str, Path]:
    """``(node, haraka_bin)``; raises ``LabUnavailable`` naming the set-up script."""
    node = shutil.which("node")
    if node is None:
        raise LabUnavailable(f"node not found: run {SETUP_HINT} (installs the Debian "
                             "packages nodejs and npm)")
    prefix = Path(root or install_dir())
    binary = prefix / "node_modules" / "Haraka" / "bin" / "haraka"
    if not binary.is_file():
        raise LabUnavailable(f"Haraka is not installed in {prefix}: run {SETUP_HINT}"
                             f" (or point ${INSTALL_ENV} at its install prefix)")
    # Haraka finds plugins in <its node_modules>/haraka-plugin-<name>, next to itself
    if not (prefix / "node_modules" / "haraka-plugin-rspamd" / "package.json").is_file():
        raise LabUnavailable(f"haraka-plugin-rspamd is missing in {prefix}: run {SETUP_HINT}")
    return node, binary


def contrib_rspamd_ini() -> Path:
    """contrib/haraka/rspamd.ini, the file an admin installs (``LabUnavailable`` if missing)."""
    return contrib_path("haraka/rspamd.ini")


def render_rspamd_ini(template: str, host: str, port: int, extra: str = "") -> str:
    """``template`` with its top-level ``host``/``port`` values replaced, then ``extra``.

    Only the keys before the first ``[section]`` are touched, and each must occur exactly
    once there: a snippet that no longer has them must fail loudly, not scan elsewhere.
    """
    match = re.search(r"^\[", template, re.MULTILINE)
    head, tail = (template[:match.start()], template[match.start():]) if match else (template, "")
    for key, value in (("host", host), ("port", str(port))):
        head, count = re.subn(rf"^{key}[ \t]*=.*$", f"{key} = {value}", head, flags=re.MULTILINE)
        if count != 1:
            raise LabError(f"rspamd.ini template: expected one top-level '{key} =' line, "
                           f"found {count}")
    text = head + tail
    if extra:
        text = text.rstrip("\n") + "\n\n; --- added by the lab ---\n" + extra.rstrip("\n") + "\n"
    return text


def _ini_key(value: str, what: str) -> str:
    if not _INI_NAME.match(value):
        raise LabError(f"{what} {value!r} cannot be written as an ini key")
    return value


class HarakaLab:
    """One private Haraka; see the module docstring.  Not thread-safe; start from one thread."""

    def __init__(self, workdir: str | os.PathLike[str], *, rspamd_host: str, rspamd_port: int,
                 sink_host: str, sink_port: int, users: Mapping[str, str] | None = None,
                 local_domains: Sequence[str] = DEFAULT_LOCAL_DOMAINS,
                 rspamd_ini_extra: str = "", hostname: str = HOSTNAME,
                 start_timeout: float = DEFAULT_START_TIMEOUT,
                 haraka_root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(workdir) / "haraka"
        self.instance_dir = self.root / "instance"
        self.config_dir = self.instance_dir / "config"
        self.log_dir = self.root / "log"
        self.rspamd_host = rspamd_host
        self.rspamd_port = rspamd_port
        self.sink_host = sink_host
        self.sink_port = sink_port
        self.users = dict(DEFAULT_USERS if users is None else users)
        self.local_domains = tuple(local_domains)
        self.rspamd_ini_extra = rspamd_ini_extra
        self.hostname = hostname
        self.start_timeout = start_timeout
        self.haraka_root = Path(haraka_root) if haraka_root is not None else None
        self.host = LOOPBACK
        self.port = 0
        self.process: ManagedProcess | None = None
        #: seconds the last successful start() took until the 220 banner arrived
        self.last_start_seconds: float | None = None

    # ------------------------------------------------------------------ queries --
    @property
    def log_path(self) -> Path:
        return self.log_dir / "haraka.stdout.log"

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        """Current length of the log in characters: pass it to ``wait_log(since=...)``."""
        return len(self.log_text())

    def wait_log(self, pattern: str, timeout: float = 5.0, *, since: int = 0) -> re.Match[str]:
        """Wait until ``pattern`` (a regex) matches the log after character ``since``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.log_text(), since)
            if found:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(f"Haraka log {self.log_path}: no match for {pattern!r} "
                                   f"within {timeout}s\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        return self.process.tail(lines) if self.process else ""

    # ----------------------------------------------------------------- set-up --
    def _create_instance(self, node: str, binary: Path) -> None:
        if (self.config_dir / "connection.ini").is_file():
            return
        if self.instance_dir.exists():
            shutil.rmtree(self.instance_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run([node, str(binary), "-i", str(self.instance_dir)],
                                  stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                                  env=self._env())
        except subprocess.TimeoutExpired:
            raise LabError(f"haraka -i {self.instance_dir} did not finish in 30 s") from None
        if done.returncode != 0 or not (self.config_dir / "connection.ini").is_file():
            raise LabError(f"haraka -i {self.instance_dir} failed (exit {done.returncode}): "
                           f"{done.stderr.decode(errors='replace')[-2000:]}")

    def _config_files(self) -> dict[str, str]:
        users = "".join(f"{_ini_key(user, 'user')}={password}\n"
                        for user, password in self.users.items())
        template = contrib_rspamd_ini().read_text(encoding="utf-8")
        return {
            "plugins": "".join(f"{name}\n" for name in PLUGINS),
            "smtp.ini": (
                f"listen={self.host}:{self.port}\n"
                "; nodes=0: one process, no cluster (unset means a master plus 1 worker in 3.x)\n"
                "nodes=0\n"
                "; public_ip set: net_utils would otherwise ask a STUN server on the Internet\n"
                f"public_ip={self.host}\n"
                "inactivity_timeout=30\n"),
            "me": f"{self.hostname}\n",
            "host_list": "".join(f"{domain}\n" for domain in self.local_domains),
            "auth_flat_file.ini": f"[core]\nmethods=PLAIN,LOGIN\n\n[users]\n{users}",
            "smtp_forward.ini": (
                f"host={self.sink_host}\n"
                f"port={self.sink_port}\n"
                "; relayed (authenticated) mail too: the queue_outbound hook, no MX lookup\n"
                "enable_outbound=true\n"),
            "rspamd.ini": render_rspamd_ini(template, self.rspamd_host, self.rspamd_port,
                                            self.rspamd_ini_extra),
            "log.ini": "[main]\nlevel=info\ntimestamps=true\nformat=default\n",
        }

    def _write_config(self) -> None:
        for name, text in self._config_files().items():
            (self.config_dir / name).write_text(text, encoding="utf-8")
        plugins = self.instance_dir / "plugins"
        plugins.mkdir(exist_ok=True)
        (plugins / "lab_no_rdns.js").write_text(NO_RDNS_PLUGIN, encoding="utf-8")

    def _env(self) -> dict[str, str]:
        # a small, fixed environment: no proxy variables, no NODE_OPTIONS from the caller
        return {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
                "HOME": str(self.root), "LANG": "C.UTF-8", "NO_COLOR": "1"}

    # ---------------------------------------------------------------- actions --
    def start(self) -> None:
        """Create the instance (once), write the config, start Haraka, wait for its banner."""
        if self.alive():
            return
        node, binary = find_haraka(self.haraka_root)
        self._create_instance(node, binary)
        begin = time.monotonic()
        for attempt in range(3):
            self.port = free_port(self.host)
            self._write_config()
            self.process = ManagedProcess(
                [node, str(binary), "-c", str(self.instance_dir)], name="haraka",
                logdir=self.log_dir, cwd=self.instance_dir, env=self._env())
            since = self.log_size()
            self.process.start()
            try:
                self._wait_banner(time.monotonic() + self.start_timeout)
            except LabError:
                self.process.stop(timeout=5.0)
                if attempt < 2 and _ADDRESS_IN_USE.search(self.log_text()[since:]):
                    continue
                raise
            self.last_start_seconds = time.monotonic() - begin
            return

    def _wait_banner(self, deadline: float) -> None:
        """Until Haraka answers 220 on its port; QUIT, so it logs a clean disconnect."""
        assert self.process is not None
        last = "nothing accepted a connection"
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise LabError(f"Haraka exited (code {self.process.returncode}) before "
                               f"listening on {self.host}:{self.port}\n{self.log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=2.0) as sock:
                    banner = sock.makefile("rb").readline()
                    if banner.startswith(b"220"):
                        sock.sendall(b"QUIT\r\n")
                        return
                    last = f"unexpected banner {banner!r}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.05)
        raise LabError(f"Haraka did not greet on {self.host}:{self.port} in "
                       f"{self.start_timeout}s ({last})\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Haraka (SIGTERM: node exits at once); idempotent."""
        if self.process is not None:
            self.process.stop(timeout=timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> HarakaLab:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "alive" if self.alive() else "stopped"
        return f"<HarakaLab {self.host}:{self.port} {state}>"
