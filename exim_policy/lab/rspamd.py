"""A private, loopback-only Rspamd 3.4 started from the Debian package's binary and config.

``RspamdLab(workdir, dns_port=N)`` lays out ``<workdir>/rspamd/{etc,maps,db,run,log}``:

- ``etc`` is a copy of /etc/rspamd plus ``local.d`` overrides: DNS goes only to the lab's
  NXDOMAIN responder (``dns_port``), test patterns are on (GTUBE variants YJS/ZJS/AJS give
  add header / rewrite subject / no action), the normal worker (count 1) and the controller
  listen on free 127.0.0.1 ports, the proxy is off, logging goes to ``log/rspamd.log``, and
  the modules that only make sense with network access are off.  fuzzy_check *must* be off:
  it resolves its servers through libc (i.e. the system resolver) while the config loads.
- ``maps`` holds file maps, addressed from the config as ``${MAPSDIR}/name``.  The
  ``TEST_SPAM_HEADER`` multimap rule (header ``X-Test-Spam`` in ``test_spam_header.map``,
  which contains ``add-header``; score 7.0) gives a deterministic "add header" verdict that,
  unlike GTUBE, does not skip the other rules.
- hyperscan blobs go to a persistent cache shared by all labs on the machine
  (``/var/cache/exim-policy-lab/rspamd-hs``, or ``$EXIM_POLICY_LAB_HS_CACHE``): the blobs
  are keyed by hash, and a warm start takes ~0.5 s instead of ~9 s.

The daemon runs in the foreground (``rspamd -f``) as ``_rspamd`` through setpriv, the same
way Debian's systemd unit runs it (Rspamd refuses to run workers as root).  ``start()`` waits
for ``GET /ping`` to answer "pong" and fails early, with the log tail, if the process dies.
``rspamadm`` is never run: it builds its resolver from /etc/resolv.conf and would send DNS
queries off the machine.

``RspamdProxyLab(workdir, dns_port=N, upstream="127.0.0.1:PORT")`` is a proxy-only instance
under ``<workdir>/rspamd-proxy/`` (so it runs beside an ``RspamdLab`` in the same workdir):
only the ``rspamd_proxy`` worker, in milter mode, on a free port (``proxy_port``), passing
every message to ``upstream`` over HTTP -- the role Postfix's milter plays in front of the
shim.  Its worker config is contrib/postfix/worker-proxy.inc with the two addresses
substituted, installed in ``override.d``: Debian's own worker-proxy.inc has
``upstream "local" { hosts = "localhost"; }`` and ``local.d`` *merges*, which would keep
localhost (= 127.0.0.1:11333, whatever listens there) as a second upstream.  The milter port
answers ``GET /ping``, so readiness is checked the same way.
"""
from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

from ..forwarding.mapfile import atomic_write
from .contrib import read_contrib, substitute_setting
from .errors import LabError, LabUnavailable
from .ports import LOOPBACK, free_port
from .process import ManagedProcess, log_tail_since

RSPAMD_USER = "_rspamd"
RSPAMD_BINARY = "rspamd"
SOURCE_CONFDIR = Path("/etc/rspamd")
DEFAULT_HS_CACHE = "/var/cache/exim-policy-lab/rspamd-hs"
HS_CACHE_ENV = "EXIM_POLICY_LAB_HS_CACHE"
TIMEOUT_ENV = "EXIM_POLICY_LAB_RSPAMD_TIMEOUT"
#: cold starts take ~9 s; under strace they took 100-135 s
DEFAULT_START_TIMEOUT = 180.0

#: modules that need the network; pointless (fuzzy_check: harmful) offline
NETWORK_MODULES = ("fuzzy_check", "rbl", "asn", "neural", "phishing", "rspamd_update",
                   "url_redirector")

#: the multimap rule behind the deterministic "add header" verdict; callers that replace
#: ``multimap.conf`` through ``extra_local_d`` can include this text to keep it
TEST_SPAM_HEADER_RULE = """\
# deterministic "add header" without GTUBE (a GTUBE hit skips every other rule)
TEST_SPAM_HEADER {
  type = "header";
  header = "X-Test-Spam";
  map = "${MAPSDIR}/test_spam_header.map";
  description = "Test header asking for an add-header verdict";
  score = 7.0;
}
"""

