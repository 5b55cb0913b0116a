"""A private Exim 4.96 on a free loopback port, running the project's exim/ configuration.

``EximLab(workdir, spamd_address=..., sink_port=...)`` lays out ``<workdir>/exim/``:

- ``conf/`` holds COPIES of exim/*.conf (exim.conf, main.conf, acl_mail.conf,
  acl_rcpt.conf, acl_data.conf, routers.conf) and ``lab.conf``, the wrapper Exim is started with: it
  defines the SITE_* and EXIM_POLICY_* macros (paths, port, shim address, policy-helper
  address, relay hosts, quarantine) and then
  ``.include``s ``conf/exim.conf`` (or a caller's ``template``).  Copies, because Exim
  started with ``-C`` gives up root and re-executes itself as Debian-exim for every
  delivery, and that user must be able to read every file of the configuration;
- ``users``, ``aliases``, ``passwd``: the lsearch files (mailboxes, aliases/forwardings,
  SMTP AUTH users with crypt(3) SHA-512 hashes made by ``openssl passwd -6``);
- ``spool/``, ``log/{mainlog,paniclog,rejectlog}``, ``mail/<mailbox>/Maildir``, owned by
  Debian-exim.

The local domain is ``lab.test`` (``DOMAIN``), the quarantine ``quarantine@lab.test``; mail
for any other domain goes to the SMTP sink on ``127.0.0.1:sink_port``.  Exim listens on
127.0.0.1 and ::1 on the same port, so a test can connect from ::1 to be a different
client (e.g. one in EXIM_POLICY_RELAY_HOSTS).  Nothing uses DNS (``SITE_OFFLINE``).

EXIM_POLICY_QUERY (acl_rcpt.conf's ``${readsocket}`` spec) is ``query_address`` when
given (``ShimLab.query_address``).  Without it the lab uses ``NO_QUERY_HELPER``, port 0 on
loopback, which always refuses a connection: the helper is then "down", acl_rcpt.conf logs
that once per SMTP connection and splits nothing, so such a lab behaves as a site without
acl_rcpt.conf -- never main.conf's default port, where some other process may listen.

``start()`` checks the configuration (``-bV``), runs ``exim -C lab.conf -bdf`` as root in
its own session (the daemon drops to Debian-exim itself) and waits for the 220 banner,
then says QUIT so that Exim logs no syntax error.  Every subprocess has a deadline.
Facts this relies on (Debian 12, exim4-daemon-heavy 4.96): ``-C`` is allowed for root,
the file must be owned by root and not group/world-writable; every delivery logs
"exim user lost privilege for using -C option" to the paniclog, so an empty paniclog is
no health check here.
"""
from __future__ import annotations

import email
import email.message
import email.policy
import os
import pwd
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..admin_files import AdminFilesError, locate
from .errors import LabError, LabUnavailable
from .ports import LOOPBACK, free_port
from .process import ManagedProcess

EXIM_BINARY = "exim"
EXIM_USER = "Debian-exim"
DOMAIN = "lab.test"
HOSTNAME = "mx.lab.test"
QUARANTINE = f"quarantine@{DOMAIN}"
DEFAULT_USERS = ("bob", "carol", "dave", "quarantine", "postmaster")
DEFAULT_AUTH_USERS: Mapping[str, str] = {"tester": "testpass"}
#: the files of exim/ the lab copies; exim.conf includes the others
CONFIG_FILES = ("exim.conf", "main.conf", "acl_mail.conf", "acl_rcpt.conf", "acl_data.conf",
                "routers.conf", "transports.conf")
LOOPBACK6 = "::1"
#: EXIM_POLICY_QUERY when no helper is given: nothing can listen on port 0
NO_QUERY_HELPER = f"inet:{LOOPBACK}:0"
_LOCAL_PART = re.compile(r"^[a-z0-9][a-z0-9._+-]*$")
_MACRO_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


def find_exim_dir() -> Path:
    """The project's exim/ directory: installed with the package, or of the source checkout
    (exim_policy/admin_files.py)."""
    try:
        here = locate().path("exim")
    except AdminFilesError as exc:
        raise LabUnavailable(str(exc)) from None
    missing = [name for name in CONFIG_FILES if not (here / name).is_file()]
    if missing:
        raise LabUnavailable(f"the exim/ configuration at {here} lacks {', '.join(missing)}; "
                             "reinstall exim-policy")
    return here


