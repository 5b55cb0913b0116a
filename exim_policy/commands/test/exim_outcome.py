"""What the bundled Exim configuration does with a :class:`~exim_policy.model.Decision`.

``exim-policy test`` shows it as the "Exim" line. Pure: a decision (and the quarantine
address to name) in, an :class:`EximOutcome` out; no I/O, no configuration read. It mirrors
the shipped ``exim/acl_data.conf`` statement by statement, in the order Exim evaluates them:

1. ``decision.defer``: the shim closes without an answer, so the ``defer ... !spam =
   nobody:true`` statement defers and Exim answers its own ``451 Temporary local problem -
   please try later``.
2. ``soft reject`` (any direction): ``451 4.7.1 <text>``.
3. ``reject``, inbound (Traffic INBOUND or FORWARDING: not authenticated, not from a relay
   host): ``550 5.7.1 <text>`` at DATA, for all recipients.
4. ``reject``, outbound: accepted, ``acl_m_outspam = 1``, and a router in
   ``exim/routers.conf`` sends the message to the quarantine receiver
   (``EXIM_POLICY_RECEIVER_HOSTS``) or, in the recipe without a receiver, redirects every
   recipient to ``EXIM_POLICY_QUARANTINE``.
5. ``add header`` / ``rewrite subject``, inbound: accepted with ``X-Spam-Flag: YES`` and
   ``X-Spam-Report`` (and, for ``rewrite subject`` with a new subject in the reply, that
   Subject), on top of the X-Spam-Action/Score/Bar headers every scanned inbound message gets.
6. Anything else (``no action``, ``greylist``, custom actions such as ``discard``, every
   outbound action but ``reject``): accepted; inbound mail carries the informational
   X-Spam-Action/Score/Bar headers, outbound mail is unchanged. Inbound mail the shim
   answered for a scanner that failed (``decision.failure``) carries
   ``X-Spam-Status: unscanned (scanner unavailable)`` instead.

``<text>`` is what the ACL copies into ``acl_m_ep_text``: the text of the reply's first
``Message:`` line (the public text), cut to the length the reply builder keeps; when it is
empty the ACL falls back to ``EXIM_POLICY_REJECT_TEXT`` / ``EXIM_POLICY_TEMPFAIL_TEXT``
(their default texts are used here).

Assumptions: Exim's ``EXIM_POLICY_RELAY_HOSTS`` lists the same networks as the shim's
``[outbound] relay_networks`` (exim/main.conf asks for that), so "outbound" means the same on
both sides and :attr:`Decision.traffic` tells the ACL's ``acl_m_ep_outbound``; and the
message is smaller than ``EXIM_POLICY_MAX_SCAN_SIZE`` (50M), above which Exim does not scan at all.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...model import ADD_HEADER, REJECT, REWRITE_SUBJECT, SOFT_REJECT, Decision, Traffic
from ...protocol.rspamc import MAX_VALUE_BYTES, first_message
from ...protocol.text import encode, one_line, truncate_bytes

#: outcome keywords (stable: ``exim-policy test --json`` prints them)
REJECTED = "rejected"        # 550 at DATA
REDIRECTED = "redirected"    # accepted, delivered to the quarantine instead
TEMPFAIL = "tempfail"        # 451 at DATA, the client retries
MARKED = "marked"            # accepted with X-Spam-Flag / X-Spam-Report headers
ACCEPTED = "accepted"        # accepted (inbound: informational X-Spam-* headers only)

#: outcomes in which the message reaches its recipients as sent (possibly with headers)
ACCEPTED_AS_IS = frozenset({MARKED, ACCEPTED})

#: defaults of the macros in exim/main.conf
DEFAULT_REJECT_TEXT = "Message rejected as spam"
DEFAULT_TEMPFAIL_TEXT = "Message cannot be checked now, please try again later"
#: what Exim answers itself when the spam condition defers
EXIM_DEFER_TEXT = "Temporary local problem - please try later"
#: default of EXIM_POLICY_MAX_SCAN_SIZE (50M, Exim's M is 1024 * 1024): messages this large
#: or larger are not scanned by the bundled config at all (accepted unscanned)
EXIM_MAX_SCAN_SIZE = 50 * 1024 * 1024
#: what to call the quarantine when the caller does not know the expanded macro
DEFAULT_QUARANTINE = "the quarantine address (EXIM_POLICY_QUARANTINE)"


@dataclass(frozen=True)
class EximOutcome:
    """What happens to the message, in Exim's words.

    ``outcome`` is one of the keywords above; ``smtp_code`` is the code of the reply to the
    client's DATA (250 for every kind of acceptance; None is never produced for a decision,
    it is kept for outcomes without an SMTP reply); ``message`` is one sentence for people.
    """

    outcome: str
    smtp_code: int | None
    message: str

    @property
    def accepted_as_is(self) -> bool:
        """True when the recipients get the message (maybe with X-Spam headers)."""
        return self.outcome in ACCEPTED_AS_IS


def acl_text(decision: Decision) -> str:
    """The text the ACL puts in ``acl_m_ep_text``: the reply's first ``Message:`` line.

    Same transformation as the reply builder (one line, UTF-8, cut at a character boundary),
    and, like the ACL's ``(.+)$``, empty when the line is empty.
    """
    raw = truncate_bytes(encode(one_line(first_message(decision))), MAX_VALUE_BYTES)
    return raw.decode("utf-8", errors="replace")


def exim_outcome(decision: Decision, *, quarantine: str = DEFAULT_QUARANTINE) -> EximOutcome:
    """The bundled ACL's treatment of ``decision`` (see the module docstring for the table)."""
    if decision.defer:
        return EximOutcome(TEMPFAIL, 451, f"451 {EXIM_DEFER_TEXT} (the shim sent no answer, "
                                          "so the spam condition deferred; the client retries)")
    text = acl_text(decision)
    outbound = decision.traffic is Traffic.OUTBOUND
    if decision.action == SOFT_REJECT:
        return EximOutcome(TEMPFAIL, 451, f"451 4.7.1 {text or DEFAULT_TEMPFAIL_TEXT} "
                                          "(tempfail at DATA; the client retries)")
    if decision.action == REJECT:
        if outbound:
            return EximOutcome(REDIRECTED, 250, f"accepted, redirected to {quarantine} "
                                                "(acl_m_outspam=1)")
        return EximOutcome(REJECTED, 550, f"550 5.7.1 {text or DEFAULT_REJECT_TEXT} "
                                          "(rejected at DATA)")
    if outbound:
        return EximOutcome(ACCEPTED, 250, "accepted unchanged (outbound: no X-Spam headers)")
    if decision.action in (ADD_HEADER, REWRITE_SUBJECT):
        text = "accepted with X-Spam headers (X-Spam-Flag: YES, X-Spam-Report)"
        scan = decision.scan
        if decision.action == REWRITE_SUBJECT and scan is not None and scan.subject:
            text += f" and Subject: {one_line(scan.subject)}"
        return EximOutcome(MARKED, 250, text)
    if decision.failure is not None:
        return EximOutcome(ACCEPTED, 250, "accepted unscanned, marked "
                                          "X-Spam-Status: unscanned (scanner unavailable)")
    return EximOutcome(ACCEPTED, 250,
                       "accepted (with the X-Spam-Action, X-Spam-Score and X-Spam-Bar headers)")
