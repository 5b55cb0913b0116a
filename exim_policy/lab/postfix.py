"""A private Postfix 3.7 on a free loopback port, run from the unpacked Debian package.

On Debian, installing postfix removes exim4 (both provide mail-transport-agent), so the lab
never installs it: ``contrib/setup-postfix.sh`` unpacks the .debs (``dpkg -x``) into
``/var/cache/exim-policy-lab/postfix`` (``$EXIM_POLICY_LAB_POSTFIX_DIR``) and creates the
accounts Postfix runs as, ``_eplab-postfix`` (mail_owner) and group ``_eplab-postdrop``
(setgid_group), named so they cannot clash with a real Postfix.

``PostfixLab(workdir, milter=..., relay_port=...)`` lays out ``<workdir>/postfix/``:

- ``etc/``: main.cf, master.cf, dynamicmaps.cf and postfix-files (meta_directory),
  ``sasl/smtpd.conf`` and ``sasl/sasldb2`` (Debian's build reads SASL settings from
  ``$config_directory/sasl/`` and ignores cyrus_sasl_config_path);
- ``queue/`` (queue_directory, root-owned; Postfix creates its subdirectories), ``data/``
  (data_directory, mail_owner's), ``log/postfix.log`` (maillog_file, written by postlogd).

main.cf keeps Postfix off the network: no DNS at all (``disable_dns_lookups``,
``smtp_dns_support_level = disabled``, ``smtp_host_lookup = native`` -- /etc/hosts only --,
``smtpd_peername_lookup = no``), IPv4 loopback only, a fixed ``myhostname``.  Nothing is
delivered locally: ``mydestination`` is empty, the local domains are ``relay_domains``, and
every transport is ``smtp:[relay_host]:relay_port`` (the SMTP sink).  Relaying needs SMTP
AUTH (PLAIN/LOGIN against the sasldb, plaintext allowed: there is no TLS on loopback).
The milter lines are contrib/postfix/main.cf with the milter address substituted, and the
submission service is contrib/postfix/master.cf on a second free port (no chroot, no TLS
requirement), so the lab runs what an admin installs.

``start()`` runs ``postfix check`` (creates the queue directories, as ``postfix start``
does), then the master in the foreground (``master -s``) under ``ManagedProcess``, so it is
stopped by pid and dies with the test run; it waits for the 220 banner of both listeners
and fails early with the log tail.  The unpacked libraries (libpostfix-*.so, RUNPATH
/usr/lib/postfix) are found through LD_LIBRARY_PATH, which main.cf's import_environment
passes on to every daemon.  ``postqueue``/``postsuper`` run as root with a deadline.

Facts this relies on (Postfix 3.7.11 from Debian 12, unpacked): ``postfix check`` refuses
``manpage_directory = no``; ``postqueue -f`` says "mail system is down" unless master.cf has
``pickup``; postqueue/postdrop are not set-gid in the unpacked tree (``postfix check`` warns),
so only root can queue or list mail -- the lab always runs them as root; a milter
QUARANTINE is logged as "milter-hold: ... milter triggers HOLD action" (Rspamd's reason text
is not logged) and the client gets 250; milters do not see the ``Received:`` header Postfix
adds; every Postfix program sleeps (300 ms steps, ~2 s) while main.cf is younger than a
second, so the lab backdates the files it writes.
"""
from __future__ import annotations

import grp
import json
import os
import platform
import pwd
import re
import shutil
import smtplib
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .contrib import read_contrib, substitute_setting
from .errors import LabError, LabUnavailable
from .ports import LOOPBACK, free_port
from .process import ManagedProcess, log_tail_since

