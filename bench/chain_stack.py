"""The chain bench's stack: real Exim -> shim -> real Rspamd, Redis, the quarantine
receiver, an SMTP sink; all on loopback, every process started here stopped here.

    smtplib (127.0.0.1 inbound, ::1 relay host, AUTH = outbound)
      --> Exim (exim/exim.conf, policy helper, receiver router)
            --spamd--> shim (accounts on Redis, forwarding map fwd@lab.test) --HTTP--> Rspamd
            --> Maildirs of lab.test (bob, carol, dave)
            --> quarantine receiver (a second shim, [quarantine] only) for outbound spam
            --> SMTP sink (every other domain)

The quarantine receiver runs in a shim of its own so that it can be stopped without
stopping the scanning shim. The faults (:meth:`ChainStack.fault`) act on processes by pid
or process group, never by name. Restarts must come from the thread that started the
part: the lab starts Rspamd, Redis and Exim with ``setpriv --pdeathsig``, tied to the
starting thread (the bench's main thread).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from exim_policy.lab.addresses import ALIASES, FORWARDER, RELAY_HOST
from exim_policy.lab.exim import EximLab, free_port_v4_v6
from exim_policy.lab.nxdns import NxDns
from exim_policy.lab.ports import LOOPBACK, free_port, wait_tcp
from exim_policy.lab.process import group_members
from exim_policy.lab.redis import RedisLab
from exim_policy.lab.rspamd import RspamdLab
from exim_policy.lab.shim import ShimLab

#: SMTP AUTH users: the good ones send ham only, the spammers spam only (a spammer's
#: account is held after 5 spam verdicts; its mail is quarantined either way, so the
#: expected outcome does not depend on when that happens)
GOOD_USERS = {"tester": "testpass", "good1": "good1pass", "good2": "good2pass"}
SPAM_USERS = {"spam1": "spam1pass", "spam2": "spam2pass", "spam3": "spam3pass"}
LOCAL_USERS = ("bob", "carol", "dave", "quarantine", "postmaster")

#: main options the lab's Exim needs for 64 clients at once (Exim's defaults: 20
#: connections, a listen backlog of 20, deliveries queued after 10 messages of one
#: connection); options, not macros, so they go in the wrapper ahead of exim.conf
EXIM_CAPACITY = ("smtp_accept_max = 512\n"
                 "smtp_connect_backlog = 256\n"
                 "smtp_accept_queue_per_connection = 0\n")


class BenchExim(EximLab):
    """The lab's Exim with room for the bench's concurrency (:data:`EXIM_CAPACITY`)."""

    def _wrapper_text(self) -> str:
        text = super()._wrapper_text()
        anchor = "daemon_startup_retries = 0\n"
        assert anchor in text, "EximLab's wrapper changed: put EXIM_CAPACITY elsewhere"
        return text.replace(anchor, anchor + EXIM_CAPACITY)


class SinkProcess:
    """bench/chain_sink.py as a child process on a free loopback port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory.parent / "sink.log", "ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("chain_sink.py")),
                 str(self.directory), str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        finally:
            log.close()
        wait_tcp(LOOPBACK, self.port, time.monotonic() + 20,
                 alive=lambda: self.proc is not None and self.proc.poll() is None)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def accounts_toml(redis_url: str, prefix: str) -> str:
    """[accounts] on Redis: incidents hold an account (never lock it: a locked account's
    mail would get a 550 at MAIL, which would make the outcome depend on timing); no
    limits; relay-host mail counted by sender, so ham and spam senders on ::1 differ."""
    return (f'\n[accounts]\nenabled = true\nstore = "redis"\nredis_url = "{redis_url}"\n'
            f'redis_prefix = "{prefix}"\nrelay_key = "sender"\n'
            '[accounts.incident]\nspam_verdicts = 5\non_open = "hold"\nlock_after = 0\n')


