"""The quarantine receiver restarted under Exim (found by bench/bench_chain.py's
receiver-restart fault): once it is back, outbound spam must reach it again soon,
without an administrator forcing a queue run.

Exim keeps a retry time per host. After one failed connection to the receiver, no new
message is tried either until that time has passed ("retry time not reached"); the
general rule of exim/exim.conf waits 15 minutes first, so a receiver that was away for a
few seconds kept every quarantined message queued for 15 minutes or more (Debian's queue
runner comes every 30). The first delivery that gets through takes the messages waiting
for that host along on its connection.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from e2e_helpers import build_debian_config, start_or_fail

from exim_policy.lab import messages
from exim_policy.lab.addresses import AUTH, USER_ADDRESS
from exim_policy.lab.exim import EximLab, free_port_v4_v6
from exim_policy.lab.shim import ShimLab
from exim_policy.lab.smtp import send

pytestmark = pytest.mark.real

TO = "carol@example.com"
EXIM_DIR = Path(__file__).resolve().parents[2] / "exim"
#: the general rule of exim/exim.conf and of Debian's conf.d/retry/30_exim4-config
GENERAL_RULE = "F,2h,15m; G,16h,1h,1.5; F,4d,6h"


def held(holder: ShimLab) -> list[dict]:
    listed = subprocess.run([sys.executable, "-m", "exim_policy", "quarantine", "list",
                             "--json", "--config", str(holder.config_path)],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


def outbound_spam(exim: EximLab) -> str:
    mid = messages.new_message_id()
    outcome = send(exim, messages.gtube(to=TO, from_addr=USER_ADDRESS, message_id=mid), [TO],
                   sender=USER_ADDRESS, auth=AUTH)
    assert outcome.accepted, outcome
    return outcome.queue_id or ""


def test_outbound_spam_reaches_a_receiver_soon_after_it_is_back(e2e_dir, rspamd_running, sink):
    base = e2e_dir / f"faults-receiver-{uuid.uuid4().hex[:8]}"
    base.mkdir()
    base.chmod(0o755)
    (base / "holder").mkdir()
    holder = ShimLab(base / "holder", rspamd_url=rspamd_running.url, quarantine={})
    shim = ShimLab(base, rspamd_url=rspamd_running.url)
    exim = EximLab(base, spamd_address=shim.spamd_address, sink_port=sink.port,
                   receiver_port=holder.quarantine_port)
    exim.port = free_port_v4_v6()
    try:
        start_or_fail(holder, "the quarantine receiver")
        start_or_fail(shim, "the shim")
        start_or_fail(exim, "the lab's Exim")
        holder.stop()
        first = outbound_spam(exim)
        exim.wait_log(rf"{first} .*Connection refused")
        holder.start()
        back = time.monotonic()
        # mail keeps coming: each new message is a delivery attempt of its own
        queued = [first]
        deadline = back + 30.0
        while time.monotonic() < deadline:
            queued.append(outbound_spam(exim))
            if len(held(holder)) >= len(queued):
                break
            time.sleep(1.0)
        took = time.monotonic() - back
        found = {e["evidence"]["queue_id"] for e in held(holder)}
        missing = [q for q in queued if q not in found]
        assert not missing, (f"{len(missing)} of {len(queued)} held messages still queued "
                             f"{took:.0f}s after the receiver was back:\n{exim.log_tail()}")
        # EXIM_POLICY_RECEIVER_RETRY is 1 s; the rest is a loaded machine's slack
        assert took < 10.0, f"the receiver got them {took:.1f}s after it was back"
    finally:
        exim.stop()
        shim.stop()
        holder.stop()


def test_debians_split_configuration_has_the_receiver_rule_first():
    """exim/debian/conf.d/retry/20_exim-policy_quarantine lands between Debian's "begin
    retry" and its general rule, with the macros of 04_exim-policy_options."""
    private = Path(tempfile.mkdtemp(prefix="exim-policy-retry-"))
    private.chmod(0o755)
    try:
        built = build_debian_config(private, EXIM_DIR, "EXIM_POLICY_RECEIVER_HOSTS = 127.0.0.1\n")
        checked = subprocess.run(["exim", "-C", str(built), "-bV"], capture_output=True,
                                 text=True, timeout=30)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        text = built.read_text()
        retry = text[text.index("begin retry"):]
        ours = retry.index("{EXIM_POLICY_RECEIVER_HOSTS}{$host}{receiver.invalid}")
        assert ours < retry.index(GENERAL_RULE), retry[:2000]
    finally:
        shutil.rmtree(private, ignore_errors=True)