DEFAULT_MAPS: Mapping[str, str] = {"test_spam_header.map": "add-header\n"}

_MAP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
_BIND_FAILURE = re.compile(r"cannot (?:bind|listen)|address already in use", re.IGNORECASE)


def check_prerequisites(which: Callable[[str], str | None] = shutil.which,
                        euid: int | None = None) -> None:
    """Raise ``LabUnavailable`` naming what to install/do if Rspamd cannot be run here."""
    if which(RSPAMD_BINARY) is None:
        raise LabUnavailable("rspamd not found: install the Debian package 'rspamd' "
                             "(apt-get install rspamd, or bash contrib/setup.sh, as root)")
    if which("setpriv") is None:
        raise LabUnavailable("setpriv not found: install the Debian package 'util-linux'")
    if (os.geteuid() if euid is None else euid) != 0:
        raise LabUnavailable("the Rspamd lab must run as root (it starts rspamd as user "
                             f"{RSPAMD_USER} with setpriv): run the tests with sudo")
    try:
        pwd.getpwnam(RSPAMD_USER)
    except KeyError:
        raise LabUnavailable(f"user {RSPAMD_USER} missing: (re)install the Debian package "
                             "'rspamd'") from None


def _reachable_by(path: Path, uid: int, gids: set[int]) -> Path | None:
    """The first ancestor of ``path`` that ``uid`` cannot traverse, or None if all are fine.

    Checks the execute bit that applies to that user (owner, group or other); root-only
    temp dirs (mkdtemp makes them 0700) are the usual culprit.
    """
    for parent in [*reversed(path.parents), path]:
        try:
            st = parent.stat()
        except FileNotFoundError:
            return None  # created later by us, with a traversable mode
        if st.st_uid == uid:
            bit = 0o100
        elif st.st_gid in gids:
            bit = 0o010
        else:
            bit = 0o001
        if not st.st_mode & bit:
            return parent
    return None


def _http_get(url: str, timeout: float) -> bytes:
    # an explicit empty ProxyHandler: a http_proxy in the environment must never see lab traffic
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as resp:
        return resp.read()