DEFAULT_TREE = "/var/cache/exim-policy-lab/postfix"
TREE_ENV = "EXIM_POLICY_LAB_POSTFIX_DIR"
MAIL_OWNER = "_eplab-postfix"
SETGID_GROUP = "_eplab-postdrop"
SETUP_HINT = "run, as root: bash contrib/setup-postfix.sh"
HOSTNAME = "postfix.lab.test"
#: what the readiness probe says in EHLO
PROBE_HELO = "probe.lab.test"
DEFAULT_USERS: Mapping[str, str] = {"alice@example.com": "secret"}
DEFAULT_LOCAL_DOMAINS = ("example.com", "lab.test")
#: the admin's files the lab runs (contrib/postfix/)
CONTRIB_MAIN_CF = "postfix/main.cf"
CONTRIB_MASTER_CF = "postfix/master.cf"
DEFAULT_START_TIMEOUT = 30.0
_COMMAND_TIMEOUT = 20.0
_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")
_BIND_FAILURE = re.compile(r"bind .*: Address already in use", re.IGNORECASE)


@dataclass(frozen=True)
class QueuedMessage:
    """One entry of ``postqueue -j``: queue_name is "hold", "active", "deferred", ..."""

    queue_name: str
    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    message_size: int
    raw: Mapping[str, object]


def tree_dir() -> Path:
    return Path(os.environ.get(TREE_ENV) or DEFAULT_TREE)


def check_prerequisites(tree: Path | None = None, euid: int | None = None) -> None:
    """Raise ``LabUnavailable`` naming the setup script if Postfix cannot be run here."""
    tree = tree or tree_dir()
    if (os.geteuid() if euid is None else euid) != 0:
        raise LabUnavailable("the Postfix lab must run as root (its master starts as root "
                             "and drops to the mail_owner): run the tests with sudo")
    for binary in ("usr/sbin/postfix", "usr/sbin/postqueue", "usr/lib/postfix/sbin/master",
                   "usr/sbin/saslpasswd2"):
        if not os.access(tree / binary, os.X_OK):
            raise LabUnavailable(f"Postfix is not unpacked: {tree / binary} missing; {SETUP_HINT}")
    try:
        pwd.getpwnam(MAIL_OWNER)
        grp.getgrnam(SETGID_GROUP)
    except KeyError:
        raise LabUnavailable(f"user {MAIL_OWNER} or group {SETGID_GROUP} missing; "
                             f"{SETUP_HINT}") from None
    if shutil.which("setpriv") is None:
        raise LabUnavailable("setpriv not found: install the Debian package 'util-linux'")


def _multiarch() -> str:
    return f"{platform.machine()}-linux-gnu"


def render_milter_lines(template: str, milter: str) -> str:
    """contrib/postfix/main.cf with ``smtpd_milters`` pointing at ``milter``."""
    return substitute_setting(template, r"smtpd_milters\s*=.*", f"smtpd_milters = {milter}",
                              what="main.cf smtpd_milters")


def render_submission(template: str, listen: str) -> str:
    """contrib/postfix/master.cf's submission entry listening on ``listen``, without chroot
    and with the TLS requirement lifted (the lab has no certificate; -o: the last one wins)."""
    lines = [line for line in template.splitlines() if line.strip() and not line.startswith("#")]
    fields = lines[0].split()
    if len(fields) != 8 or fields[0] != "submission" or fields[7] != "smtpd":
        raise LabError(f"{CONTRIB_MASTER_CF}: unexpected service line {lines[0]!r}")
    fields[0], fields[4] = listen, "n"
    lab_overrides = ["  -o smtpd_tls_security_level=none", "  -o smtpd_tls_auth_only=no"]
    return "\n".join([" ".join(fields), *lines[1:], *lab_overrides]) + "\n"