def check_prerequisites() -> None:
    """Raise ``LabUnavailable`` naming what to install if this lab cannot run here."""
    if shutil.which(EXIM_BINARY) is None:
        raise LabUnavailable("exim not found: install the Debian package 'exim4-daemon-heavy' "
                             "(sudo apt-get install exim4-daemon-heavy)")
    if os.geteuid() != 0:
        raise LabUnavailable("the Exim lab must run as root (exim -C is honoured for root only)")
    try:
        pwd.getpwnam(EXIM_USER)
    except KeyError:
        raise LabUnavailable(f"no user {EXIM_USER}: install the Debian package "
                             "'exim4-daemon-heavy'") from None
    if shutil.which("openssl") is None:
        raise LabUnavailable("openssl not found: install the Debian package 'openssl'")


def crypt_sha512(password: str, timeout: float = 10.0) -> str:
    """A crypt(3) ``$6$`` hash (what Exim's ``crypteq`` checks), made by ``openssl passwd``."""
    out = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=password + "\n",
                         capture_output=True, text=True, timeout=timeout, check=True)
    return out.stdout.strip()


def free_port_v4_v6(attempts: int = 50) -> int:
    """A port that is free on both 127.0.0.1 and ::1 (Exim binds both)."""
    for _ in range(attempts):
        port = free_port(LOOPBACK)
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
                sock.bind((LOOPBACK6, port))
        except OSError:
            continue
        return port
    raise LabError("no TCP port free on both 127.0.0.1 and ::1")


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK6, 0))
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class BhResult:
    """Output of one ``exim -bh`` run: ``stdout`` has the SMTP replies, ``stderr`` the
    "****" commentary (ACL results, what would have happened)."""

    returncode: int
    stdout: str
    stderr: str

    def replies(self) -> list[str]:
        """The SMTP reply lines, in order (lines starting with three digits)."""
        return [line for line in self.stdout.splitlines() if re.match(r"^\d{3}[ -]", line)]