class RspamdLab:
    """One private Rspamd; see the module docstring.  Not thread-safe; start from one thread."""

    #: the directory under ``workdir`` this instance lives in
    SUBDIR = "rspamd"

    def __init__(self, workdir: str | os.PathLike[str], *, dns_port: int,
                 extra_local_d: Mapping[str, str] | None = None,
                 maps: Mapping[str, str] | None = None,
                 hs_cache_dir: str | os.PathLike[str] | None = None,
                 start_timeout: float | None = None,
                 source_confdir: str | os.PathLike[str] = SOURCE_CONFDIR) -> None:
        self.root = Path(workdir) / self.SUBDIR
        self.etc_dir = self.root / "etc"
        self.maps_dir = self.root / "maps"
        self.db_dir = self.root / "db"
        self.run_dir = self.root / "run"
        self.log_dir = self.root / "log"
        self.log_path = self.log_dir / "rspamd.log"
        self.dns_port = dns_port
        self.extra_local_d = dict(extra_local_d or {})
        self.maps = {**DEFAULT_MAPS, **(maps or {})}
        self.hs_cache_dir = Path(hs_cache_dir or os.environ.get(HS_CACHE_ENV) or DEFAULT_HS_CACHE)
        self.start_timeout = start_timeout if start_timeout is not None else float(
            os.environ.get(TIMEOUT_ENV, DEFAULT_START_TIMEOUT))
        self.source_confdir = Path(source_confdir)
        self.host = LOOPBACK
        self.port = 0
        self.controller_port = 0
        self.process: ManagedProcess | None = None
        self._prepared = False
        self._ever_started = False
        #: seconds the last successful start() took until /ping answered
        self.last_start_seconds: float | None = None

    # ------------------------------------------------------------------ queries --
    @property
    def url(self) -> str:
        """Base URL of the normal worker (``/checkv2``, ``/ping``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def socket_path(self) -> Path:
        """The normal worker's unix socket (``rspamd.url = "unix:..."``)."""
        return self.run_dir / "normal.sock"

    @property
    def socket_url(self) -> str:
        return f"unix:{self.socket_path}"

    @property
    def controller_url(self) -> str:
        return f"http://{self.host}:{self.controller_port}"

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    @property
    def ping_url(self) -> str:
        """The URL whose "pong" means the instance is ready (the normal worker's ``/ping``)."""
        return self.url + "/ping"

    def ping(self, timeout: float = 1.0) -> bool:
        """True if ``ping_url`` answers "pong" right now."""
        try:
            return _http_get(self.ping_url, timeout).strip() == b"pong"
        except (OSError, urllib.error.URLError):
            return False

    def log_tail(self, lines: int = 30) -> str:
        text = ""
        if self.log_path.exists():
            with open(self.log_path, "rb") as fh:
                fh.seek(max(0, self.log_path.stat().st_size - 64 * 1024))
                text = "\n".join(fh.read().decode("utf-8", "replace").splitlines()[-lines:])
        proc = self.process.tail(lines) if self.process else ""
        return f"--- {self.log_path} ---\n{text}\n{proc}".rstrip()

    # ----------------------------------------------------------------- set-up --
    def _pick_ports(self) -> None:
        self.port = free_port(self.host)
        self.controller_port = free_port(self.host)
        while self.controller_port == self.port:
            self.controller_port = free_port(self.host)

    def _local_d(self) -> dict[str, str]:
        files = self._base_local_d()
        files.update({
            # (and on a unix socket: Rspamd binds each bind_socket line)
            "worker-normal.inc": f'bind_socket = "{self.host}:{self.port}";\n'
                                 f'bind_socket = "{self.socket_path} mode=0666";\ncount = 1;\n',
            "worker-controller.inc": f'bind_socket = "{self.host}:{self.controller_port}";\n',
            # the stock proxy would bind localhost:11332; off, and on a free port just in case
            "worker-proxy.inc": f'enabled = false;\nbind_socket = "{self.host}:{free_port()}";\n',
        })
        files.update(self.extra_local_d)
        return files

    def _override_d(self) -> dict[str, str]:
        """Files for ``etc/override.d`` (they replace, rather than merge into, the stock ones)."""
        return {}

    def _base_local_d(self) -> dict[str, str]:
        """local.d files every lab instance needs: offline DNS, test patterns, logging."""
        files = {
            "options.inc": (
                "# the lab's NXDOMAIN responder is the only name server: nothing leaves the host\n"
                "dns {\n"
                f'  nameserver = ["{self.host}:{self.dns_port}"];\n'
                "  timeout = 0.5s;\n"
                "  retransmits = 1;\n"
                "}\n"
                "# XJS*..GTUBE.. = reject; YJS* = add header; ZJS* = rewrite subject;\n"
                "# AJS* = no action\n"
                "enable_test_patterns = true;\n"
                "# shared, persistent hyperscan cache: warm start ~0.5 s instead of ~9 s\n"
                f'hs_cache_dir = "{self.hs_cache_dir}/";\n'),
            "logging.inc": 'type = "file";\nfilename = "$LOGDIR/rspamd.log";\nlevel = "info";\n',
            "multimap.conf": TEST_SPAM_HEADER_RULE,
        }
        for module in NETWORK_MODULES:
            files[f"{module}.conf"] = "enabled = false;\n"
        return files

    def _prepare(self) -> None:
        """(Re)write etc/ and the maps; create the writable dirs for _rspamd."""
        if not self.source_confdir.is_dir():
            raise LabUnavailable(f"{self.source_confdir} missing: install the Debian package "
                                 "'rspamd'")
        if self.etc_dir.exists():
            shutil.rmtree(self.etc_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        shutil.copytree(self.source_confdir, self.etc_dir, symlinks=True)
        local_d = self.etc_dir / "local.d"
        local_d.mkdir(exist_ok=True)
        for name, text in self._local_d().items():
            (local_d / name).write_text(text, encoding="utf-8")
        override_d = self.etc_dir / "override.d"
        override_d.mkdir(exist_ok=True)
        for name, text in self._override_d().items():
            (override_d / name).write_text(text, encoding="utf-8")
        self.maps_dir.mkdir(exist_ok=True)
        os.chmod(self.maps_dir, 0o755)
        for name, text in self.maps.items():
            self.write_map(name, text)
        rspamd_user = pwd.getpwnam(RSPAMD_USER)
        uid, gid = rspamd_user.pw_uid, rspamd_user.pw_gid
        gids = {gid} | {g.gr_gid for g in grp.getgrall() if RSPAMD_USER in g.gr_mem}
        # rspamd would fail on an unreachable config dir with a log line, but an unreachable
        # hyperscan cache only makes every start ~9 s slow, silently: refuse both up front
        for path in (self.root, self.hs_cache_dir):
            blocked = _reachable_by(path, uid, gids)
            if blocked is not None:
                raise LabError(f"{path} is not reachable by user {RSPAMD_USER}: {blocked} has "
                               f"mode {blocked.stat().st_mode & 0o777:04o} (chmod 755 it)")
        for path in (self.db_dir, self.run_dir, self.log_dir):
            path.mkdir(exist_ok=True)
            os.chown(path, uid, gid)
        # the cache is shared by every lab on the machine; only its parent may be missing
        self.hs_cache_dir.mkdir(parents=True, exist_ok=True)
        os.chown(self.hs_cache_dir, uid, gid)
        self._prepared = True

    def write_map(self, name: str, text: str) -> Path:
        """Replace ``maps/<name>`` atomically (temp file + rename in the same dir).

        Rspamd re-reads file maps when their stat changes; writing in place would let it
        read an empty or half-written map.  The file is made readable by _rspamd.
        """
        if not _MAP_NAME.match(name):
            raise ValueError(f"map name must be a plain file name, not {name!r}")
        self.maps_dir.mkdir(parents=True, exist_ok=True)
        target = self.maps_dir / name
        atomic_write(str(target), text)  # (a new file is 0644: readable by _rspamd)
        return target

    # ---------------------------------------------------------------- actions --
    def _command(self) -> list[str]:
        variables = {"CONFDIR": self.etc_dir, "LOCAL_CONFDIR": self.etc_dir,
                     "RUNDIR": self.run_dir, "DBDIR": self.db_dir, "LOGDIR": self.log_dir,
                     "MAPSDIR": self.maps_dir}
        # the --var=NAME=VALUE form; "--var NAME=VALUE" is rejected
        return [RSPAMD_BINARY, "-f", "-c", str(self.etc_dir / "rspamd.conf"),
                *(f"--var={key}={value}" for key, value in variables.items())]

    def start(self) -> None:
        """Start Rspamd and wait until ``/ping`` answers; raises ``LabError`` with the log tail.

        The ports are chosen on the first start and kept by later starts, so ``url`` stays
        valid across ``restart()``.  A first start that loses a port race retries with new ports.
        """
        check_prerequisites()
        if self.alive():
            return
        attempts = 1 if self._ever_started else 3
        error = ""
        for _attempt in range(attempts):
            if not self._ever_started:
                self._pick_ports()
                self._prepared = False
            if not self._prepared:
                self._prepare()
            error = self._launch_and_wait()
            if not error:
                self._ever_started = True
                return
            if not _BIND_FAILURE.search(error):
                break
        raise LabError(error)

    def _launch_and_wait(self) -> str:
        """Start the process and wait for pong; returns "" on success, else an error text."""
        gid_name = grp.getgrgid(pwd.getpwnam(RSPAMD_USER).pw_gid).gr_name
        self.process = ManagedProcess(self._command(), name="rspamd", logdir=self.root,
                                      user=RSPAMD_USER, group=gid_name)
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        started = time.monotonic()
        self.process.start()
        deadline = started + self.start_timeout
        while time.monotonic() < deadline:
            if self.ping(timeout=1.0):
                self.last_start_seconds = time.monotonic() - started
                return ""
            if not self.process.alive():
                break
            time.sleep(0.05)
        died = not self.process.alive()
        self.process.stop(5.0)
        new_log = log_tail_since(self.log_path, log_offset)
        why = (f"exited with status {self.process.returncode}" if died
               else f"did not answer /ping within {self.start_timeout:.0f}s")
        return (f"rspamd {why} ({self.ping_url}); log {self.log_path}:\n"
                f"{new_log}\n{self.process.tail(15)}").rstrip()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop Rspamd (SIGTERM: the master stops its workers; SIGKILL after ``timeout``)."""
        if self.process is not None:
            self.process.stop(timeout)

    def restart(self) -> None:
        """Stop and start again on the same ports (the maps and their edits are kept)."""
        self.stop()
        self.start()

    def __repr__(self) -> str:
        return f"<RspamdLab {self.url} {'alive' if self.alive() else 'stopped'}>"


def render_worker_proxy(template: str, *, bind: str, upstream: str) -> str:
    """contrib/postfix/worker-proxy.inc with its ``bind_socket`` and upstream ``hosts`` replaced."""
    text = substitute_setting(template, r'bind_socket\s*=\s*"[^"]*";', f'bind_socket = "{bind}";',
                              what="worker-proxy.inc bind_socket")
    return substitute_setting(text, r'hosts\s*=\s*"[^"]*";', f'hosts = "{upstream}";',
                              what="worker-proxy.inc upstream hosts")


class RspamdProxyLab(RspamdLab):
    """A proxy-only Rspamd in milter mode whose upstream is any /checkv2 HTTP server.

    See the module docstring.  ``proxy_port`` is the milter port (Postfix's
    ``smtpd_milters = inet:127.0.0.1:<proxy_port>``); ``upstream`` is ``host:port``.
    ``worker_proxy`` replaces the contrib/postfix/worker-proxy.inc template (its
    ``bind_socket`` and ``hosts`` lines are still substituted).
    """

    SUBDIR = "rspamd-proxy"
    #: the admin's file this instance runs
    CONTRIB_WORKER_PROXY = "postfix/worker-proxy.inc"

    def __init__(self, workdir: str | os.PathLike[str], *, dns_port: int, upstream: str,
                 worker_proxy: str | None = None, subdir: str | None = None,
                 extra_local_d: Mapping[str, str] | None = None,
                 hs_cache_dir: str | os.PathLike[str] | None = None,
                 start_timeout: float | None = None,
                 source_confdir: str | os.PathLike[str] = SOURCE_CONFDIR) -> None:
        if subdir is not None:  # several proxies in one workdir
            self.SUBDIR = subdir
        super().__init__(workdir, dns_port=dns_port, extra_local_d=extra_local_d,
                         hs_cache_dir=hs_cache_dir, start_timeout=start_timeout,
                         source_confdir=source_confdir)
        self.upstream = upstream
        self.worker_proxy_template = worker_proxy
        self.proxy_port = 0

    @property
    def milter_address(self) -> str:
        """The value for Postfix's ``smtpd_milters``."""
        return f"inet:{self.host}:{self.proxy_port}"

    @property
    def ping_url(self) -> str:
        return f"http://{self.host}:{self.proxy_port}/ping"

    def _pick_ports(self) -> None:
        self.proxy_port = free_port(self.host)

    def _local_d(self) -> dict[str, str]:
        files = self._base_local_d()
        # only the proxy runs; the disabled workers still get private addresses, just in case
        files.update({
            "worker-normal.inc": f'enabled = false;\nbind_socket = "{self.host}:{free_port()}";\n',
            "worker-controller.inc":
                f'enabled = false;\nbind_socket = "{self.host}:{free_port()}";\n',
        })
        files.update(self.extra_local_d)
        return files

    def _override_d(self) -> dict[str, str]:
        template = self.worker_proxy_template
        if template is None:
            template = read_contrib(self.CONTRIB_WORKER_PROXY)
        return {"worker-proxy.inc": render_worker_proxy(
            template, bind=f"{self.host}:{self.proxy_port}", upstream=self.upstream)}

    def __repr__(self) -> str:
        return (f"<RspamdProxyLab milter {self.host}:{self.proxy_port} -> {self.upstream} "
                f"{'alive' if self.alive() else 'stopped'}>")