@dataclass
class FaultTimes:
    """When a fault happened (time.time()); ``back``: when the peer was back (serving)."""

    name: str
    start: float
    down: float = 0.0
    back: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class ChainStack:
    workdir: Path
    shim_workers: int = 1
    failure: dict[str, str] = field(default_factory=dict)
    nxdns: NxDns | None = None
    rspamd: RspamdLab | None = None
    redis: RedisLab | None = None
    sink: SinkProcess | None = None
    holder: ShimLab | None = None
    shim: ShimLab | None = None
    exim: BenchExim | None = None
    redis_prefix: str = "chain:"

    # ------------------------------------------------------------------- start/stop --
    def start(self, say: Callable[[str], None]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)  # Debian-exim, _rspamd and redis must get in
        say("starting the NXDOMAIN responder, Rspamd, Redis and the SMTP sink")
        self.nxdns = NxDns(self.workdir / "dns")
        self.nxdns.start()
        self.rspamd = RspamdLab(self.workdir, dns_port=self.nxdns.port)
        self.rspamd.start()
        self.redis = RedisLab(self.workdir, persistent=True)
        self.redis.start()
        self.sink = SinkProcess(self.workdir / "sink")
        self.sink.start()
        lab_conf = self.workdir / "exim" / "conf" / "lab.conf"
        say("starting the quarantine receiver (a shim of its own) and the shim")
        holder_dir = self.workdir / "holder"
        holder_dir.mkdir(exist_ok=True)
        os.chmod(holder_dir, 0o755)
        self.holder = ShimLab(holder_dir, rspamd_url=self.rspamd.url, quarantine={
            "exim_command": ["exim", "-C", str(lab_conf)]})
        self.holder.start()
        self.shim = ShimLab(self.workdir, rspamd_url=self.rspamd.url, forwarding=(FORWARDER,),
                            relay_networks=(f"{RELAY_HOST}/128",), rspamd_timeout=8.0,
                            failure=self.failure or None,
                            extra_toml=accounts_toml(self.redis.url, self.redis_prefix),
                            workers=self.shim_workers if self.shim_workers > 1 else None)
        self.shim.start()
        say("starting Exim with exim/exim.conf")
        self.exim = BenchExim(self.workdir, spamd_address=self.shim.spamd_address,
                              sink_port=self.sink.port, relay_hosts=f"<; {RELAY_HOST}",
                              aliases=ALIASES, ipv6=True, query_address=self.shim.query_address,
                              local_users=LOCAL_USERS,
                              auth_users={**GOOD_USERS, **SPAM_USERS},
                              receiver_port=self.holder.quarantine_port)
        self.exim.port = free_port_v4_v6()
        self.exim.start()

    def stop(self) -> list[str]:
        """Stop every part that was started, in reverse order; the errors, if any."""
        errors = []
        for part in (self.exim, self.shim, self.holder, self.sink, self.redis, self.rspamd,
                     self.nxdns):
            if part is None:
                continue
            try:
                if isinstance(part, RspamdLab) and part.alive():
                    _signal_group(part, signal.SIGCONT)  # a stopped Rspamd cannot exit
                part.stop()
            except Exception as exc:  # keep stopping the rest
                errors.append(f"{type(part).__name__}: {exc}")
        return errors

    # ------------------------------------------------------------------------ queue --
    def queue_run(self, timeout: float = 300.0) -> None:
        """``exim -qff``: try every queued message now, retry times and freezing ignored
        (the lab's daemon runs no queue runner of its own)."""
        assert self.exim is not None
        self.exim.exim("-qff", timeout=timeout)

    def queue_count(self) -> int:
        assert self.exim is not None
        return self.exim.queue_count()

    # ----------------------------------------------------------------------- faults --
    def fault(self, name: str, *, down: float, hups: int = 10,
              hup_interval: float = 0.5, stall: float = 15.0) -> FaultTimes:
        """Inject one fault and bring the peer back; returns when it serves again."""
        action = {
            "rspamd-kill": lambda t: self._rspamd_kill(t, down),
            "rspamd-stop": lambda t: self._rspamd_stop(t, stall),
            "shim-hup": lambda t: self._shim_hup(t, hups, hup_interval),
            "shim-restart": lambda t: self._restart(t, self.shim, down, stop_timeout=45.0),
            "redis-restart": lambda t: self._restart(t, self.redis, down),
            "receiver-restart": lambda t: self._restart(t, self.holder, down),
        }[name]
        times = FaultTimes(name, time.time())
        action(times)
        return times

    def _rspamd_kill(self, times: FaultTimes, down: float) -> None:
        assert self.rspamd is not None and self.rspamd.process is not None
        _signal_group(self.rspamd, signal.SIGKILL)  # master and workers: a crash
        self.rspamd.process.wait_exit(10.0)
        times.down = time.time()
        time.sleep(down)
        self.rspamd.start()
        times.back = time.time()
        times.notes.append(f"Rspamd start took {self.rspamd.last_start_seconds:.2f} s")

    def _rspamd_stop(self, times: FaultTimes, stall: float) -> None:
        assert self.rspamd is not None
        _signal_group(self.rspamd, signal.SIGSTOP)
        times.down = time.time()
        time.sleep(stall)
        _signal_group(self.rspamd, signal.SIGCONT)
        times.back = time.time()

    def _shim_hup(self, times: FaultTimes, hups: int, interval: float) -> None:
        assert self.shim is not None
        offset = len(self.shim.log_text())
        for _ in range(hups):
            self.shim.reload()
            time.sleep(interval)
        times.down = times.back = time.time()
        # each SIGHUP is one reload, logged once it is in force (they run one at a time)
        deadline = time.monotonic() + 10
        done = self.shim.log_text()[offset:].count("reload: ")
        while done < hups and time.monotonic() < deadline:
            time.sleep(0.1)
            done = self.shim.log_text()[offset:].count("reload: ")
        times.notes.append(f"{done} of {hups} reloads logged")

    def _restart(self, times: FaultTimes, part, down: float, stop_timeout: float = 10.0
                 ) -> None:
        part.stop(stop_timeout)
        times.down = time.time()
        times.notes.append(f"stop took {times.down - times.start:.2f} s")
        time.sleep(down)
        part.start()
        times.back = time.time()
        times.notes.append(f"start took {times.back - times.down - down:.2f} s")

    # --------------------------------------------------------------------- watching --
    def shim_pids(self) -> list[int]:
        """The shim's processes (a supervisor and its workers share its process group)."""
        if self.shim is None or self.shim.proc is None:
            return []
        return group_members(self.shim.proc.pid)

    def rspamd_pids(self) -> list[int]:
        if self.rspamd is None or self.rspamd.process is None or not self.rspamd.alive():
            return []
        return group_members(self.rspamd.process.pid or 0)


def _signal_group(rspamd: RspamdLab, sig: signal.Signals) -> None:
    """Signal Rspamd's process group (master and workers), by pgid."""
    assert rspamd.process is not None and rspamd.process.pid is not None
    try:
        os.killpg(rspamd.process.pid, sig)
    except ProcessLookupError:
        pass


def process_stats(pids: list[int]) -> dict[str, int]:
    """RSS (kB), open descriptors and tasks (threads) summed over ``pids``."""
    rss = fds = tasks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Threads:"):
                        tasks += int(line.split()[1])
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:  # it just exited
            continue
    return {"rss_kb": rss, "fds": fds, "tasks": tasks, "procs": len(pids)}
