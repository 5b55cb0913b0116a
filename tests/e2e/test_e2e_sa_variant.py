"""Exim's default (SpamAssassin) spamd variant pointed at the shim, in a real Exim 4.96.

This variant sends only ``REPORT SPAMC/1.2``, ``User:`` (the ``spam =`` name) and the scan
file, then half-closes; Exim derives ``$spam_action`` itself (reject iff score >= threshold).
The ACL below is the classic SpamAssassin one; the shim's answer must make Exim's derived
verdict equal the shim's decision, including the forwarding rule, whose context here comes
only from the scan file's X-Envelope-To.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import start_or_fail
from test_e2e_rspamd_doc_acl import LAB_HEAD, LAB_TAIL

from exim_policy.lab import messages
from exim_policy.lab.addresses import FORWARDER, LOCAL
from exim_policy.lab.exim import EximLab
from exim_policy.lab.shim import ShimLab
from exim_policy.lab.smtp import send, wait_mailbox

pytestmark = pytest.mark.real

SA_ACL = """\
spamd_address = {address}
acl_smtp_data = acl_check_data

begin acl

acl_check_data:
  # a scan that cannot be done defers (451): never accept unscanned
  defer   !spam = nobody:true
  deny    condition = ${{if eq{{$spam_action}}{{reject}}}}
          message = SA-variant spam: $spam_score
  warn    add_header = X-SA-Action: $spam_action
          add_header = X-SA-Score: $spam_score
  accept

begin routers

"""


@pytest.fixture(scope="module")
def sa_exim(e2e_dir: Path, shim: ShimLab, sink) -> Iterator[EximLab]:
    address = f"127.0.0.1 {shim.port}"  # no variant=: the SpamAssassin protocol
    lab = EximLab(e2e_dir / "sa-variant", spamd_address=address, sink_port=sink.port,
                  template=LAB_HEAD + SA_ACL.format(address=address) + LAB_TAIL, ipv6=False)
    start_or_fail(lab, "Exim with the SA-variant config")
    yield lab
    lab.stop()


def test_sa_variant_refuses_gtube(sa_exim, stack):
    outcome = send(sa_exim, messages.gtube(to=LOCAL), [LOCAL])
    assert outcome.code == 550 and "SA-variant spam: 15.0" in outcome.text, outcome


def test_sa_variant_delivers_ham_with_exims_derived_action(sa_exim, stack):
    mid = messages.new_message_id()
    outcome = send(sa_exim, messages.ham(to=LOCAL, message_id=mid), [LOCAL])
    assert outcome.accepted, outcome
    delivered = wait_mailbox(sa_exim, "bob", mid)
    assert delivered["X-SA-Action"] == "no action"


def test_sa_variant_applies_the_forwarding_rule_from_the_scan_file(sa_exim, stack):
    # add-header spam: kept for a local mailbox, refused for a forwarder
    mid = messages.new_message_id()
    local = send(sa_exim, messages.x_test_spam(to=LOCAL, message_id=mid), [LOCAL])
    assert local.accepted, local
    assert wait_mailbox(sa_exim, "bob", mid)["X-SA-Action"] == "no action"
    forwarded = send(sa_exim, messages.x_test_spam(to=FORWARDER), [FORWARDER])
    assert forwarded.code == 550, forwarded
