"""``Lab``: nxdns + rspamd + sink in one work dir, stopped in reverse order on exit."""
from __future__ import annotations

import json
import os
import shutil
import smtplib
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from exim_policy.lab import Lab, LabUnavailable, check_prerequisites, messages
from exim_policy.lab.ports import tcp_accepts
from exim_policy.lab.process import group_members, pid_alive


@pytest.fixture
def workdir() -> Iterator[Path]:
    # not tmp_path: pytest's base dir is 0700 and _rspamd must traverse the lab dir
    path = Path(tempfile.mkdtemp(prefix="exim-policy-lab-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.real  # the real Rspamd
def test_lab_starts_all_parts_and_stops_them(workdir: Path) -> None:
    try:
        check_prerequisites()
    except LabUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    with Lab(workdir, sink=True) as lab:
        assert lab.rspamd is not None and lab.sink is not None
        assert oct(workdir.stat().st_mode & 0o777) == oct(0o755)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        request = urllib.request.Request(
            lab.rspamd.url + "/checkv2", data=messages.gtube(), method="POST",
            headers={"IP": "127.0.0.1", "From": messages.DEFAULT_FROM,
                     "Rcpt": messages.DEFAULT_TO})
        with opener.open(request, timeout=10) as resp:
            assert json.loads(resp.read())["action"] == "reject"
        with smtplib.SMTP("127.0.0.1", lab.sink.port, timeout=10) as client:
            client.sendmail("a@lab.test", ["b@example.com"], b"Subject: s\r\n\r\nbody\r\n")
        assert len(lab.sink.wait_for(1, timeout=5)) == 1
        rspamd_pid = lab.rspamd.process.pid if lab.rspamd.process else None
        dns_pid = lab.nxdns.process.pid if lab.nxdns.process else None
        ports = (lab.rspamd.port, lab.sink.port)
    assert rspamd_pid is not None and dns_pid is not None
    assert not pid_alive(rspamd_pid) and group_members(rspamd_pid) == []
    assert not pid_alive(dns_pid)
    assert not any(tcp_accepts("127.0.0.1", port) for port in ports)
    assert os.path.isfile(workdir / "rspamd" / "log" / "rspamd.log")
