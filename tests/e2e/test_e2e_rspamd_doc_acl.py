"""Rspamd's own Exim example ("Scanning outbound mail", Exim section) keeps working
verbatim when its spamd_address points at the shim instead of at Rspamd.

The example below is the documentation's text unchanged, except for the port in
``spamd_address``.  Around it, the lab adds only what the example leaves out as
"<rest of configuration>": main options on loopback, a RCPT ACL, AUTH, a router for
other domains (to the SMTP sink) and one for the lab's mailboxes.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import LAB_MAIN, start_or_fail

from exim_policy.lab import messages
from exim_policy.lab.addresses import AUTH, EXTERNAL, LOCAL, USER_ADDRESS
from exim_policy.lab.exim import EximLab
from exim_policy.lab.shim import ShimLab
from exim_policy.lab.smtp import in_sink, send, wait_sink

pytestmark = pytest.mark.real

#: verbatim from rspamd.com "Scanning outbound mail", section "Exim"
RSPAMD_DOC_EXAMPLE = """\
# Global options
spamd_address = 127.0.0.1 11333 variant=rspamd
acl_smtp_data = acl_check_data

begin acl

acl_check_data:
  # Set default value for a variable
  warn
    set acl_m_outspam = 0
  # Always scan mail
  warn
    spam = nobody:true
  # Honor "reject" action for inbound mail...
  deny
    ! authenticated = *
    condition = ${if eq{$spam_action}{reject}}
    message = Discarded high-probability spam
  # If it's our user set acl_m_outspam = 1 instead
  warn
    authenticated = *
    condition = ${if eq{$spam_action}{reject}}
    set acl_m_outspam = 1
  accept

begin routers

# Apply special handling to messages with $acl_m_outspam==1
redirect_outbound_spam:
  driver = redirect
  condition = ${if eq{$acl_m_outspam}{1}}
  data = admin@example.com
# <rest of configuration>
"""
DOC_SPAMD_LINE = "spamd_address = 127.0.0.1 11333 variant=rspamd"

LAB_HEAD = """\
# lab glue (main section), using the SITE_* macros EximLab defines
""" + LAB_MAIN + """\
auth_advertise_hosts = *
tls_advertise_hosts =
# loopback lab only: every recipient is accepted ("accept" is an in-line ACL)
acl_smtp_rcpt = accept

"""

LAB_TAIL = """\
# lab glue (rest of the routers, transports, authenticators)
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
  transport = local_maildir

begin transports

remote_smtp:
  driver = smtp
  port = SITE_RELAY_PORT
  allow_localhost
  hosts_avoid_tls = *

local_maildir:
  driver = appendfile
  directory = SITE_MAILDIR/$local_part_data/Maildir
  maildir_format
  create_directory
  user = SITE_MAIL_USER
  group = SITE_MAIL_USER
  mode = 0640

begin authenticators

PLAIN:
  driver = plaintext
  public_name = PLAIN
  server_prompts = :
  server_condition = ${if crypteq{$auth3}{${lookup{$auth2}lsearch{SITE_PASSWD}{$value}{*}}}}
  server_set_id = $auth2
"""


def doc_config(spamd_address: str) -> str:
    assert RSPAMD_DOC_EXAMPLE.count(DOC_SPAMD_LINE) == 1
    example = RSPAMD_DOC_EXAMPLE.replace(DOC_SPAMD_LINE, f"spamd_address = {spamd_address}")
    return LAB_HEAD + example + "\n" + LAB_TAIL


@pytest.fixture(scope="module")
def doc_exim(e2e_dir: Path, shim: ShimLab, sink) -> Iterator[EximLab]:
    lab = EximLab(e2e_dir / "rspamd-doc", spamd_address=shim.spamd_address,
                  sink_port=sink.port, template=doc_config(shim.spamd_address), ipv6=False)
    start_or_fail(lab, "Exim with Rspamd's example config")
    yield lab
    lab.stop()


@pytest.fixture
def doc_stack(doc_exim, stack):
    return doc_exim, stack


def test_doc_example_refuses_inbound_gtube(doc_stack):
    exim, stack = doc_stack
    mid = messages.new_message_id()
    outcome = send(exim, messages.gtube(to=LOCAL, message_id=mid), [LOCAL])
    assert (outcome.code, outcome.text) == (550, "Discarded high-probability spam"), outcome
    time.sleep(0.3)
    assert in_sink(stack.sink, mid) == []


def test_doc_example_redirects_authenticated_gtube(doc_stack):
    exim, stack = doc_stack
    mid = messages.new_message_id()
    outcome = send(exim, messages.gtube(to=EXTERNAL, from_addr=USER_ADDRESS, message_id=mid),
                   [EXTERNAL], sender=USER_ADDRESS, auth=AUTH)
    assert outcome.accepted, outcome
    redirected = wait_sink(stack.sink, mid)
    # the example's redirect target is admin@example.com, which the lab routes to the sink
    assert redirected.rcpt_tos == ("admin@example.com",)
    exim.wait_completed(outcome.queue_id)
    assert all(EXTERNAL not in m.rcpt_tos for m in in_sink(stack.sink, mid))


def test_doc_example_passes_ham(doc_stack):
    exim, stack = doc_stack
    mid = messages.new_message_id()
    outcome = send(exim, messages.ham(to=EXTERNAL, from_addr=USER_ADDRESS, message_id=mid),
                   [EXTERNAL], sender=USER_ADDRESS, auth=AUTH)
    assert outcome.accepted, outcome
    assert wait_sink(stack.sink, mid).rcpt_tos == (EXTERNAL,)


def test_doc_example_fails_open_when_the_shim_is_down(doc_stack):
    """Why exim/acl_data.conf scans in a "defer" statement: the example's "warn spam"
    is skipped when the scan defers, and outbound spam is relayed to its recipient."""
    exim, stack = doc_stack
    stack.shim.stop()
    try:
        mid = messages.new_message_id()
        outcome = send(exim, messages.gtube(to=EXTERNAL, from_addr=USER_ADDRESS,
                                            message_id=mid),
                       [EXTERNAL], sender=USER_ADDRESS, auth=AUTH)
        assert outcome.accepted, outcome
        relayed = wait_sink(stack.sink, mid)
        assert relayed.rcpt_tos == (EXTERNAL,)  # the spam went out
        assert 'Warning: ACL "warn" statement skipped: condition test deferred' in exim.mainlog
    finally:
        stack.shim.start()
