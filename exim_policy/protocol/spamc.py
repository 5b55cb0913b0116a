"""SpamAssassin's spamd protocol (``<CMD> SPAMC/1.x``): request -> Envelope, Decision -> reply.

Clients: Exim's default variant (``REPORT SPAMC/1.2``, then a half-close) and ``spamc``
(``SPAMC/1.5``). Exim sends no envelope headers in this variant, so the context comes from
three places only (docs/wire-formats.md, "Exim's scan file (both variants)" and "Rules for
a spamd-compatible server"): the ``User:`` header (the ``spam = NAME`` name),
Exim's ``X-Envelope-From``/``X-Envelope-To`` mbox pseudo-headers, and Exim's own
``Received:`` header right after them.

Reply shapes (docs/wire-formats.md: "Exim's reply parser: SpamAssassin variant",
"SpamAssassin's spamd protocol", "Rules for a spamd-compatible server")::

    version < 1.3 (Exim):  SPAMD/1.1 0 EX_OK\\r\\nSpam: True ; 15.0 / 6.9\\r\\n\\r\\n<body>
    version >= 1.3:        SPAMD/1.1 0 EX_OK\\r\\nContent-length: N\\r\\nSpam: ...\\r\\n\\r\\n<body>
    CHECK (any version):   SPAMD/1.1 0 EX_OK\\r\\nSpam: ...\\r\\n\\r\\n

Exim accepts only the first shape: ``Spam:`` directly after the status line, a space before
``;``. Exim derives ``$spam_action`` itself (``reject`` iff score >= threshold), so the printed
threshold is chosen (:func:`~.scores.exim_threshold`) to make that match the decision.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from typing import TYPE_CHECKING

from ..model import SOFT_REJECT, Decision, Envelope, Request, Symbol
from .mbox import envelope_from_mbox, leading_headers, strip_mbox_from_line
from .parser import version_tuple
from .rspamc import first_message
from .scores import exim_threshold, format_number, format_score
from .text import (MAX_REPLY_BYTES, MAX_VALUE_BYTES, encode, one_line, trim_reply,
                   truncate_bytes, valid_ip)

if TYPE_CHECKING:
    from ..config import Config

STATUS_LINE = b"SPAMD/1.1 0 EX_OK\r\n"
PONG = b"SPAMD/1.5 0 PONG\r\n"

EX_UNAVAILABLE = 69
#: a temporary failure: Exim DEFERs (451) and retries the message later
EX_TEMPFAIL = 75
#: the request did not arrive in time (spamd's own code for it)
EX_TIMEOUT = 79

#: longest error text; the line is read by humans (spamc prints it, Exim logs it)
MAX_ERROR_BYTES = 1000

#: Exim's own Received header (default received_header_text), unfolded:
#:   from NAME ([IP] helo=H ident=I) by HOST with PROTO (Exim V) (envelope-from <S>) id QID ...
#:   from [IP] (helo=H) by HOST with PROTO ...
_RECEIVED = re.compile(r"from\s+(?P<from>.*?)\s+by\s+(?P<by>.*)", re.S | re.I)
_HOSTNAME = re.compile(r"(?P<name>[^\s\[()]+)\s+\(\[")
_IP = re.compile(r"\[(?:IPv6:)?(?P<ip>[0-9A-Fa-f:.]+(?:%[\w.-]+)?)\]", re.I)
_HELO = re.compile(r"\bhelo=(?P<helo>[^\s)]+)", re.I)
_WITH = re.compile(r"(?:^|\s)with\s+(?P<proto>[\w-]+)", re.I)
_ID = re.compile(r"(?:^|\s)id\s+(?P<id>[\w-]+)", re.I)


# ----------------------------------------------------------------------------- request --
@dataclass(frozen=True)
class _Received:
    """What Exim's own ``Received:`` header says about the SMTP client."""

    ip: str | None = None
    helo: str | None = None
    hostname: str | None = None
    queue_id: str | None = None
    authenticated: bool = False


def _received(body: bytes | bytearray) -> _Received:
    """Facts from Exim's own ``Received:``: the first header after the pseudo-headers.

    If that first real header is not a ``Received:``, nothing is trusted: a ``Received``
    further down could be one the client wrote itself (e.g. a forged ``with esmtpa``).
    """
    for name, value in leading_headers(body):
        if name.lower() in ("x-envelope-from", "x-envelope-to"):
            continue
        if name.lower() != "received" or "\x00" in value or "\r" in value:
            return _Received()
        match = _RECEIVED.match(value)
        if match is None:
            return _Received()
        from_part, by_part = match.group("from"), match.group("by")
        hostname = _HOSTNAME.match(from_part)
        ip = _IP.search(from_part)
        helo = _HELO.search(from_part)
        queue_id = _ID.search(by_part)
        proto = _WITH.search(by_part)
        return _Received(
            ip=valid_ip(ip.group("ip")) if ip else None,
            helo=helo.group("helo") if helo else None,
            hostname=hostname.group("name") if hostname else None,
            queue_id=queue_id.group("id") if queue_id else None,
            # Exim's protocol names: esmtpa, esmtpsa, utf8esmtpa, local-esmtpa ... the
            # authenticated ones (and only those) end in "a"
            authenticated=bool(proto and proto.group("proto").lower().endswith("a")),
        )
    return _Received()


