"""The quarantine through the whole chain: smtplib -> Exim 4.96 (exim/exim.conf, the
receiver router and transport) -> shim -> Rspamd; outbound spam delivered into the shim's
quarantine receiver with its envelope; ``exim-policy quarantine`` releasing it through
Exim to the SMTP sink, once; a receiver that is down; an Exim-written mbox imported."""
from __future__ import annotations

import email
import email.policy
import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import pytest
from e2e_helpers import LAB_MAIN, start_or_fail

from exim_policy.lab import SmtpSink, messages
from exim_policy.lab.addresses import AUTH, USER_ADDRESS
from exim_policy.lab.exim import EximLab, free_port_v4_v6
from exim_policy.lab.ports import LOOPBACK, free_port
from exim_policy.lab.shim import ShimLab
from exim_policy.lab.smtp import in_sink, send, wait_sink

pytestmark = pytest.mark.real

TO, CC, BCC = "carol@example.com", "dave@example.net", "eve@example.org"


@dataclass
class Chain:
    exim: EximLab
    shim: ShimLab
    sink: SmtpSink
    #: the shim holding the quarantine (the scanning shim unless a separate host)
    holder: ShimLab

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "exim_policy", "quarantine", args[0],
                               "--config", str(self.holder.config_path), *args[1:]],
                              capture_output=True, text=True, timeout=120)

    def entries(self) -> list[dict]:
        listed = self.cli("list", "--json")
        assert listed.returncode == 0, listed.stderr
        return json.loads(listed.stdout)

    def wait_entries(self, count: int, timeout: float = 20.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.entries()
            if len(found) >= count or time.monotonic() > deadline:
                assert len(found) == count, (found, self.exim.log_tail(),
                                             self.holder.log_tail())
                return found
            time.sleep(0.2)


@pytest.fixture
def chain(e2e_dir, rspamd_running, sink):
    """``chain(separate_holder=False, release_smtp=False)`` -> Chain (stopped after)."""
    started = []
    base = e2e_dir / f"quarantine-{uuid.uuid4().hex[:8]}"  # traversable by Debian-exim
    base.mkdir()
    base.chmod(0o755)

    def make(separate_holder: bool = False, release_smtp: bool = False) -> Chain:
        exim_port = free_port_v4_v6()
        release_port = free_port() if release_smtp else None
        lab_conf = base / "exim" / "conf" / "lab.conf"  # where EximLab writes its config
        keys = {"release_via": f"smtp:{LOOPBACK}:{release_port}" if release_smtp else "exim",
                "exim_command": ["exim", "-C", str(lab_conf)]}
        if separate_holder:
            holder_dir = base / "quarantine-host"
            holder_dir.mkdir()
            holder = ShimLab(holder_dir, rspamd_url=rspamd_running.url, quarantine=keys)
            started.append(start_or_fail(holder, "the quarantine host's shim"))
            shim = ShimLab(base, rspamd_url=rspamd_running.url)
        else:
            shim = holder = ShimLab(base, rspamd_url=rspamd_running.url, quarantine=keys)
        started.append(start_or_fail(shim, "the shim"))
        exim = EximLab(base, spamd_address=shim.spamd_address, sink_port=sink.port,
                       receiver_port=holder.quarantine_port, release_port=release_port)
        exim.port = exim_port
        started.append(start_or_fail(exim, "the lab's Exim"))
        sink.clear()
        return Chain(exim, shim, sink, holder)

    yield make
    for lab in reversed(started):
        lab.stop()


def outbound_gtube(chain: Chain, mid: str, rcpts=(TO, CC, BCC)):
    message = messages.gtube(to=TO, from_addr=USER_ADDRESS, message_id=mid)
    message = message.replace(b"\r\nSubject:", f"\r\nCc: {CC}\r\nSubject:".encode(), 1)
    outcome = send(chain.exim, message, list(rcpts), sender=USER_ADDRESS, auth=AUTH)
    assert outcome.accepted, outcome
    return outcome


def sink_copies(sink: SmtpSink, mid: str) -> dict[str, int]:
    """Per recipient, how many copies of the message the sink got."""
    counts: dict[str, int] = {}
    for message in in_sink(sink, mid):
        for rcpt in message.rcpt_tos:
            counts[rcpt] = counts.get(rcpt, 0) + 1
    return counts


def test_three_recipients_one_bcc_held_released_once_deleted(chain):
    chain = chain()
    mid = messages.new_message_id()
    outcome = outbound_gtube(chain, mid)
    [entry] = chain.wait_entries(1)
    chain.exim.wait_completed(outcome.queue_id)
    assert [r["address"] for r in entry["recipients"]] == [TO, CC, BCC]
    assert entry["sender"] == USER_ADDRESS and entry["state"] == "held"
    ev = entry["evidence"]
    assert (ev["account"], ev["queue_id"], ev["action"], ev["score"]) == (
        "tester", outcome.queue_id, "reject", 15.0)
    assert "GTUBE" in [s["name"] for s in ev["symbols"]] and ev["helo"] == "client.test"
    assert ev["ip"] == "127.0.0.1" and "authenticated as tester" in ev["reason"]
    assert "Message: Gtube pattern" in ev["report"]
    assert in_sink(chain.sink, mid) == [], "outbound spam reached the outside world"
    assert f"=> {TO} R=exim_policy_quarantine_receiver" in "\n".join(
        chain.exim.log_lines(outcome.queue_id))

    released = chain.cli("release", entry["id"], "--reason", "customer confirmed")
    assert released.returncode == 0, released.stdout + released.stderr
    wait_sink(chain.sink, mid)
    time.sleep(1.0)  # a second copy, or a copy back into the quarantine, would show by now
    assert sink_copies(chain.sink, mid) == {TO: 1, CC: 1, BCC: 1}
    for copy in in_sink(chain.sink, mid):
        assert copy.mail_from == USER_ADDRESS
        head = copy.data.split(b"\r\n\r\n", 1)[0]
        assert BCC.encode() not in head and b"X-Exim-Policy" not in head
    assert len(chain.entries()) == 1, "the release went into the quarantine again"

    again = chain.cli("release", entry["id"], "--reason", "again")
    assert again.returncode == 1 and "already released on " in again.stderr
    assert "by " in again.stderr and "customer confirmed" in again.stderr
    time.sleep(0.5)
    assert sink_copies(chain.sink, mid) == {TO: 1, CC: 1, BCC: 1}
    shown = json.loads(chain.cli("show", entry["id"], "--json").stdout)
    assert [a["action"] for a in shown["audit"]] == ["release-started", "released"]
    assert shown["audit"][1]["reason"] == "customer confirmed"

    path = chain.holder.quarantine_path / "messages" / f"{entry['id']}.eml"
    assert path.exists()
    deleted = chain.cli("delete", entry["id"], "--reason", "done")
    assert deleted.returncode == 0, deleted.stderr
    assert not path.exists()
    assert chain.entries()[0]["state"] == "deleted"


def test_release_through_the_unscanned_smtp_port(chain):
    chain = chain(release_smtp=True)
    mid = messages.new_message_id()
    outbound_gtube(chain, mid, rcpts=(TO, BCC))
    [entry] = chain.wait_entries(1)
    released = chain.cli("release", entry["id"], "--reason", "via port")
    assert released.returncode == 0, released.stdout + released.stderr
    wait_sink(chain.sink, mid)
    time.sleep(1.0)
    assert sink_copies(chain.sink, mid) == {TO: 1, BCC: 1}
    assert len(chain.entries()) == 1  # GTUBE again, but that port is not scanned
    shown = json.loads(chain.cli("show", entry["id"], "--json").stdout)
    assert all(r["state"] == "released" and r["detail"].startswith("250")
               for r in shown["recipients"])


def test_a_receiver_that_is_down_keeps_the_message_queued(chain):
    chain = chain(separate_holder=True)
    chain.holder.stop()
    mid = messages.new_message_id()
    outcome = outbound_gtube(chain, mid)
    chain.exim.wait_log(rf"{outcome.queue_id} .*(Connection refused|defer)")
    assert chain.exim.queue_count() == 1
    assert in_sink(chain.sink, mid) == []
    chain.holder.start()
    run = subprocess.run(["exim", "-C", str(chain.exim.config_path), "-qff"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    [entry] = chain.wait_entries(1)
    chain.exim.wait_completed(outcome.queue_id)
    assert [r["address"] for r in entry["recipients"]] == [TO, CC, BCC]
    assert chain.exim.queue_count() == 0 and in_sink(chain.sink, mid) == []


def test_a_large_message_is_held_whole(chain):
    """20 MB (GTUBE in a small text part beside a large attachment: Rspamd 3.4 matches
    GTUBE only in small text parts) through Exim into the quarantine, byte for byte."""
    chain = chain()
    mid = messages.new_message_id()
    big = messages.gtube(to=TO, from_addr=USER_ADDRESS, message_id=mid)
    message = email.message_from_bytes(big, policy=email.policy.SMTP)
    message.make_mixed()
    message.add_attachment(b"\x00\x01" * (10 * 1024 * 1024), maintype="application",
                           subtype="octet-stream", filename="big.bin")
    outcome = send(chain.exim, message.as_bytes(), [TO], sender=USER_ADDRESS, auth=AUTH,
                   timeout=120)
    assert outcome.accepted, outcome
    [entry] = chain.wait_entries(1, timeout=60)
    assert entry["size"] > 20 * 1024 * 1024
    stored = (chain.holder.quarantine_path / "messages" / f"{entry['id']}.eml").read_bytes()
    held = email.message_from_bytes(stored, policy=email.policy.default)
    [attachment] = list(held.iter_attachments())
    assert attachment.get_content() == b"\x00\x01" * (10 * 1024 * 1024)


# ---------------------------------------------------------------- the mbox recipe --
#: a site configuration that uses the drop-in files with Debian's way of keeping a
#: quarantine: the redirect recipe to a local address delivered into an mbox file
MBOX_SITE = LAB_MAIN + """\
tls_advertise_hosts =
.include main.conf
acl_smtp_rcpt = accept
acl_smtp_data = acl_check_data

begin acl
acl_check_data:
.include acl_data.conf
  accept

begin routers
.include routers.conf
remote:
  driver = manualroute
  domains = ! +local_domains
  route_list = * SITE_SMARTHOST
  self = send
  transport = remote_smtp
mailbox:
  driver = accept
  domains = +local_domains
  local_parts = lsearch;SITE_USERS
  transport = local_mbox

begin transports
.include transports.conf
remote_smtp:
  driver = smtp
  port = SITE_RELAY_PORT
  allow_localhost
  hosts_avoid_tls = *
local_mbox:
  driver = appendfile
  file = SITE_MAILDIR/$local_part_data.mbox
  delivery_date_add
  envelope_to_add
  return_path_add
  user = SITE_MAIL_USER
  group = SITE_MAIL_USER
  mode = 0640
"""


def test_an_mbox_of_five_quarantined_messages_is_imported_and_released_apart(
        e2e_dir, rspamd_running, sink, tmp_path):
    base = e2e_dir / f"mbox-{uuid.uuid4().hex[:8]}"
    base.mkdir()
    base.chmod(0o755)
    lab_conf = base / "exim" / "conf" / "lab.conf"
    shim = ShimLab(base, rspamd_url=rspamd_running.url, relay_networks=("::1/128",),
                   quarantine={"exim_command": ["exim", "-C", str(lab_conf)]})
    exim = EximLab(base, spamd_address=shim.spamd_address, sink_port=sink.port,
                   relay_hosts="<; ::1", template=MBOX_SITE)
    try:
        start_or_fail(shim, "the shim")
        start_or_fail(exim, "Exim with an mbox quarantine")
        sink.clear()
        sent = {}
        for i in range(5):
            mid = messages.new_message_id()
            rcpts = [f"victim{i}@example.com", f"other{i}@example.net"][:1 + i % 2]
            message = messages.gtube(to=rcpts[0], from_addr=f"web{i}@lab.test", message_id=mid)
            outcome = send(exim, message, rcpts, sender=f"web{i}@lab.test", host="::1")
            assert outcome.accepted, outcome
            exim.wait_completed(outcome.queue_id)
            sent[mid] = (f"web{i}@lab.test", rcpts)
        mbox = exim.mail_dir / "quarantine.mbox"
        assert mbox.read_bytes().count(b"\nFrom ") + mbox.read_bytes().startswith(b"From ") == 5
        assert in_sink(sink, next(iter(sent))) == []

        run = lambda *a: subprocess.run(  # noqa: E731
            [sys.executable, "-m", "exim_policy", "quarantine", a[0], "--config",
             str(shim.config_path), *a[1:]], capture_output=True, text=True, timeout=120)
        imported = run("import", str(mbox))
        assert imported.returncode == 0, imported.stdout + imported.stderr
        assert imported.stdout.count(" imported as ") == 5
        entries = json.loads(run("list", "--json").stdout)
        by_mid = {e["message_id"].strip("<>"): e for e in entries}
        assert set(by_mid) == set(sent)
        for mid, (sender, rcpts) in sent.items():
            assert by_mid[mid]["sender"] == sender
            assert [r["address"] for r in by_mid[mid]["recipients"]] == rcpts
            assert by_mid[mid]["evidence"]["account"] == "ip:::1"
        again = run("import", str(mbox))
        assert again.stdout.count("already in the quarantine") == 5

        released = run("release", *(e["id"] for e in entries), "--reason", "test")
        assert released.returncode == 0, released.stdout + released.stderr
        for mid, (sender, rcpts) in sent.items():
            copy = wait_sink(sink, mid)
            assert copy.mail_from == sender and sorted(copy.rcpt_tos) == sorted(rcpts)
        time.sleep(1.0)
        for mid, (_, rcpts) in sent.items():
            assert sink_copies(sink, mid) == {r: 1 for r in rcpts}
        assert len(sink.messages) == 5  # five separate messages, no one else's recipients
    finally:
        exim.stop()
        shim.stop()

