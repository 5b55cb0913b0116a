"""A small managed-process helper for lab daemons (Rspamd, the DNS responder, ...).

Contract:
- ``start()`` runs ``argv`` in its own session (so it gets its own process group), with
  stdin from /dev/null and stdout/stderr appended to ``<logdir>/<name>.stdout.log`` and
  ``<name>.stderr.log``; optionally as another user through
  ``setpriv --reuid=U --regid=G --init-groups`` (setpriv execs, so the recorded pid is the
  daemon's own pid).
- ``alive()`` is False once the process has exited, even while it is still a zombie:
  on this kind of machine PID 1 reaps orphans lazily (seconds later), so ``kill -0`` alone
  would report a dead daemon as running.
- ``stop(timeout)`` sends SIGTERM, waits up to ``timeout``, then SIGKILLs the whole process
  group; it also reaps stragglers left in the group (e.g. workers of a killed master).
  Every wait has a deadline; nothing is ever signalled by name, only by pid / pgid.
- With ``die_with_parent`` (the default) the child gets SIGTERM when the *thread* that
  called ``start()`` exits (``setpriv --pdeathsig``, which survives the uid change), so a
  test run that is killed does not leave daemons behind.  Start from the main thread, or
  pass ``die_with_parent=False`` when starting from a short-lived thread.
"""
from __future__ import annotations

import os
import pwd
import grp
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import LabError, LabUnavailable

#: /proc/PID/stat states that mean "no longer running"
_DEAD_STATES = frozenset("ZXx")


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name, or None if the pid is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    # the command name may contain spaces and ')' -- split after the *last* ')'
    return raw[raw.rfind(")") + 2:].split()


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (state Z or X in /proc/PID/stat)."""
    fields = _proc_stat(pid)
    return bool(fields) and fields[0] not in _DEAD_STATES


def group_members(pgid: int) -> list[int]:
    """Pids of live (non-zombie) processes whose process group is ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _proc_stat(int(entry))
        # fields: state ppid pgrp session ...
        if fields and len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in _DEAD_STATES:
            members.append(int(entry))
    return members


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    """One daemon started and stopped by the lab; see the module docstring for the contract."""

    def __init__(self, argv: Sequence[str], *, name: str, logdir: str | os.PathLike[str],
                 user: str | None = None, group: str | None = None,
                 env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
                 die_with_parent: bool = True) -> None:
        self.argv = tuple(argv)
        self.name = name
        self.logdir = Path(logdir)
        self.user = user
        self.group = group
        self.env = dict(env) if env is not None else None
        self.cwd = Path(cwd) if cwd is not None else self.logdir
        self.die_with_parent = die_with_parent
        self.stdout_path = self.logdir / f"{name}.stdout.log"
        self.stderr_path = self.logdir / f"{name}.stderr.log"
        self._popen: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ queries --
    @property
    def pid(self) -> int | None:
        """Pid of the last started process (also after it exited), None before ``start()``."""
        return self._popen.pid if self._popen is not None else None

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode if self._popen is not None else None

    def alive(self) -> bool:
        """True while the process runs; False once it exited (zombie or reaped)."""
        if self._popen is None:
            return False
        if self._popen.poll() is not None:  # reaps it if we are still its parent
            return False
        return pid_alive(self._popen.pid)

    def tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of stderr and stdout, for error messages."""
        parts = []
        for path in (self.stderr_path, self.stdout_path):
            text = _tail(path, lines)
            if text:
                parts.append(f"--- {path} ---\n{text}")
        return "\n".join(parts)

    def command(self) -> list[str]:
        """The exact command line ``start()`` runs (with the setpriv prefix, if any)."""
        prefix: list[str] = []
        if self.user is not None or self.die_with_parent:
            prefix = ["setpriv"]
            if self.user is not None:
                group = self.group or grp.getgrgid(pwd.getpwnam(self.user).pw_gid).gr_name
                prefix += [f"--reuid={self.user}", f"--regid={group}", "--init-groups"]
            if self.die_with_parent:
                prefix += ["--pdeathsig", "TERM"]
            prefix.append("--")
        return prefix + list(self.argv)

    # ----------------------------------------------------------------- actions --
    def start(self) -> None:
        """Start the process; raises ``LabError`` if it is already running."""
        if self.alive():
            raise LabError(f"{self.name}: already running (pid {self.pid})")
        if self.user is not None or self.die_with_parent:
            if shutil.which("setpriv") is None:
                raise LabUnavailable("setpriv not found: install the Debian package 'util-linux'")
        if self.user is not None and os.geteuid() != 0:
            raise LabUnavailable(f"{self.name}: must run as root to start it as user {self.user}")
        if self.user is not None:
            try:
                pwd.getpwnam(self.user)
            except KeyError:
                raise LabUnavailable(f"{self.name}: no such user {self.user!r}") from None
        self.logdir.mkdir(parents=True, exist_ok=True)
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            try:
                self._popen = subprocess.Popen(
                    self.command(), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    cwd=self.cwd, env=self.env, start_new_session=True, close_fds=True)
            except OSError as exc:
                raise LabError(f"{self.name}: cannot start {self.argv[0]}: {exc}") from exc

    def wait_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the process to exit; True if it did."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait ``timeout`` s, then SIGKILL the process group; returns the exit code.

        Idempotent: stopping a process that already exited only cleans up stragglers.
        """
        if self._popen is None:
            return None
        pgid = self._popen.pid  # start_new_session: the child leads its own group
        if self.alive():
            self._signal(self._popen.pid, signal.SIGTERM)
            if not self.wait_exit(timeout):
                self._killpg(pgid)
                if not self.wait_exit(5.0):
                    raise LabError(f"{self.name}: pid {self.pid} survived SIGKILL")
        # e.g. rspamd workers whose master was SIGKILLed: give them a moment, then kill them
        deadline = time.monotonic() + min(timeout, 3.0)
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if group_members(pgid):
            self._killpg(pgid)
        try:
            self._popen.wait(timeout=1.0)
        except subprocess.TimeoutExpired:  # pragma: no cover - alive() said it exited
            pass
        return self._popen.returncode

    @staticmethod
    def _signal(pid: int, sig: signal.Signals) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    @staticmethod
    def _killpg(pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __repr__(self) -> str:
        state = "alive" if self.alive() else "stopped"
        return f"<ManagedProcess {self.name} pid={self.pid} {state}>"


def log_tail_since(path: str | os.PathLike[str], offset: int, lines: int = 30) -> str:
    """The last ``lines`` lines a log file got after byte ``offset`` ("" if it is absent):
    what a daemon said during the start that failed, not in earlier runs."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return "\n".join(fh.read().decode("utf-8", "replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""