def envelope(request: Request, *, anonymous_users: Sequence[str] = ("nobody",)) -> Envelope:
    """The envelope as far as this variant reveals it.

    * ``user``: the ``User:`` header (Exim's ``spam = NAME``) unless it is one of
      ``anonymous_users``; else ``""`` (authenticated, id unknown) when Exim's ``Received:``
      says an authenticated protocol (``with esmtpa``/``esmtpsa``/...); else None.
    * ``sender``/``recipients``: Exim's ``X-Envelope-From``/``X-Envelope-To``
      (:func:`~.mbox.envelope_from_mbox`); a bounce has no ``X-Envelope-From`` -> None.
    * ``ip``, ``helo``, ``hostname``, ``queue_id``: parsed from Exim's ``Received:`` header.
    """
    user_header = request.header("User")
    if user_header is not None:
        user_header = user_header.strip()
        # spamd accepts only [\x20-\xFF]* here
        if not user_header or any(ch < " " or ch == "\x7f" for ch in user_header):
            user_header = None
    sender, recipients = envelope_from_mbox(request.body)
    received = _received(request.body)
    user: str | None
    if user_header is not None and user_header not in anonymous_users:
        user = user_header
    elif received.authenticated:
        user = ""
    else:
        user = None
    return Envelope(sender=sender, recipients=recipients, ip=received.ip, helo=received.helo,
                    hostname=received.hostname, user=user, queue_id=received.queue_id)


# ------------------------------------------------------------------------------- reply --
def build_error(code: int, text: str) -> bytes:
    """``SPAMD/1.0 <code> <text>\\r\\n``: one line, text sanitised and capped; then close."""
    body = truncate_bytes(encode(one_line(text)), MAX_ERROR_BYTES)
    return b"SPAMD/1.0 %d " % code + body + b"\r\n"


def _symbols(decision: Decision) -> list[Symbol]:
    scan = decision.scan
    return list(scan.symbols if scan is not None else ()) + list(decision.symbols)


def _report(decision: Decision, budget: int) -> bytes:
    """The free-text report (CRLF lines), at most ``budget`` bytes.

    ``Action:``, ``Message:`` (the same text as the first ``Message:`` line of the RSPAMC
    reply, so one ACL regex serves both variants), ``Reason:``, Rspamd's other messages, then
    `` <score> <SYMBOL> <description> [<options>]`` per symbol. Symbol lines that do not fit
    are dropped first (Rspamd's low scores first, the shim's own symbols last), then extra
    message lines.
    """
    def line(text: str) -> bytes:
        return truncate_bytes(encode(one_line(text)), MAX_VALUE_BYTES) + b"\r\n"

    first = first_message(decision)
    fixed = [line(f"Action: {decision.action}"), line(f"Message: {first}"),
             line(f"Reason: {decision.reason}")]
    extra: list[bytes] = []
    seen = {one_line(first)}
    for _key, text in (decision.scan.messages if decision.scan is not None else ()):
        if one_line(text) not in seen:
            seen.add(one_line(text))
            extra.append(line(f"Message: {text}"))
    symbols = _symbols(decision)
    symbol_lines = []
    for sym in symbols:
        detail = f" {sym.description}" if sym.description else ""
        if sym.options:
            detail += f" [{', '.join(sym.options)}]"
        symbol_lines.append(line(f" {format_score(sym.score)} {sym.name}{detail}"))

    kept_extra, kept = trim_reply(extra, symbol_lines, [s.score for s in symbols],
                                  len(decision.symbols), budget - sum(map(len, fixed)))
    return b"".join(fixed + [extra[i] for i in sorted(kept_extra)]
                    + [symbol_lines[i] for i in sorted(kept)])


def _header_value(value: str, newline: bytes) -> bytes:
    """A header value that may be folded (``\\n\\t``), re-folded with ``newline``."""
    parts = value.replace("\x00", " ").replace("\r\n", "\n").replace("\r", "\n").split("\n")
    lines = [parts[0]] + [p if p[:1] in (" ", "\t") else "\t" + p for p in parts[1:] if p.strip()]
    return newline.join(encode(p) for p in lines)