class PostfixLab:
    """One private Postfix; see the module docstring.  Start and stop from one thread.

    ``milter`` is the ``smtpd_milters`` value (``RspamdProxyLab.milter_address``), or None
    for no milter.  ``port`` is the inbound smtpd, ``submission_port`` the submission one
    (``MTA-Name: ORIGINATING``); both offer AUTH.
    """

    def __init__(self, workdir: str | os.PathLike[str], *, milter: str | None,
                 relay_port: int, relay_host: str = LOOPBACK,
                 users: Mapping[str, str] = DEFAULT_USERS,
                 local_domains: Iterable[str] = DEFAULT_LOCAL_DOMAINS,
                 hostname: str = HOSTNAME, extra_main_cf: Mapping[str, str] | None = None,
                 start_timeout: float = DEFAULT_START_TIMEOUT,
                 tree: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(workdir) / "postfix"
        self.etc_dir = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.log_dir = self.root / "log"
        self.log_path = self.log_dir / "postfix.log"
        self.tree = Path(tree) if tree is not None else tree_dir()
        self.milter = milter
        self.relay_host = relay_host
        self.relay_port = relay_port
        self.users = dict(users)
        self.local_domains = tuple(d.lower() for d in local_domains)
        for domain in self.local_domains:
            if not _DOMAIN.match(domain):
                raise ValueError(f"not a domain name: {domain!r}")
        self.hostname = hostname
        self.extra_main_cf = dict(extra_main_cf or {})
        self.start_timeout = start_timeout
        self.host = LOOPBACK
        self.port = 0
        self.submission_port = 0
        self.process: ManagedProcess | None = None
        self._ever_started = False
        #: seconds the last successful start() took until both banners arrived
        self.last_start_seconds: float | None = None

    # ------------------------------------------------------------------ queries --
    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    @property
    def lib_path(self) -> str:
        """LD_LIBRARY_PATH for the unpacked binaries (and libraries setup unpacked beside them)."""
        return ":".join(str(self.tree / d) for d in ("usr/lib/postfix", f"usr/lib/{_multiarch()}",
                                                     f"lib/{_multiarch()}"))

    @property
    def sasl_path(self) -> str:
        """SASL_PATH: plugins unpacked by setup first, then the installed ones."""
        return f"{self.tree}/usr/lib/{_multiarch()}/sasl2:/usr/lib/{_multiarch()}/sasl2"

    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C",
                "LD_LIBRARY_PATH": self.lib_path, "SASL_PATH": self.sasl_path,
                "MAIL_CONFIG": str(self.etc_dir)}

    def log_tail(self, lines: int = 30) -> str:
        text = ""
        if self.log_path.exists():
            with open(self.log_path, "rb") as fh:
                fh.seek(max(0, self.log_path.stat().st_size - 64 * 1024))
                text = "\n".join(fh.read().decode("utf-8", "replace").splitlines()[-lines:])
        proc = self.process.tail(lines) if self.process else ""
        return f"--- {self.log_path} ---\n{text}\n{proc}".rstrip()

    def log_text(self) -> str:
        return self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""

    # ----------------------------------------------------------------- set-up --
    def _bin(self, name: str) -> str:
        return str(self.tree / "usr/sbin" / name)

    def main_cf(self) -> str:
        """The whole main.cf: the lab's offline settings, then contrib/postfix/main.cf."""
        tree, relay = self.tree, f"[{self.relay_host}]:{self.relay_port}"
        env = " ".join(f"{k}={v}" for k, v in (("LD_LIBRARY_PATH", self.lib_path),
                                               ("SASL_PATH", self.sasl_path)))
        settings: dict[str, str] = {
            "compatibility_level": "3.6",
            # the unpacked package and this lab's own directories
            "command_directory": f"{tree}/usr/sbin",
            "daemon_directory": f"{tree}/usr/lib/postfix/sbin",
            "shlib_directory": f"{tree}/usr/lib/postfix",
            "meta_directory": str(self.etc_dir),
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "sendmail_path": f"{tree}/usr/sbin/sendmail",
            "newaliases_path": f"{tree}/usr/bin/newaliases",
            "mailq_path": f"{tree}/usr/bin/mailq",
            "html_directory": "no", "manpage_directory": f"{tree}/usr/share/man",
            "readme_directory": "no", "sample_directory": str(self.etc_dir),
            "mail_owner": MAIL_OWNER,
            "setgid_group": SETGID_GROUP,
            # daemons get a clean environment: the libraries must be named here
            "import_environment": f"MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C "
                                  f"POSTLOG_SERVICE POSTLOG_HOSTNAME {env}",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.log_dir),
            # offline: no DNS, no reverse lookups, loopback only, a fixed name
            "myhostname": self.hostname,
            "mydomain": "lab.test",
            "myorigin": "$myhostname",
            "inet_interfaces": self.host,
            "inet_protocols": "ipv4",
            "mynetworks": f"{self.host}/32",
            "disable_dns_lookups": "yes",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "lmtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "biff": "no",
            "append_dot_mydomain": "no",
            # nothing is delivered here: local domains and relayed mail go to the sink
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "", "alias_database": "",
            "relay_domains": " ".join(self.local_domains),
            "relay_recipient_maps": "",
            "relayhost": relay,
            "default_transport": f"smtp:{relay}",
            "relay_transport": f"smtp:{relay}",
            "local_transport": "error:5.1.1 local delivery is off in the lab",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            # SMTP AUTH (Cyrus, sasldb) in plaintext: loopback, no certificate
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "cyrus",
            "smtpd_sasl_path": "smtpd",
            "smtpd_sasl_security_options": "noanonymous",
            "smtpd_sasl_local_domain": "",
            "smtpd_tls_auth_only": "no",
            "smtpd_relay_restrictions": "permit_sasl_authenticated, reject_unauth_destination",
            "smtpd_recipient_restrictions": "",
            # tests: no sleeping after errors, quick retries of the sink
            "smtpd_error_sleep_time": "0",
            "smtpd_soft_error_limit": "100",
            "smtpd_hard_error_limit": "200",
            "in_flow_delay": "0",
            "queue_run_delay": "2s",
            "minimal_backoff_time": "2s",
            "maximal_backoff_time": "10s",
            "smtp_connect_timeout": "5s",
            "delay_warning_time": "0",
            **self.extra_main_cf,
        }
        lines = ["# written by exim_policy.lab.postfix; rewritten at every start"]
        lines += [f"{key} = {value}".rstrip() for key, value in settings.items()]
        lines.append("")
        lines.append(f"# ---- {CONTRIB_MAIN_CF} (milter address substituted) ----")
        if self.milter is not None:
            lines.append(render_milter_lines(read_contrib(CONTRIB_MAIN_CF), self.milter))
        return "\n".join(lines) + "\n"

    def master_cf(self) -> str:
        """Only the services the lab uses, none chrooted; smtpd on 127.0.0.1:port."""
        services = [
            (f"{self.host}:{self.port}", "inet", "n", "-", "n", "-", "-", "smtpd"),
            # pickup: sendmail/maildrop, and `postqueue -f` calls the system down without it
            ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
            ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
            ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
            ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
            ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
            ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
            ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
            ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
            ("error", "unix", "-", "-", "n", "-", "-", "error"),
            ("retry", "unix", "-", "-", "n", "-", "-", "error"),
            ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
            ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
            ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
            ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
        ]
        text = "# written by exim_policy.lab.postfix; rewritten at every start\n"
        text += "".join(" ".join(f"{field:<10}" for field in row).rstrip() + "\n"
                        for row in services)
        text += f"# ---- {CONTRIB_MASTER_CF} (listen address, chroot, TLS changed) ----\n"
        text += render_submission(read_contrib(CONTRIB_MASTER_CF),
                                  f"{self.host}:{self.submission_port}")
        return text

    def _sasl_conf(self) -> str:
        return ("pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\n"
                f"sasldb_path: {self.etc_dir / 'sasl' / 'sasldb2'}\n")

    def _pick_ports(self) -> None:
        self.port = free_port(self.host)
        self.submission_port = free_port(self.host)
        while self.submission_port == self.port:
            self.submission_port = free_port(self.host)

    def _prepare(self) -> None:
        """(Re)write etc/ (config, sasldb); create queue/data/log with the owners Postfix wants."""
        owner = pwd.getpwnam(MAIL_OWNER)
        for path in (self.root, self.etc_dir, self.queue_dir, self.log_dir):
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, 0, 0)
            os.chmod(path, 0o755)  # root-owned, traversable by the mail_owner
        self.data_dir.mkdir(exist_ok=True)
        os.chown(self.data_dir, owner.pw_uid, owner.pw_gid)
        os.chmod(self.data_dir, 0o700)
        shutil.copy(self.tree / "etc/postfix/postfix-files", self.etc_dir / "postfix-files")
        shutil.copy(self.tree / "usr/share/postfix/dynamicmaps.cf", self.etc_dir / "dynamicmaps.cf")
        for name, text in (("main.cf", self.main_cf()), ("master.cf", self.master_cf())):
            path = self.etc_dir / name
            path.write_text(text, encoding="utf-8")
            # Postfix re-reads a main.cf modified within the last second, 300 ms at a time,
            # until it is older (a guard against half-written files): ~2 s per start
            past = time.time() - 10
            os.utime(path, (past, past))
        self._write_sasldb()
        blocked = _untraversable(self.root, owner.pw_uid, owner.pw_gid)
        if blocked is not None:
            raise LabError(f"{self.root} is not reachable by user {MAIL_OWNER}: {blocked} has "
                           f"mode {blocked.stat().st_mode & 0o777:04o} (chmod 755 it)")

    def _write_sasldb(self) -> None:
        """sasl/smtpd.conf and a fresh sasldb2 with ``users``, readable by the mail_owner."""
        sasl_dir = self.etc_dir / "sasl"
        if sasl_dir.exists():
            shutil.rmtree(sasl_dir)
        sasl_dir.mkdir(mode=0o755)
        (sasl_dir / "smtpd.conf").write_text(self._sasl_conf(), encoding="utf-8")
        sasldb = sasl_dir / "sasldb2"
        for address, password in self.users.items():
            user, _, realm = address.rpartition("@")
            if not user:
                user, realm = address, self.hostname
            self._run([self._bin("saslpasswd2"), "-p", "-c", "-f", str(sasldb), "-u", realm, user],
                      stdin=password.encode())
        if not sasldb.exists():  # no users: an empty db keeps the plugin quiet
            sasldb.touch()
        os.chown(sasldb, 0, pwd.getpwnam(MAIL_OWNER).pw_gid)  # smtpd reads it as mail_owner
        os.chmod(sasldb, 0o640)

    def _run(self, argv: list[str], *, stdin: bytes | None = None,
             timeout: float = _COMMAND_TIMEOUT) -> str:
        """Run a Postfix/SASL tool as root with the lab's environment; its output, or LabError."""
        try:
            done = subprocess.run(argv, input=stdin, capture_output=True, env=self.env(),
                                  timeout=timeout, cwd=self.root,
                                  stdin=None if stdin is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise LabError(f"{argv[0]} did not finish within {timeout:.0f}s") from None
        output = (done.stdout + done.stderr).decode("utf-8", "replace")
        if done.returncode != 0:
            raise LabError(f"{' '.join(argv)} exited with status {done.returncode}:\n"
                           f"{output}\n{self.log_tail(15)}".rstrip())
        return done.stdout.decode("utf-8", "replace")

    def postconf(self, *args: str) -> str:
        return self._run([self._bin("postconf"), "-c", str(self.etc_dir), *args])

    # ---------------------------------------------------------------- actions --
    def start(self) -> None:
        """Start Postfix and wait for both 220 banners; ``LabError`` with the log tail if not.

        Ports are chosen on the first start and kept afterwards; a first start that loses a
        port race retries with new ports.
        """
        check_prerequisites(self.tree)
        if self.alive():
            return
        error = ""
        for _attempt in range(1 if self._ever_started else 3):
            if not self._ever_started:
                self._pick_ports()
            self._prepare()
            error = self._launch_and_wait()
            if not error:
                self._ever_started = True
                return
            if not _BIND_FAILURE.search(error):
                break
        raise LabError(error)

    def _launch_and_wait(self) -> str:
        """Check, start the master, wait for the banners; "" on success, else an error text."""
        started = time.monotonic()
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        try:
            # what `postfix start` does first: create missing queue dirs, check queue files
            self._run([self._bin("postfix"), "-c", str(self.etc_dir), "check"])
        except LabError as exc:
            return f"postfix check failed: {exc}"
        master = str(self.tree / "usr/lib/postfix/sbin/master")
        self.process = ManagedProcess([master, "-c", str(self.etc_dir), "-s"], name="postfix",
                                      logdir=self.root, env=self.env())
        self.process.start()
        deadline = started + self.start_timeout
        pending = [self.port, self.submission_port]
        while pending and time.monotonic() < deadline and self.process.alive():
            if _banner(self.host, pending[0]):
                pending.pop(0)
            else:
                time.sleep(0.05)
        if not pending:
            self.last_start_seconds = time.monotonic() - started
            return ""
        died = not self.process.alive()
        self.process.stop(5.0)
        why = (f"master exited with status {self.process.returncode}" if died
               else f"no 220 banner on {self.host}:{pending[0]} within {self.start_timeout:.0f}s")
        new_log = log_tail_since(self.log_path, log_offset)
        return (f"postfix: {why}; log {self.log_path}:\n{new_log}\n"
                f"{self.process.tail(15)}").rstrip()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the master (SIGTERM: it stops its daemons, like ``postfix abort``)."""
        if self.process is not None:
            self.process.stop(timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    # ------------------------------------------------------------------ queue --
    def queue(self) -> list[QueuedMessage]:
        """Every queued message (``postqueue -j``), in all queues."""
        out = self._run([self._bin("postqueue"), "-c", str(self.etc_dir), "-j"])
        messages = []
        for line in out.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            messages.append(QueuedMessage(
                queue_name=item["queue_name"], queue_id=item["queue_id"],
                sender=item.get("sender", ""),
                recipients=tuple(r["address"] for r in item.get("recipients", ())),
                message_size=int(item.get("message_size", 0)), raw=item))
        return messages

    def hold_queue(self) -> list[QueuedMessage]:
        """The messages in the hold queue (where a milter QUARANTINE puts them)."""
        return [m for m in self.queue() if m.queue_name == "hold"]

    def wait_hold(self, count: int = 1, timeout: float = 10.0) -> list[QueuedMessage]:
        """Wait until the hold queue has at least ``count`` messages; returns it (maybe shorter)."""
        deadline = time.monotonic() + timeout
        while True:
            held = self.hold_queue()
            if len(held) >= count or time.monotonic() >= deadline:
                return held
            time.sleep(0.1)

    def message(self, queue_id: str) -> bytes:
        """Headers and body of a queued message (``postcat -bh -q``)."""
        return self._run([self._bin("postcat"), "-c", str(self.etc_dir), "-bh", "-q",
                          queue_id]).encode("utf-8", "surrogateescape")

    def release(self, queue_id: str) -> None:
        """Move a held message back to the incoming queue (``postsuper -H``) and flush."""
        self._run([self._bin("postsuper"), "-c", str(self.etc_dir), "-H", queue_id])
        self.flush()

    def delete(self, queue_id: str = "ALL", queue_name: str | None = None) -> None:
        """``postsuper -d`` one message, or ALL (optionally only of one queue, e.g. "hold")."""
        self._run([self._bin("postsuper"), "-c", str(self.etc_dir), "-d", queue_id,
                   *([queue_name] if queue_name else [])])

    def flush(self) -> None:
        """Attempt to deliver every deferred message now (``postqueue -f``)."""
        self._run([self._bin("postqueue"), "-c", str(self.etc_dir), "-f"])

    def __repr__(self) -> str:
        return (f"<PostfixLab smtpd {self.host}:{self.port} submission {self.submission_port} "
                f"{'alive' if self.alive() else 'stopped'}>")


def _banner(host: str, port: int, timeout: float = 2.0) -> bool:
    """True if ``host:port`` greets with 220 (then QUIT, so Postfix logs no lost connection)."""
    try:
        # local_hostname: smtplib would otherwise ask the resolver (getfqdn) for our name
        with smtplib.SMTP(host, port, local_hostname=PROBE_HELO, timeout=timeout) as client:
            client.quit()
            return True
    except (OSError, smtplib.SMTPException):
        return False


def _untraversable(path: Path, uid: int, gid: int) -> Path | None:
    """The first ancestor of ``path`` the mail_owner cannot traverse, or None."""
    for parent in [*reversed(path.parents), path]:
        st = parent.stat()
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bit:
            return parent
    return None
