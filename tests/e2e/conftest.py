"""End-to-end fixtures: real Exim 4.96 running the project's exim/ configuration, the real
shim (``exim-policy serve``) and the real Rspamd 3.4 from tests/conftest.py, an SMTP sink.

Layout (all on loopback, free ports, under the session's ``lab_dir``):

    smtplib --SMTP--> Exim (127.0.0.1 and ::1) --spamd_address--> shim --HTTP--> Rspamd
                        |-- lab.test mailboxes (Maildir: bob, carol, quarantine, ...)
                        '-- every other domain --SMTP--> sink

- ``shim``: forwarding map ``fwd@lab.test`` (the Exim alias fwd -> ext-fwd@example.com),
  relay_networks ``::1/128``; failure modes are the defaults (inbound accept, outbound and
  forwarding tempfail).
- ``exim``: EXIM_POLICY_RELAY_HOSTS = ``<; ::1``.  A client connecting from 127.0.0.1 is an
  ordinary inbound client, one connecting from ::1 is one of our relay hosts.
- ``stack``: per test; makes sure Rspamd, the shim and Exim run (an earlier failing test
  may have left one stopped), clears the sink.

These fixtures fail (never skip) when root, exim or rspamd are missing.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from e2e_helpers import Stack, running_stack, start_or_fail  # noqa: E402

from exim_policy.lab import RspamdLab, SmtpSink  # noqa: E402
from exim_policy.lab.addresses import ALIASES, FORWARDER, RELAY_HOST  # noqa: E402
from exim_policy.lab.exim import EximLab, ipv6_loopback_available  # noqa: E402
from exim_policy.lab.shim import ShimLab  # noqa: E402


@pytest.fixture(scope="session")
def e2e_dir(lab_dir: Path) -> Path:
    path = lab_dir / "e2e"
    path.mkdir(exist_ok=True)
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def shim(e2e_dir: Path, rspamd: RspamdLab) -> Iterator[ShimLab]:
    lab = ShimLab(e2e_dir, rspamd_url=rspamd.url, forwarding=(FORWARDER,),
                  relay_networks=(f"{RELAY_HOST}/128",))
    start_or_fail(lab, "the shim")
    yield lab
    lab.stop()


@pytest.fixture(scope="session")
def exim(e2e_dir: Path, shim: ShimLab, sink: SmtpSink) -> Iterator[EximLab]:
    if not ipv6_loopback_available():
        pytest.fail("the end-to-end tests use ::1 as the relay host: this machine has no "
                    "IPv6 loopback", pytrace=False)
    lab = EximLab(e2e_dir, spamd_address=shim.spamd_address, sink_port=sink.port,
                  relay_hosts=f"<; {RELAY_HOST}", aliases=ALIASES)
    start_or_fail(lab, "the lab's Exim")
    yield lab
    lab.stop()


@pytest.fixture
def stack(exim: EximLab, shim: ShimLab, rspamd_running: RspamdLab,
          smtp_sink: SmtpSink) -> Stack:
    return running_stack(exim, shim, rspamd_running, smtp_sink)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything here is the whole chain: marked ``e2e`` and ``real`` (lanes: ``-m e2e``,
    ``-m "not real"``)."""
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.real)
