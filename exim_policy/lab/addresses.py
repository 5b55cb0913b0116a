"""The lab's mail addresses, shared by the end-to-end tests and the demo.

The lab's Exim (:mod:`.exim`) delivers its ``DOMAIN`` (``lab.test``) to local Maildirs
(bob, carol, ...) and every other domain to the SMTP sink, which stands in for the
Internet. ``FORWARDER`` forwards externally once the Exim lab gets ``ALIASES`` and the shim
lists it in its forwarding map; a client connecting from ``RELAY_HOST`` is a relay host once
both are told so (EXIM_POLICY_RELAY_HOSTS, ``[outbound] relay_networks``).
"""
from __future__ import annotations

from .exim import DOMAIN

#: local mailboxes
LOCAL = f"bob@{DOMAIN}"
LOCAL2 = f"carol@{DOMAIN}"
#: a local address that forwards to an external one
FORWARDER = f"fwd@{DOMAIN}"
FORWARD_TARGET = "ext-fwd@example.com"
#: the Exim lab's ``aliases=`` that makes FORWARDER forward to FORWARD_TARGET
ALIASES = {"fwd": FORWARD_TARGET}
#: addresses the sink receives for
EXTERNAL = "carol@example.com"
EXTERNAL2 = "dave@example.net"
#: the SMTP AUTH user of the Exim lab (its default ``auth_users``) and its address
AUTH = ("tester", "testpass")
USER_ADDRESS = f"tester@{DOMAIN}"
#: the sender of inbound mail
INBOUND_SENDER = "alice@example.org"
#: the loopback address Exim and the shim are told is a relay host; clients from
#: 127.0.0.1 are ordinary inbound clients
RELAY_HOST = "::1"
