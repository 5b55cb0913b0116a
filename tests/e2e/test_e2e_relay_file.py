"""One relay list for both sides: Exim's EXIM_POLICY_RELAY_HOSTS and the shim's
outbound.relay_networks_file name the same file, so "outbound" cannot mean two things.

    smtplib from ::1 --SMTP--> Exim (relay hosts: the file) --spamd--> shim (the file)
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e_helpers import start_or_fail
from exim_policy.lab import RspamdLab, SmtpSink, messages
from exim_policy.lab.addresses import EXTERNAL, LOCAL
from exim_policy.lab.exim import EximLab
from exim_policy.lab.shim import ShimLab
from exim_policy.lab.smtp import in_sink, send, wait_mailbox

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def relay_file(e2e_dir: Path) -> Path:
    workdir = e2e_dir / "relay-file"
    workdir.mkdir(exist_ok=True)
    workdir.chmod(0o755)  # Exim reads the file as Debian-exim
    path = workdir / "relay-networks"
    path.write_text("# our own relays\n::1   # IPv6 loopback\n\n192.0.2.0/24\n")
    path.chmod(0o644)
    return path


@pytest.fixture(scope="module")
def file_shim(e2e_dir: Path, rspamd: RspamdLab, relay_file: Path) -> Iterator[ShimLab]:
    lab = ShimLab(e2e_dir / "relay-file", rspamd_url=rspamd.url,
                  relay_networks_file=str(relay_file))
    start_or_fail(lab, "the shim")
    yield lab
    lab.stop()


@pytest.fixture(scope="module")
def file_exim(e2e_dir: Path, file_shim: ShimLab, sink: SmtpSink,
              relay_file: Path) -> Iterator[EximLab]:
    lab = EximLab(e2e_dir / "relay-file", spamd_address=file_shim.spamd_address,
                  sink_port=sink.port, relay_hosts=str(relay_file))
    start_or_fail(lab, "the lab's Exim")
    yield lab
    lab.stop()


def test_one_file_makes_a_relay_host_outbound_on_both_sides(file_exim: EximLab,
                                                            file_shim: ShimLab,
                                                            rspamd_running: RspamdLab,
                                                            smtp_sink: SmtpSink) -> None:
    mid = messages.new_message_id()
    outcome = send(file_exim, messages.gtube(to=EXTERNAL, message_id=mid), [EXTERNAL],
                   host="::1")
    assert outcome.accepted, outcome  # Exim: ::1 is a relay host (may relay, quarantines)
    quarantined = wait_mailbox(file_exim, "quarantine", mid)
    assert "ip=::1" in quarantined["X-Exim-Policy-Quarantine"]
    file_shim.wait_log("client ::1 is in relay network ::1/128")  # the shim too
    file_exim.wait_completed(outcome.queue_id)
    assert in_sink(smtp_sink, mid) == []
    # 127.0.0.1 is in neither: inbound, refused
    again = send(file_exim, messages.gtube(to=LOCAL), [LOCAL], host="127.0.0.1")
    assert again.code == 550, again
