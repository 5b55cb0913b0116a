"""Unix sockets on both hops, no TCP between the three daemons:

    smtplib --SMTP--> Exim --spamd_address = /path/spamd.sock--> shim
                                  --rspamd.url = unix:/path/normal.sock--> Rspamd

Exim connects to the shim's socket as Debian-exim (the socket's mode lets it); the shim
connects to the normal worker's own ``bind_socket`` (lab/rspamd.py binds one beside its
TCP port).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e_helpers import start_or_fail
from exim_policy.lab import RspamdLab, SmtpSink, messages
from exim_policy.lab.addresses import LOCAL
from exim_policy.lab.exim import EximLab
from exim_policy.lab.shim import ShimLab
from exim_policy.lab.smtp import in_sink, send, wait_mailbox

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def unix_shim(e2e_dir: Path, rspamd: RspamdLab) -> Iterator[ShimLab]:
    workdir = e2e_dir / "unix-sockets"
    workdir.mkdir(exist_ok=True)
    workdir.chmod(0o755)
    lab = ShimLab(workdir, rspamd_url=rspamd.socket_url, unix_socket=True)
    start_or_fail(lab, "the shim")
    lab.dir.chmod(0o755)  # (Exim reaches the socket as Debian-exim)
    yield lab
    lab.stop()


@pytest.fixture(scope="module")
def unix_exim(e2e_dir: Path, unix_shim: ShimLab, sink: SmtpSink) -> Iterator[EximLab]:
    lab = EximLab(e2e_dir / "unix-sockets", spamd_address=unix_shim.spamd_socket_address,
                  sink_port=sink.port)
    start_or_fail(lab, "the lab's Exim")
    yield lab
    lab.stop()


def test_both_hops_over_unix_sockets(unix_exim: EximLab, unix_shim: ShimLab,
                                     rspamd_running: RspamdLab, smtp_sink: SmtpSink) -> None:
    # (neither hop has a TCP address to fall back to: Exim knows only the shim's socket,
    # the shim only Rspamd's)
    assert f"Rspamd {rspamd_running.socket_url};" in unix_shim.log_text()
    spam = send(unix_exim, messages.gtube(to=LOCAL), [LOCAL])
    assert (spam.code, spam.text) == (550, "5.7.1 Gtube pattern"), spam
    mid = messages.new_message_id()
    ham = send(unix_exim, messages.ham(to=LOCAL, message_id=mid), [LOCAL])
    assert ham.accepted, ham
    assert "X-Spam" not in wait_mailbox(unix_exim, "bob", mid)
    log = unix_shim.wait_log(f"qid={ham.queue_id} proto=rspamc/CHECK traffic=inbound")
    assert log.count("proto=rspamc/CHECK traffic=inbound") == 2
    assert in_sink(smtp_sink, mid) == []
