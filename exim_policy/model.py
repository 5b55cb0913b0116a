"""Values that cross module boundaries: frozen dataclasses, no I/O.

The action strings are Rspamd's names and, at the same time, the exact ``$spam_action``
values the bundled Exim configuration compares ("no action", "add header", ...).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

NO_ACTION = "no action"
GREYLIST = "greylist"
ADD_HEADER = "add header"
REWRITE_SUBJECT = "rewrite subject"
SOFT_REJECT = "soft reject"
REJECT = "reject"

#: Exim keeps at most 31 bytes of the ``Action:`` line (``spam_action_buffer[32]``).
MAX_ACTION_BYTES = 31


class Traffic(str, enum.Enum):
    """Which way a message flows; each class has its own Settings-ID and failure outcome."""

    INBOUND = "inbound"
    OUTBOUND = "outbound"
    #: inbound mail with at least one recipient that forwards to an external mailbox
    FORWARDING = "forwarding"


class FailureMode(str, enum.Enum):
    """What to answer when the scanner cannot give a verdict."""

    ACCEPT = "accept"      # answer "no action"
    TEMPFAIL = "tempfail"  # answer "soft reject" (the bundled ACL turns it into 451)
    DEFER = "defer"        # close without an answer, so Exim's spam condition DEFERs


@dataclass(frozen=True)
class Request:
    """One complete request as a codec parsed it; nothing interpreted yet.

    Header names keep the case they were sent in, values are decoded as latin-1 so that
    8-bit bytes (SMTPUTF8 addresses, raw HELO) survive a round trip unchanged.
    """

    protocol: str  # "rspamc" (Exim variant=rspamd) or "spamc" (SpamAssassin)
    command: str   # "CHECK", "SYMBOLS", "REPORT", "PING", ...
    version: str   # "1.3", "1.2", "1.5", ...
    headers: tuple[tuple[str, str], ...] = ()
    #: the parser's own buffer (a bytearray) when it comes off the wire: never copied,
    #: and never changed once the request is complete
    body: bytes | bytearray = b""

    def header(self, name: str) -> str | None:
        """First value of a header, matched case-insensitively."""
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    def header_values(self, name: str) -> tuple[str, ...]:
        lname = name.lower()
        return tuple(value for key, value in self.headers if key.lower() == lname)


@dataclass(frozen=True)
class ProtocolError:
    """A request that cannot be served; the codec's reply for it is an error line + close."""

    #: sysexits code for the spamd protocols (76 = EX_PROTOCOL), HTTP status for ``/checkv2``
    code: int
    text: str


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope as Exim knew it at DATA time.

    ``sender`` is "" for a bounce (``<>``) and None when the peer did not say.
    ``user`` is the authenticated id (Exim's ``$authenticated_id``), None when unauthenticated.
    """

    sender: str | None = None
    recipients: tuple[str, ...] = ()
    ip: str | None = None
    helo: str | None = None
    hostname: str | None = None
    user: str | None = None
    queue_id: str | None = None
    #: further request headers for Rspamd, as (name, value), from an HTTP client
    #: (``MTA-Name``, ``Deliver-To``, ...: protocol/checkv2.py PASSTHROUGH_HEADERS)
    passthrough: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Symbol:
    name: str
    score: float = 0.0
    options: tuple[str, ...] = ()
    description: str | None = None


@dataclass(frozen=True)
class ScanResult:
    """Rspamd's verdict (``/checkv2`` JSON), reduced to what the policy and replies use."""

    action: str
    score: float
    required_score: float
    symbols: tuple[Symbol, ...] = ()
    #: ``messages`` object of the reply, as (key, text) pairs, e.g. ("smtp_message", "...")
    messages: tuple[tuple[str, str], ...] = ()
    message_id: str | None = None
    #: rewritten subject, only with "rewrite subject"
    subject: str | None = None
    is_skipped: bool = False
    #: milter header edits Rspamd asked for, kept for the ``test`` command and PROCESS
    add_headers: tuple[tuple[str, str], ...] = ()
    #: Rspamd's whole JSON reply, passed on unchanged to HTTP clients where the shim keeps
    #: the verdict (None: not from JSON); never changed once parsed
    raw: dict[str, Any] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ScanFailure:
    """The scanner gave no usable verdict (down, timeout, HTTP error, bad JSON)."""

    reason: str
    #: the same in one word, for the metrics: a ScannerError's kind, or "no_slot"
    kind: str = field(default="other", compare=False)


@dataclass(frozen=True)
class ScanSkipped:
    """Not scanned: the answer did not depend on Rspamd (an account over its limit)."""

    reason: str


@dataclass(frozen=True)
class Context:
    """What the shim knows that Rspamd does not."""

    #: recipients (as given in the envelope) that forward to an external mailbox
    forwarding: frozenset[str] = frozenset()
    #: the sending account (outbound mail with accounts on), see AccountFacts
    account: AccountFacts | None = None
    #: the message's Subject (evidence for incident notices), decoded leniently
    subject: str | None = None
    #: the traffic class and why (policy.classify), when the caller has it already (the
    #: pipeline needs it before the scan); None: decide() classifies
    traffic: tuple[Traffic, str] | None = None


@dataclass(frozen=True)
class Decision:
    """The final answer for one message.

    ``action`` is the ``$spam_action`` to send. When ``defer`` is true no answer is sent at
    all: the connection is closed so that Exim's ``spam`` condition DEFERs.
    """

    action: str
    traffic: Traffic
    #: one sentence for ``$spam_report`` and the log: why this action
    reason: str
    #: context symbols the shim adds to the reply (score 0, flags for the admin)
    symbols: tuple[Symbol, ...] = ()
    scan: ScanResult | None = None
    failure: ScanFailure | None = None
    defer: bool = False
    forwarding: tuple[str, ...] = ()
    #: why the message was classified as it was ("authenticated as alice", ...)
    traffic_reason: str = ""
    #: the public text of the SMTP reply (``[texts]``, or Rspamd's own message): the first
    #: Message: line (Exim's 550/451 text), the HTTP front's smtp_message. None for actions
    #: whose text no client sees (no action, add header, ...)
    message: str | None = None
    #: the account part (outbound mail with accounts on): its status and what to record
    account: AccountOutcome | None = None
    #: policy.mode = "shadow": the action the shim would have answered instead (None: the
    #: answer is the shim's own, or it would have been the same)
    would: str | None = None

    @property
    def score(self) -> float:
        return self.scan.score if self.scan is not None else 0.0

    @property
    def required_score(self) -> float | None:
        return self.scan.required_score if self.scan is not None else None

    @property
    def is_reject(self) -> bool:
        return self.action == REJECT and not self.defer


# ------------------------------------------------------------------------------ accounts --
class AccountStatus(str, enum.Enum):
    """What the helper answers for an account (``account USER``), and what is stored.

    Only ``ok``, ``held`` and ``locked`` are stored; ``throttled`` is an ``ok`` account
    whose counts are at a limit right now.
    """

    OK = "ok"
    THROTTLED = "throttled"
    HELD = "held"
    LOCKED = "locked"


class TransitionKind(str, enum.Enum):
    """An incident's steps; each is notified once."""

    OPENED = "opened"      # N spam verdicts in the window (straight into notify/hold/lock)
    LOCKED = "locked"      # a held account escalated (lock_after), or a human locked it
    UNLOCKED = "unlocked"  # a human ended it: incident closed, counters cleared


@dataclass(frozen=True)
class Counts:
    """One sliding window of an account, as the store counted it."""

    window: float
    messages: int = 0
    recipients: int = 0
    unique_recipients: int = 0
    #: how many of the message being decided's recipients the window has not seen yet
    fresh_recipients: int = 0


@dataclass(frozen=True)
class Incident:
    id: int
    account: str
    opened: float
    #: "notify", "held" or "locked" while open; "closed" after an unlock
    state: str
    #: what opened it ("5 spam verdicts within 1h", "locked by root: reason")
    reason: str
    shadow: bool = False
    closed: float | None = None
    #: the evidence of its last transition (JSON-ready: what the notice carried)
    evidence: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class AccountState:
    """What the store knows of one account at ``now``: the input of :func:`decide`."""

    account: str
    status: AccountStatus = AccountStatus.OK
    incident: Incident | None = None
    #: one entry per configured limit, in the configuration's order
    windows: tuple[Counts, ...] = ()
    #: spam verdicts within the incident window
    spam_verdicts: int = 0
    #: spam verdicts since the account was held (lock_after)
    spam_since_hold: int = 0


@dataclass(frozen=True)
class MessageEvent:
    """One outbound message of an account, as recorded when the shim answered."""

    at: float
    recipients: tuple[str, ...]
    #: counts toward the limits (False: the limit itself refused it)
    counted: bool
    #: Rspamd's action was one of ``outbound.spam_actions``
    spam: bool
    ip: str | None = None
    queue_id: str | None = None
    subject: str | None = None
    action: str | None = None
    score: float | None = None
    #: the top Rspamd symbols by |score|, names only
    symbols: tuple[str, ...] = ()


@dataclass(frozen=True)
class Transition:
    kind: TransitionKind
    #: the status it moves the account to
    to: AccountStatus
    #: the stored statuses it may start from (empty: any); a store applies it only then,
    #: and OPENED only while no incident is open (two MX nodes that both see the fifth
    #: spam verdict open one incident, not two)
    expect: tuple[AccountStatus, ...]
    reason: str
    shadow: bool = False
    #: the incident mode ("notify", "hold", "lock") for OPENED
    mode: str = ""
    #: who and why, for a human's action (audit); "" for the daemon's own
    who: str = ""


@dataclass(frozen=True)
class AccountFacts:
    """The account part of :class:`Context`: its id, and its state (None: the store could
    not be reached; ``remembered`` is then what this daemon last saw of it)."""

    account: str
    state: AccountState | None
    remembered: AccountStatus = AccountStatus.OK


@dataclass(frozen=True)
class AccountOutcome:
    """The account part of a :class:`Decision`: what the answer was and what to record."""

    account: str
    #: the status the answer was given for (what the helper would say now)
    status: AccountStatus
    event: MessageEvent | None
    transitions: tuple[Transition, ...] = ()
    #: the limit the message ran into ("1h: 500 messages"), if any
    limit: str | None = None
    shadow: bool = False
    #: the store was unreachable (nothing can be recorded)
    store_failed: bool = False
