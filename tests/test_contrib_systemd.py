"""contrib/systemd/: the sysusers.d and tmpfiles.d files applied by the real systemd tools to
a scratch root (never to this machine's /etc), and the unit checked by systemd-analyze.

They need the Debian package systemd (its tools; no running systemd) and the group
Debian-exim (exim4): contrib/setup.sh installs both."""
from __future__ import annotations

import grp
import os
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parents[1] / "contrib" / "systemd"
UNIT = SYSTEMD / "exim-policy.service"
SYSUSERS = SYSTEMD / "exim-policy.sysusers"
TMPFILES = SYSTEMD / "exim-policy.tmpfiles"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install the Debian package 'systemd' "
                    "(or run bash contrib/setup.sh as root)", pytrace=False)
    return path


def exim_group() -> grp.struct_group:
    try:
        return grp.getgrnam("Debian-exim")
    except KeyError:
        pytest.fail("no group Debian-exim: install the Debian package 'exim4-daemon-heavy'",
                    pytrace=False)


@pytest.fixture
def root(tmp_path) -> Path:
    """A scratch root with just root and Debian-exim in its user and group databases."""
    group = exim_group()
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "group").write_text(f"root:x:0:\nDebian-exim:x:{group.gr_gid}:\n")
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    for name in ("shadow", "gshadow"):
        (etc / name).write_text("")
    return tmp_path


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60)


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_sysusers_creates_the_daemon_user_in_exims_group(root):
    result = run(tool("systemd-sysusers"), f"--root={root}", str(SYSUSERS))
    assert result.returncode == 0, result.stderr
    [entry] = [line.split(":") for line in (root / "etc" / "passwd").read_text().splitlines()
               if line.startswith("_exim-policy:")]
    assert entry[3] == str(exim_group().gr_gid)
    assert entry[5] == "/var/lib/exim-policy"
    assert "_exim-policy" not in (root / "etc" / "group").read_text()  # no group of its own
    settings = unit_settings()
    assert settings["User"] == ["_exim-policy"] and settings["Group"] == ["Debian-exim"]


@pytest.mark.real  # chown: root
def test_tmpfiles_makes_the_config_and_state_directories(root):
    assert run(tool("systemd-sysusers"), f"--root={root}", str(SYSUSERS)).returncode == 0
    result = run(tool("systemd-tmpfiles"), f"--root={root}", "--create", str(TMPFILES))
    assert result.returncode == 0, result.stderr
    uid = int(next(line.split(":")[2]
                   for line in (root / "etc" / "passwd").read_text().splitlines()
                   if line.startswith("_exim-policy:")))
    gid = exim_group().gr_gid
    config, state = os.stat(root / "etc" / "exim-policy"), os.stat(root / "var/lib/exim-policy")
    assert (config.st_uid, config.st_gid, config.st_mode & 0o7777) == (0, gid, 0o750)
    assert (state.st_uid, state.st_gid, state.st_mode & 0o7777) == (uid, gid, 0o750)
    # systemd re-applies the unit's StateDirectoryMode at each start: the same mode
    assert unit_settings()["StateDirectoryMode"] == ["0750"]


def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    settings = unit_settings()
    assert settings["Type"] == ["notify"] and settings["NotifyAccess"] == ["main"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    binary = "/opt/exim-policy/bin/exim-policy"  # README.md's quick start venv
    assert all(cmd.startswith(f"{binary} ") for cmd in settings["ExecStart"]
               + settings["ExecStartPre"])
    # verify insists that the binary exists: point it at one that does
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(binary, shutil.which("true")))
    result = run(tool("systemd-analyze"), "verify", str(unit))
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr
