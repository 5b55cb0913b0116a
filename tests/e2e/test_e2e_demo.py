"""``exim-policy demo``: the real run (its own Rspamd, shim, Exim, sink) and its refusals."""
from __future__ import annotations

import argparse
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exim_policy.commands import demo
from exim_policy.lab.scenarios import scenarios

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_every_scenario_and_stops_everything():
    if os.geteuid() != 0:
        pytest.fail("the demo test must run as root", pytrace=False)
    result = subprocess.run([sys.executable, "-m", "exim_policy", "demo"], cwd=REPO,
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "COLUMNS": "200"})
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    total = len(scenarios())
    assert f"{total} of {total} scenarios as expected" in out, out
    assert "FAIL" not in out
    workdir = re.search(r"work dir (/\S+)", out)
    assert workdir, out
    assert not Path(workdir.group(1)).exists(), "the demo left its temp dir behind"
    assert _processes_mentioning(workdir.group(1)) == [], "the demo left processes behind"


def _processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text.encode() in cmdline and state not in ("Z", "X"):
            pids.append(int(entry))
    return pids


def test_demo_refuses_to_run_without_root(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert demo.run(argparse.Namespace(keep=False)) == 2
    assert "must run as root" in capsys.readouterr().err


def test_demo_names_the_missing_debian_packages(monkeypatch):
    monkeypatch.setattr(demo.shutil, "which",
                        lambda name: None if name in ("exim", "rspamd") else f"/usr/bin/{name}")
    problems = " ".join(demo.missing_prerequisites())
    assert "exim4-daemon-heavy" in problems and "rspamd" in problems


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_demo_stops_everything_when_interrupted(sig):
    if os.geteuid() != 0:
        pytest.fail("the demo test must run as root", pytrace=False)
    proc = subprocess.Popen([sys.executable, "-m", "exim_policy", "demo"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "COLUMNS": "200"})
    try:
        seen = b""
        deadline = time.monotonic() + 300
        while b"work dir" not in seen:  # printed once everything runs
            assert time.monotonic() < deadline and proc.poll() is None, seen.decode()
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                seen += os.read(proc.stdout.fileno(), 4096)
        time.sleep(0.5)  # in the middle of the scenarios
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    out = (seen + rest).decode(errors="replace")
    assert proc.returncode == 130, out
    assert "interrupted; everything it started was stopped" in out
    workdir = re.search(r"work dir (/\S+)", out).group(1)
    assert not Path(workdir).exists()
    assert _processes_mentioning(workdir) == []