def _processed(request: Request, decision: Decision, score: str, threshold: str) -> bytes:
    """The message (mbox ``From `` line stripped) with X-Spam-* and Rspamd's headers on top."""
    message = bytes(strip_mbox_from_line(request.body))  # PROCESS returns it: one copy
    first_lf = message.find(b"\n")
    # keep the message's own line ending: Exim's scan file is LF, a spamc user's may be CRLF
    newline = b"\r\n" if first_lf > 0 and message[first_lf - 1:first_lf] == b"\r" else b"\n"
    flag = decision.is_reject
    headers: list[tuple[str, str]] = [
        ("X-Spam-Flag", "YES" if flag else "NO"),
        ("X-Spam-Status", f"{'Yes' if flag else 'No'}, score={score} required={threshold}"),
        ("X-Spam-Action", decision.action),
    ]
    if decision.scan is not None:
        headers += list(decision.scan.add_headers)
    block = b"".join(encode(one_line(name)) + b": " + _header_value(value, newline) + newline
                     for name, value in headers)
    return block + message


def _header_part(message: bytes) -> bytes:
    """The header block of ``message`` including the blank line that ends it."""
    ends = [i for i in (message.find(b"\n\n"), message.find(b"\r\n\r\n")) if i >= 0]
    if not ends:
        return message
    end = min(ends)
    return message[:end] + (b"\r\n\r\n" if message.startswith(b"\r\n\r\n", end) else b"\n\n")


def answer_at_once(request: Request) -> bytes | None:
    """``PING`` -> :data:`PONG`; ``SKIP`` -> ``b""`` (spamd sends nothing); ``TELL`` ->
    ``build_error(69, ...)``: learning is not supported. None for the scanning commands."""
    if request.command == "PING":
        return PONG
    if request.command == "SKIP":
        return b""
    if request.command == "TELL":
        return build_error(EX_UNAVAILABLE, "Service Unavailable: TELL is not supported")
    return None


def build_reply(request: Request, decision: Decision) -> bytes:
    """The reply bytes for ``request`` (any command the parser accepts) given ``decision``.

    * A ``soft reject`` decision (temporary failure) -> ``build_error(75, ...)``: Exim DEFERs
      on a non-zero code and spamc reports a temporary failure.
    * ``PING``, ``SKIP``, ``TELL``: :func:`answer_at_once`.
    * ``Spam: True`` iff ``decision.is_reject``; score and threshold with one decimal.
    * CHECK: Spam header only. SYMBOLS: comma-joined names (CRLF-terminated below 1.3).
      REPORT: :func:`_report`. REPORT_IFSPAM: the report only when spam.
      PROCESS: the message with X-Spam-* headers (version < 1.3: Content-length only).
      HEADERS: the header block of PROCESS's message.
    * ``decision.defer`` is the server's business (it closes without writing).
    """
    command = request.command
    at_once = answer_at_once(request)
    if at_once is not None:
        return at_once
    if decision.action == SOFT_REJECT:
        return build_error(EX_TEMPFAIL, f"Temporary failure: {decision.reason}")

    legacy = version_tuple(request.version) < (1, 3)
    reject = decision.is_reject
    score = format_score(decision.score, 1)
    threshold = format_number(
        exim_threshold(decision.score, decision.required_score, reject, 1), 1)
    spam_line = b"Spam: %s ; %s / %s\r\n" % (
        b"True" if reject else b"False", score.encode("ascii"), threshold.encode("ascii"))

    if command == "CHECK":
        return STATUS_LINE + spam_line + b"\r\n"
    if command == "SYMBOLS":
        names = ",".join(one_line(s.name).replace(",", " ") for s in _symbols(decision))
        body = encode(names) + (b"\r\n" if legacy else b"")
    elif command in ("REPORT", "REPORT_IFSPAM"):
        head_len = len(STATUS_LINE) + len(spam_line) + 2 + (0 if legacy else 30)
        report = _report(decision, MAX_REPLY_BYTES - head_len)
        body = report if (command == "REPORT" or reject) else b""
    elif command in ("PROCESS", "HEADERS"):
        body = _processed(request, decision, score, threshold)
        if command == "HEADERS":
            body = _header_part(body)
        elif legacy:
            # spamd's PROCESS reply below 1.3 has Content-length and no Spam header
            return STATUS_LINE + b"Content-length: %d\r\n\r\n" % len(body) + body
    else:
        raise ValueError(f"not a SPAMC command: {command!r}")
    if legacy:
        return STATUS_LINE + spam_line + b"\r\n" + body
    return STATUS_LINE + b"Content-length: %d\r\n" % len(body) + spam_line + b"\r\n" + body


class SpamcCodec:
    """The SpamAssassin protocol: Exim's default variant, ``spamc`` (see :mod:`.codec`)."""

    name = "spamc"

    def answer_at_once(self, request: Request) -> bytes | None:
        return answer_at_once(request)

    def envelope(self, request: Request, config: Config) -> Envelope:
        return envelope(request, anonymous_users=config.spamc.anonymous_users)

    def reply(self, request: Request, decision: Decision, config: Config) -> bytes | None:
        """The reply bytes; None for ``defer``: the connection closes unanswered."""
        return None if decision.defer else build_reply(request, decision)


CODEC = SpamcCodec()