class EximLab:
    """One Exim instance under ``<workdir>/exim``; see the module docstring."""

    def __init__(self, workdir: str | os.PathLike[str], *, spamd_address: str, sink_port: int,
                 relay_hosts: str = "", local_users: Iterable[str] = DEFAULT_USERS,
                 aliases: Mapping[str, str] | None = None,
                 auth_users: Mapping[str, str] | None = None,
                 extra_macros: Mapping[str, str] | None = None,
                 template: str | None = None, ipv6: bool | None = None,
                 exim_dir: str | os.PathLike[str] | None = None,
                 query_address: str | None = None, receiver_port: int | None = None,
                 release_port: int | None = None) -> None:
        """``relay_hosts``: an Exim host list (``"<; ::1"``) for EXIM_POLICY_RELAY_HOSTS.
        ``aliases``: local part -> redirect data (``"fwd": "ext-fwd@example.com"``).
        ``template``: a whole configuration text to include instead of exim/exim.conf; it
        can use the same SITE_* macros (test of Rspamd's own example ACL).
        ``ipv6``: also listen on ::1 (default: if the machine has IPv6 loopback).
        ``query_address``: EXIM_POLICY_QUERY, the shim's policy helper as a readsocket
        spec (``"inet:127.0.0.1:PORT"`` or a Unix socket path); default: ``NO_QUERY_HELPER``.
        ``receiver_port``: outbound spam goes to the quarantine receiver on this loopback
        port (``ShimLab.quarantine_port``); default: the recipe without a receiver, a
        redirect to ``quarantine@lab.test``.
        ``release_port``: Exim also listens on this port, the unscanned one for
        ``release_via = "smtp:..."`` (EXIM_POLICY_RELEASE_PORT)."""
        self.root = Path(workdir) / "exim"
        self.conf_dir = self.root / "conf"
        self.config_path = self.conf_dir / "lab.conf"
        self.spool_dir = self.root / "spool"
        self.log_dir = self.root / "log"
        self.mail_dir = self.root / "mail"
        self.users_path = self.root / "users"
        self.aliases_path = self.root / "aliases"
        self.passwd_path = self.root / "passwd"
        self.pid_path = self.root / "exim.pid"
        self.spamd_address = spamd_address
        self.sink_port = sink_port
        self.relay_hosts = relay_hosts
        self.local_users = tuple(local_users)
        self.aliases = dict(aliases or {})
        self.auth_users = dict(DEFAULT_AUTH_USERS if auth_users is None else auth_users)
        self.extra_macros = dict(extra_macros or {})
        self.template = template
        self.ipv6 = ipv6_loopback_available() if ipv6 is None else ipv6
        self.exim_dir = Path(exim_dir) if exim_dir is not None else None
        self.query_address = query_address or NO_QUERY_HELPER
        self.receiver_port = receiver_port
        self.release_port = release_port
        self.port = 0
        self.process: ManagedProcess | None = None
        for name in (*self.local_users, *self.aliases):
            if not _LOCAL_PART.match(name):
                raise ValueError(f"not a plain local part: {name!r}")
        for name in self.extra_macros:
            if not _MACRO_NAME.match(name):
                raise ValueError(f"not an Exim macro name: {name!r}")

    # ------------------------------------------------------------------ queries --
    @property
    def quarantine(self) -> str:
        return QUARANTINE

    @property
    def mainlog_path(self) -> Path:
        return self.log_dir / "mainlog"

    @property
    def mainlog(self) -> str:
        """The whole main log so far ("" before the first line)."""
        try:
            return self.mainlog_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def paniclog(self) -> str:
        try:
            return (self.log_dir / "paniclog").read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def maildir_files(self, user: str) -> list[Path]:
        """Delivered files of one mailbox (new/ and cur/), oldest first."""
        base = self.mail_dir / user / "Maildir"
        files = [p for sub in ("new", "cur") if (base / sub).is_dir()
                 for p in (base / sub).iterdir() if p.is_file()]
        return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))

    def maildir_messages(self, user: str) -> list[email.message.EmailMessage]:
        """Delivered messages of one mailbox, parsed, oldest first."""
        return [email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
                for p in self.maildir_files(user)]

    def wait_maildir(self, user: str, count: int, timeout: float = 15.0
                     ) -> list[email.message.EmailMessage]:
        """Wait until ``user`` holds at least ``count`` messages; returns them all."""
        deadline = time.monotonic() + timeout
        while len(self.maildir_files(user)) < count:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"mailbox {user}: {len(self.maildir_files(user))} message(s)"
                                   f" after {timeout}s, expected {count}\n{self.log_tail()}")
            time.sleep(0.05)
        return self.maildir_messages(user)

    def log_lines(self, message_id: str) -> list[str]:
        """Main-log lines of one Exim message id."""
        return [line for line in self.mainlog.splitlines() if f" {message_id} " in line]

    def wait_log(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        """Wait until the main log matches the regular expression ``pattern``."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.mainlog)
            if found:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(f"exim mainlog: no match for {pattern!r} after {timeout}s\n"
                                   f"{self.log_tail()}")
            time.sleep(0.05)

    def wait_completed(self, message_id: str, timeout: float = 15.0) -> list[str]:
        """Wait until Exim logged "Completed" for ``message_id``; returns its log lines."""
        self.wait_log(rf"^\S+ \S+ {re.escape(message_id)} Completed$", timeout)
        return self.log_lines(message_id)

    def log_tail(self, lines: int = 25) -> str:
        text = "\n".join(self.mainlog.splitlines()[-lines:])
        return f"--- {self.mainlog_path} ---\n{text}"

    # ----------------------------------------------------------------- set-up --
    def _macros(self) -> dict[str, str]:
        interfaces = f"<; {LOOPBACK} ; {LOOPBACK6}" if self.ipv6 else f"<; {LOOPBACK}"
        spamd = self.spamd_address if "tmo=" in self.spamd_address \
            else f"{self.spamd_address} tmo=30s"
        # Order matters: Exim refuses a macro whose name contains an earlier one's name.
        macros = {
            "SITE_OFFLINE": "yes",
            "SITE_HOSTNAME": HOSTNAME,
            "SITE_DOMAINS": DOMAIN,
            "SITE_QUALIFY_DOMAIN": DOMAIN,
            "SITE_PORTS": str(self.port) + (f" : {self.release_port}" if self.release_port
                                             else ""),
            "SITE_INTERFACES": interfaces,
            "SITE_SPOOL": str(self.spool_dir),
            "SITE_LOG_PATH": f"{self.log_dir}/%slog",
            "SITE_PID": str(self.pid_path),
            "SITE_USERS": str(self.users_path),
            "SITE_ALIASES": str(self.aliases_path),
            "SITE_PASSWD": str(self.passwd_path),
            "SITE_MAILDIR": str(self.mail_dir),
            "SITE_MAIL_USER": EXIM_USER,
            # loopback only, and smtplib speaks AUTH without TLS
            "SITE_AUTH_HOSTS": "*",
            "SITE_TLS_HOSTS": "",
            "SITE_SMARTHOST": LOOPBACK,
            "SITE_RELAY_PORT": str(self.sink_port),
            "EXIM_POLICY_SPAMD": spamd,
            "EXIM_POLICY_RECEIVER_HOSTS": LOOPBACK if self.receiver_port else "",
            "EXIM_POLICY_RECEIVER_PORT": str(self.receiver_port or 0),
            "EXIM_POLICY_RELEASE_PORT": str(self.release_port or 0),
            "EXIM_POLICY_QUARANTINE": QUARANTINE,
            "EXIM_POLICY_RELAY_HOSTS": self.relay_hosts,
            "EXIM_POLICY_QUERY": self.query_address,
        }
        macros.update(self.extra_macros)
        return macros

    def _wrapper_text(self) -> str:
        lines = ["# generated by exim_policy.lab.exim: lab macros, then the configuration",
                 *(f"{name} = {value}" for name, value in self._macros().items()),
                 "",
                 "# a taken port must fail the start at once (default: 9 retries, 30 s apart)",
                 "daemon_startup_retries = 0",
                 "# keep a failed lab delivery in the queue only briefly",
                 "ignore_bounce_errors_after = 0s",
                 "timeout_frozen_after = 1h",
                 "",
                 f".include {self.conf_dir / ('template.conf' if self.template else 'exim.conf')}",
                 ""]
        return "\n".join(lines)

    def _write(self, path: Path, text: str, mode: int = 0o644, group: int | None = None) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.chown(tmp, 0, group if group is not None else 0)
        os.chmod(tmp, mode)
        os.replace(tmp, path)

    def _check_traversable(self) -> None:
        """Debian-exim must reach the config and lookup files: every parent needs o+x."""
        for parent in [self.root, *self.root.parents]:
            if parent.exists() and not os.stat(parent).st_mode & 0o001:
                raise LabError(f"{parent} is not searchable by others (mode "
                               f"{oct(os.stat(parent).st_mode & 0o777)}); Exim re-executes "
                               f"as {EXIM_USER} and could not read its configuration. "
                               "Use a work dir under a world-searchable path (e.g. "
                               "tempfile.mkdtemp() + chmod 0755).")

    def prepare(self) -> None:
        """Write the configuration and lookup files and create the directories."""
        check_prerequisites()
        source = self.exim_dir or find_exim_dir()
        exim_pw = pwd.getpwnam(EXIM_USER)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self._check_traversable()
        self.conf_dir.mkdir(exist_ok=True)
        os.chmod(self.conf_dir, 0o755)
        if not self.port:
            self.port = free_port_v4_v6() if self.ipv6 else free_port(LOOPBACK)
        for name in CONFIG_FILES:
            self._write(self.conf_dir / name, (source / name).read_text(encoding="utf-8"))
        if self.template is not None:
            self._write(self.conf_dir / "template.conf", self.template)
        self._write(self.config_path, self._wrapper_text())
        self._write(self.users_path, "# local part: mailbox directory (untainted)\n"
                    + "".join(f"{u}: {u}\n" for u in self.local_users))
        self._write(self.aliases_path, "# local part: redirect data\n"
                    + "".join(f"{k}: {v}\n" for k, v in self.aliases.items()))
        self._write(self.passwd_path, "# user: crypt(3) hash\n"
                    + "".join(f"{u}: {crypt_sha512(p)}\n" for u, p in self.auth_users.items()),
                    mode=0o640, group=exim_pw.pw_gid)
        for path in (self.spool_dir, self.log_dir, self.mail_dir):
            path.mkdir(exist_ok=True)
            os.chown(path, exim_pw.pw_uid, exim_pw.pw_gid)
            os.chmod(path, 0o750 if path != self.mail_dir else 0o755)
        self.check_config()

    def exim(self, *args: str, input: str | None = None, timeout: float = 30.0
             ) -> subprocess.CompletedProcess[str]:
        """Run ``exim -C lab.conf ARGS`` and return its output (never raises on exit code)."""
        try:
            return subprocess.run([EXIM_BINARY, "-C", str(self.config_path), *args],
                                  input=input, capture_output=True, text=True,
                                  timeout=timeout, stdin=None if input is not None
                                  else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"exim {' '.join(args)}: no result within {timeout}s") from exc

    def check_config(self) -> str:
        """``exim -bV``; raises ``LabError`` with Exim's complaint if the config is bad."""
        result = self.exim("-bV")
        if result.returncode != 0:
            raise LabError(f"exim -C {self.config_path} -bV failed:\n"
                           f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
        return result.stdout

    # ---------------------------------------------------------------- actions --
    def start(self, timeout: float = 15.0) -> None:
        """Prepare (first time), start the daemon and wait for its 220 banner.

        The port was free when it was picked, but another process may take it before Exim
        binds it; then (first start only) a new port is picked and the start retried.
        """
        if self.alive():
            return
        first = not self.config_path.exists()
        for attempt in range(3 if first else 1):
            if first:
                self.port = 0 if attempt else self.port
                self.prepare()
            error = self._launch(timeout)
            if not error:
                return
            if "Address already in use" not in error:
                break
        raise LabError(error)

    def _launch(self, timeout: float) -> str:
        """Start the daemon and wait for the banner; "" on success, else why not."""
        panic_offset = len(self.paniclog)
        self.process = ManagedProcess([EXIM_BINARY, "-C", str(self.config_path), "-bdf"],
                                      name="exim", logdir=self.root)
        self.process.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._banner_ok():
                return ""
            if not self.process.alive():
                break
            time.sleep(0.05)
        died = not self.process.alive()
        self.process.stop(5.0)
        why = f"exited (status {self.process.returncode})" if died else \
            f"sent no 220 banner within {timeout}s"
        return (f"exim daemon {why} on {LOOPBACK}:{self.port}\n{self.process.tail()}\n"
                f"{self.log_tail()}\n--- paniclog ---\n{self.paniclog[panic_offset:][-1500:]}")

    def _banner_ok(self) -> bool:
        """Read the 220 banner, then QUIT (a bare connect-and-close logs a syntax error)."""
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=2.0) as sock:
                data = b""
                while b"\n" not in data:
                    chunk = sock.recv(512)
                    if not chunk:
                        return False
                    data += chunk
                sock.sendall(b"QUIT\r\n")
                try:
                    sock.recv(512)
                except OSError:
                    pass
                return data.startswith(b"220")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the daemon (its process group: also running deliveries), then SIGKILL."""
        if self.process is not None:
            self.process.stop(timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    def queue_count(self) -> int:
        """Messages in the queue (``-bpc``)."""
        result = self.exim("-bpc")
        if result.returncode != 0 or not result.stdout.strip().isdigit():
            raise LabError(f"exim -bpc failed: {result.stdout}{result.stderr}")
        return int(result.stdout.strip())

    def queue_list(self) -> str:
        """``-bp`` output: one block per queued message."""
        return self.exim("-bp").stdout

    def flush_queue(self, timeout: float = 60.0) -> None:
        """Try every queued message now (``-qf``: a queue run that also forces retries)."""
        result = self.exim("-qf", timeout=timeout)
        if result.returncode != 0:
            raise LabError(f"exim -qf failed: {result.stdout}{result.stderr}")

    def bh(self, session_text: str, ip: str = LOOPBACK, timeout: float = 60.0) -> BhResult:
        """Run an SMTP session through ``exim -bh IP`` (all ACLs, including the scan; no
        delivery). ``session_text`` is what the client says, LF or CRLF line ends."""
        result = self.exim("-bh", ip, input=session_text, timeout=timeout)
        return BhResult(result.returncode, result.stdout, result.stderr)

    def __enter__(self) -> EximLab:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<EximLab {LOOPBACK}:{self.port} {'alive' if self.alive() else 'stopped'}>"
