"""ManagedProcess: start, zombie-aware liveness, TERM-then-KILL stop, user switch, pdeathsig."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from exim_policy.lab.process import ManagedProcess, group_members, pid_alive


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_start_alive_stop(tmp_path: Path) -> None:
    proc = ManagedProcess(["sleep", "30"], name="sleeper", logdir=tmp_path)
    proc.start()
    try:
        assert proc.alive() and proc.pid is not None and pid_alive(proc.pid)
        # own session: the child leads its own process group
        assert os.getpgid(proc.pid) == proc.pid
    finally:
        rc = proc.stop(timeout=5)
    assert rc == -15
    assert not proc.alive()
    assert proc.stop() == -15  # idempotent


def test_stop_escalates_to_sigkill_for_the_whole_group(tmp_path: Path) -> None:
    # the shell ignores TERM and has a child in its group: both must be gone after stop()
    script = "trap '' TERM; sleep 60 & echo started; wait"
    proc = ManagedProcess(["sh", "-c", script], name="stubborn", logdir=tmp_path)
    proc.start()
    assert _wait(lambda: "started" in proc.stdout_path.read_text(), 5)
    assert len(group_members(proc.pid)) == 2
    started = time.monotonic()
    rc = proc.stop(timeout=0.5)
    assert time.monotonic() - started < 5
    assert rc == -9
    assert group_members(proc.pid) == []


def test_zombie_counts_as_dead() -> None:
    child = subprocess.Popen(["true"])
    try:
        # not reaped yet: the kernel keeps it as a zombie, /proc says state Z
        assert _wait(lambda: not pid_alive(child.pid), 5)
        assert os.path.exists(f"/proc/{child.pid}")
    finally:
        child.wait(timeout=5)


@pytest.mark.real  # setuid: root
def test_runs_as_another_user_and_logs_output(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    proc = ManagedProcess(["sh", "-c", "id -un; echo oops >&2"], name="whoami",
                          logdir=tmp_path, user="nobody")
    proc.start()
    assert proc.wait_exit(5)
    proc.stop()
    assert proc.stdout_path.read_text().strip() == "nobody"
    assert proc.stderr_path.read_text().strip() == "oops"
    assert "oops" in proc.tail()


def test_child_dies_with_its_parent(tmp_path: Path) -> None:
    """A killed test run must not leave daemons behind (setpriv --pdeathsig)."""
    root = Path(__file__).resolve().parents[1]
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(root)!r})
        from exim_policy.lab.process import ManagedProcess
        p = ManagedProcess(["sleep", "60"], name="orphan", logdir={str(tmp_path)!r})
        p.start()
        print(p.pid, flush=True)
        time.sleep(0.3)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    pid = int(out.split()[0])
    try:
        assert _wait(lambda: not pid_alive(pid), 5), "child survived its parent"
    finally:
        if pid_alive(pid):
            os.kill(pid, 9)


def test_start_twice_is_refused(tmp_path: Path) -> None:
    proc = ManagedProcess(["sleep", "30"], name="once", logdir=tmp_path)
    proc.start()
    try:
        with pytest.raises(RuntimeError, match="already running"):
            proc.start()
    finally:
        proc.stop(5)
