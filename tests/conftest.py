"""Session fixtures: the lab (real Rspamd, loopback NXDOMAIN DNS, SMTP sink), started once.

- ``lab_dir``: a fresh ``exim-policy-lab-*`` temp dir (mode 755, so the service users can
  traverse it).  Removed at the end of a session without failures; kept (and its path
  printed) otherwise, or always with ``EXIM_POLICY_KEEP_LAB=1``.
- ``nxdns``: the NXDOMAIN responder (``.port``), Rspamd's only name server.
- ``rspamd``: a started ``RspamdLab`` (``.url``, ``.port``, ``.write_map()``, ``.restart()``).
  Session-scoped: a test that stops it must use ``rspamd_stopped`` (restarted afterwards) or
  ask for ``rspamd_running`` (function-scoped: restarts it first if it is down).
- ``redis_server``: a started ``RedisLab`` (``.url``, ``.port``, ``.restart()``), persistent.
- ``sink`` (session) / ``smtp_sink`` (function, cleared before each test): the SMTP sink.

The lab needs root and real binaries.  When they are missing the fixtures *fail* with the
name of the package to install; they never skip.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/*.py helpers (alias_sets, test_shim_real) are importable by their plain names
# whether or not tests/ is a package
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from exim_policy.lab import LabError, LabUnavailable, NxDns, RspamdLab, SmtpSink  # noqa: E402
from exim_policy.lab.redis import RedisLab  # noqa: E402
from exim_policy.lab.rspamd import check_prerequisites  # noqa: E402


def _report(config: pytest.Config, line: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)


def _fail(what: str, exc: Exception) -> None:
    pytest.fail(f"{what}: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def lab_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="exim-policy-lab-"))
    os.chmod(path, 0o755)  # mkdtemp makes it 700; _rspamd and Debian-exim must get in
    yield path
    if request.session.testsfailed or os.environ.get("EXIM_POLICY_KEEP_LAB"):
        _report(request.config, f"lab dir kept for inspection: {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def nxdns(lab_dir: Path) -> Iterator[NxDns]:
    server = NxDns(lab_dir / "dns")
    try:
        server.start()
    except LabError as exc:
        server.stop()
        _fail("cannot start the lab's DNS responder", exc)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def rspamd(lab_dir: Path, nxdns: NxDns) -> Iterator[RspamdLab]:
    try:
        check_prerequisites()
    except LabUnavailable as exc:
        _fail("the real Rspamd is needed for this test", exc)
    lab = RspamdLab(lab_dir, dns_port=nxdns.port)
    try:
        lab.start()
    except LabError as exc:
        lab.stop()
        _fail("cannot start the lab's Rspamd", exc)
    yield lab
    lab.stop()


@pytest.fixture
def rspamd_running(rspamd: RspamdLab) -> RspamdLab:
    """The session Rspamd, restarted first if an earlier test left it stopped."""
    if not (rspamd.alive() and rspamd.ping()):
        try:
            rspamd.restart()
        except LabError as exc:
            _fail("cannot restart the lab's Rspamd", exc)
    return rspamd


@pytest.fixture
def rspamd_stopped(rspamd: RspamdLab) -> Iterator[RspamdLab]:
    """The session Rspamd, stopped for this test and started again afterwards."""
    rspamd.stop()
    yield rspamd
    rspamd.start()


@pytest.fixture(scope="session")
def redis_server(lab_dir: Path) -> Iterator[RedisLab]:
    """A real redis-server on a loopback port (persistence on), for the whole session.
    Tests that stop it must start it again (``redis_server.start()``)."""
    server = RedisLab(lab_dir, persistent=True)
    try:
        server.start()
    except LabError as exc:
        server.stop()
        _fail("cannot start the lab's Redis", exc)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sink(lab_dir: Path) -> Iterator[SmtpSink]:
    server = SmtpSink(lab_dir / "sink")
    try:
        server.start()
    except LabError as exc:
        _fail("cannot start the lab's SMTP sink", exc)
    yield server
    server.stop()


@pytest.fixture
def smtp_sink(sink: SmtpSink) -> SmtpSink:
    """The session sink with no messages from earlier tests."""
    sink.clear()
    return sink


@pytest.fixture
def notify_socket(tmp_path):
    """A datagram socket where systemd's notify socket would be: (its path, the socket)."""
    import socket

    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    yield path, sock
    sock.close()


#: fixtures that start a daemon of the lab (Rspamd, Redis): a test using one is ``real``
REAL_FIXTURES = frozenset({"rspamd", "rspamd_running", "rspamd_stopped", "redis_server"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``real`` every test that uses a daemon fixture (the others that need a daemon
    binary or root say so themselves): ``pytest -m "not real"`` then runs as any user on
    a machine without them."""
    for item in items:
        if REAL_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real)
