"""The lab's real Rspamd 3.4, spoken to directly over HTTP (/ping, /checkv2) with urllib.

Scans say ``IP: 127.0.0.1`` and use a ``To:`` equal to the envelope recipient, like Exim's
requests for a loopback client (see exim_policy/lab/messages.py for why both matter).
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from exim_policy.lab import LabError, LabUnavailable, RspamdLab, check_prerequisites, messages
from exim_policy.lab.ports import tcp_accepts
from exim_policy.lab.process import group_members

RCPT = "bob@lab.test"
SENDER = "alice@example.org"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def checkv2(lab: RspamdLab, message: bytes, *, rcpt: str = RCPT, sender: str = SENDER,
            ip: str = "127.0.0.1", helo: str = "client.lab.test") -> dict:
    request = urllib.request.Request(
        lab.url + "/checkv2", data=message, method="POST",
        headers={"IP": ip, "From": sender, "Rcpt": rcpt, "Helo": helo})
    with _OPENER.open(request, timeout=10) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def wait_for_action(lab: RspamdLab, build: Callable[[], bytes], action: str,
                    timeout: float = 10.0) -> dict:
    """Scan until the verdict is ``action`` (map reloads are asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        result = checkv2(lab, build())
        if result["action"] == action or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


def test_ping_answers_pong(rspamd_running: RspamdLab) -> None:
    with _OPENER.open(rspamd_running.url + "/ping", timeout=5) as resp:
        assert resp.read().strip() == b"pong"


def test_ham_gets_no_action(rspamd_running: RspamdLab) -> None:
    result = checkv2(rspamd_running, messages.ham(to=RCPT, from_addr=SENDER))
    assert result["action"] == "no action", result
    assert result["score"] < 1.0, result
    assert "FORGED_RECIPIENTS" not in result["symbols"]  # To: equals the envelope Rcpt


def test_gtube_gets_reject(rspamd_running: RspamdLab) -> None:
    result = checkv2(rspamd_running, messages.gtube(to=RCPT, from_addr=SENDER))
    assert result["action"] == "reject", result
    assert set(result["symbols"]) == {"GTUBE"}  # GTUBE skips every other rule
    assert result["score"] == pytest.approx(15.0)


@pytest.mark.parametrize("build, action", [
    (messages.gtube_add_header, "add header"),
    (messages.gtube_rewrite_subject, "rewrite subject"),
    (messages.gtube_no_action, "no action"),
])
def test_gtube_test_patterns(rspamd_running: RspamdLab, build: Callable[..., bytes],
                             action: str) -> None:
    result = checkv2(rspamd_running, build(to=RCPT, from_addr=SENDER))
    assert result["action"] == action, result


def test_x_test_spam_header_gets_add_header(rspamd_running: RspamdLab) -> None:
    result = checkv2(rspamd_running, messages.x_test_spam(to=RCPT, from_addr=SENDER))
    assert result["action"] == "add header", result
    assert result["symbols"]["TEST_SPAM_HEADER"]["score"] == pytest.approx(7.0)
    # unlike GTUBE, the other rules still ran
    assert "MIME_GOOD" in result["symbols"]


def test_listens_on_loopback_only(rspamd_running: RspamdLab) -> None:
    """The stock binds (localhost:11333/11334/11332) are replaced, not added to."""
    assert rspamd_running.process is not None and rspamd_running.process.pid is not None
    pids = set(group_members(rspamd_running.process.pid))
    out = subprocess.run(["ss", "-Hltnup"], capture_output=True, text=True, timeout=10).stdout
    ours = [line for line in out.splitlines()
            if any(f"pid={pid}," in line for pid in pids)]
    local = {line.split()[4] for line in ours}
    assert local == {f"127.0.0.1:{rspamd_running.port}",
                     f"127.0.0.1:{rspamd_running.controller_port}"}, out


def test_restart_keeps_url_and_verdicts(rspamd_running: RspamdLab) -> None:
    old_pid = rspamd_running.process.pid if rspamd_running.process else None
    url = rspamd_running.url
    started = time.monotonic()
    rspamd_running.restart()
    took = time.monotonic() - started
    print(f"rspamd restart took {took:.2f}s (until /ping: {rspamd_running.last_start_seconds:.2f}s)")
    assert rspamd_running.process is not None and rspamd_running.process.pid != old_pid
    assert rspamd_running.url == url
    assert checkv2(rspamd_running, messages.gtube())["action"] == "reject"
    assert checkv2(rspamd_running, messages.ham(to=RCPT))["action"] == "no action"


def test_stopped_rspamd_refuses_connections(rspamd_stopped: RspamdLab) -> None:
    assert not rspamd_stopped.alive()
    assert not rspamd_stopped.ping()
    assert not tcp_accepts("127.0.0.1", rspamd_stopped.port)
    assert rspamd_stopped.process is not None and rspamd_stopped.process.pid is not None
    assert group_members(rspamd_stopped.process.pid) == []  # no worker left behind


def test_running_fixture_restarts_a_stopped_rspamd(rspamd: RspamdLab,
                                                   request: pytest.FixtureRequest) -> None:
    rspamd.stop()
    assert not rspamd.alive()
    lab = request.getfixturevalue("rspamd_running")
    assert lab is rspamd and lab.alive() and lab.ping()


def test_write_map_is_atomic(rspamd_running: RspamdLab) -> None:
    """A reader never sees an empty or partial map while it is rewritten over and over."""
    name = "atomicity_probe.map"
    versions = ["".join(f"{tag}-{i}@lab.test\n" for i in range(2000)) for tag in "ab"]
    path = rspamd_running.write_map(name, versions[0])
    seen_bad: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            text = path.read_text()
            if text not in versions:
                seen_bad.append(text[:80])

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        inodes = set()
        for i in range(200):
            inodes.add(rspamd_running.write_map(name, versions[i % 2]).stat().st_ino)
    finally:
        stop.set()
        thread.join(10)
    assert not seen_bad, seen_bad[:3]
    assert len(inodes) > 1  # replaced by rename, not rewritten in place
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert [p.name for p in rspamd_running.maps_dir.iterdir() if p.name.endswith(".tmp")] == []


def test_map_edit_is_picked_up_without_restart(rspamd_running: RspamdLab) -> None:
    pid = rspamd_running.process.pid if rspamd_running.process else None
    build = lambda: messages.x_test_spam(to=RCPT)  # noqa: E731
    try:
        rspamd_running.write_map("test_spam_header.map", "some-other-value\n")
        result = wait_for_action(rspamd_running, build, "no action")
        assert result["action"] == "no action", result
        assert "TEST_SPAM_HEADER" not in result["symbols"]
    finally:
        rspamd_running.write_map("test_spam_header.map", "add-header\n")
    assert wait_for_action(rspamd_running, build, "add header")["action"] == "add header"
    assert rspamd_running.process is not None and rspamd_running.process.pid == pid


def test_write_map_refuses_paths(rspamd_running: RspamdLab) -> None:
    for bad in ("../escape.map", "sub/dir.map", "", ".hidden"):
        with pytest.raises(ValueError):
            rspamd_running.write_map(bad, "x\n")


@pytest.mark.parametrize("missing, package", [("rspamd", "'rspamd'"), ("setpriv", "'util-linux'")])
def test_missing_binary_names_the_package(missing: str, package: str) -> None:
    which = lambda name: None if name == missing else f"/usr/bin/{name}"  # noqa: E731
    with pytest.raises(LabUnavailable, match=package):
        check_prerequisites(which=which, euid=0)


def test_non_root_is_refused_clearly() -> None:
    with pytest.raises(LabUnavailable, match="root"):
        check_prerequisites(which=lambda name: f"/usr/bin/{name}", euid=1000)


def test_lab_config_points_dns_at_the_lab_only(rspamd_running: RspamdLab, nxdns) -> None:
    options = (rspamd_running.etc_dir / "local.d" / "options.inc").read_text()
    assert f'nameserver = ["127.0.0.1:{nxdns.port}"];' in options
    for module in ("fuzzy_check", "rbl", "asn", "neural", "phishing", "rspamd_update",
                   "url_redirector"):
        conf = rspamd_running.etc_dir / "local.d" / f"{module}.conf"
        assert conf.read_text().strip() == "enabled = false;"
    assert Path(rspamd_running.log_path).is_file() and os.path.getsize(rspamd_running.log_path) > 0


@pytest.mark.real  # the real Rspamd
def test_broken_config_fails_fast_with_the_log(lab_dir: Path, nxdns) -> None:
    workdir = lab_dir / "broken-rspamd"
    workdir.mkdir()
    os.chmod(workdir, 0o755)
    broken = RspamdLab(workdir, dns_port=nxdns.port,
                       extra_local_d={"multimap.conf": "BROKEN { type = \"header\";\n"})
    started = time.monotonic()
    with pytest.raises(LabError, match=r"(?s)exited with status 1.*unmatched open brace"):
        broken.start()
    assert time.monotonic() - started < 30  # not the 180 s start timeout
    assert not broken.alive()
