"""Exim ``variant=rspamd`` (``CHECK RSPAMC/1.3``): request -> Envelope, Decision -> reply bytes.

The request headers carry the SMTP envelope (docs/wire-formats.md, "Exim's request:
variant=rspamd"). The reply is Rspamd's legacy text format ("Rspamd's legacy protocol"),
built so that Exim's fixed ``sscanf`` ("Exim's reply parser: variant=rspamd") reads exactly
what the :class:`~exim_policy.model.Decision` says::

    RSPAMD/1.3 0 EX_OK
    Metric: default; <True|False>; <score> / <threshold> / 0.0
    Action: <action>                 <- must be the very next line, <= 31 bytes
    [Subject: <rewritten subject>]   <- only for "rewrite subject"
    Symbol: NAME(score) ...          <- Rspamd's symbols, then the shim's
    Message: <public text>           <- first Message line: the bundled ACL's 550/451 text
    Reason: <the shim's reason>      <- for the admin: the ACL's log line and evidence
    Message: <Rspamd message> ...
    [Message-ID: <id>]

Exim reads only the status, Metric and Action lines; the rest is ``$spam_report``.

``SYMBOLS RSPAMC`` gets the same reply as ``CHECK``. The reply is at most
:data:`~exim_policy.protocol.text.MAX_REPLY_BYTES` long: Symbol lines, then extra Message
lines, are dropped to fit; the status, Metric, Action, first Message and Reason lines
never are.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from ..model import MAX_ACTION_BYTES, REWRITE_SUBJECT, Decision, Envelope, Request, Symbol
from .scores import exim_threshold, format_number, format_score
from .text import (MAX_REPLY_BYTES, MAX_VALUE_BYTES, encode, has_line_breaker, one_line,
                   split_address_list, strip_angle, trim_reply, truncate_bytes, valid_ip)

if TYPE_CHECKING:
    from ..config import Config

STATUS_LINE = b"RSPAMD/1.3 0 EX_OK\r\n"



# ----------------------------------------------------------------------------- request --
def _single(request: Request, name: str) -> str | None:
    """First value of header ``name``, stripped; None when absent, empty or unsafe."""
    value = request.header(name)
    if value is None or has_line_breaker(value):
        return None
    value = value.strip()
    return value or None


def envelope(request: Request) -> Envelope:
    """The envelope Exim sent in the request headers (names matched case-insensitively).

    ``From: <>`` (a bounce) gives sender ``""``, no ``From`` gives None. ``Rcpt`` may repeat
    and may hold a comma list (quotes and ``<>`` respected). ``User`` (Exim's
    ``$authenticated_id``) is sent only when non-empty and becomes ``Envelope.user``. An
    ``IP`` that is not an address counts as absent. Values containing NUL/CR/LF are treated
    as absent; 8-bit bytes survive as latin-1 text (the Request's decoding).
    """
    sender_raw = request.header("From")
    sender = None
    if sender_raw is not None and not has_line_breaker(sender_raw):
        sender = strip_angle(sender_raw)
    recipients: list[str] = []
    for value in request.header_values("Rcpt"):
        if not has_line_breaker(value):
            recipients.extend(split_address_list(value))
    return Envelope(
        sender=sender,
        recipients=tuple(recipients),
        ip=valid_ip(_single(request, "IP")),
        helo=_single(request, "Helo"),
        hostname=_single(request, "Hostname"),
        user=_single(request, "User"),
        queue_id=_single(request, "Queue-Id"),
    )


# ------------------------------------------------------------------------------- reply --
def _line(name: str, value: str) -> bytes:
    return (name.encode("ascii") + b": "
            + truncate_bytes(encode(one_line(value)), MAX_VALUE_BYTES) + b"\r\n")


def _symbol_line(symbol: Symbol) -> bytes:
    return _symbol_start(symbol.name) + format_score(symbol.score).encode("ascii") + b")\r\n"


@functools.lru_cache(maxsize=4096)  # (Rspamd's symbol names: a few hundred configured ones)
def _symbol_start(name: str) -> bytes:
    return b"Symbol: " + truncate_bytes(encode(one_line(name)), MAX_VALUE_BYTES) + b"("


def first_message(decision: Decision) -> str:
    """The text of the first ``Message:`` line: the public text, else (for an action with
    no SMTP-visible text) the reason."""
    return decision.message if decision.message is not None else decision.reason


def build_reply(decision: Decision) -> bytes:
    """The reply bytes for ``decision`` (see the module docstring for the exact shape).

    ``True`` and a threshold the printed score reaches iff ``decision.is_reject``, so Exim's
    ``spam`` condition agrees with ``$spam_action`` (see :func:`~.scores.exim_threshold`).
    """
    scan = decision.scan
    reject = decision.is_reject
    score = format_score(decision.score)
    threshold = format_number(exim_threshold(decision.score, decision.required_score, reject))
    action = truncate_bytes(encode(one_line(decision.action)), MAX_ACTION_BYTES)
    head = [
        STATUS_LINE,
        b"Metric: default; %s; %s / %s / 0.0\r\n" % (
            b"True" if reject else b"False", score.encode("ascii"), threshold.encode("ascii")),
        b"Action: " + action + b"\r\n",
    ]
    if decision.action == REWRITE_SUBJECT and scan is not None and scan.subject:
        head.append(_line("Subject", scan.subject))

    symbols = list(scan.symbols if scan is not None else ()) + list(decision.symbols)
    symbol_lines = [_symbol_line(s) for s in symbols]

    first = _line("Message", first_message(decision))
    first_line = first + _line("Reason", decision.reason)
    extra_lines: list[bytes] = []
    emitted = {first}
    for _key, text in (scan.messages if scan is not None else ()):
        line = _line("Message", text)
        if line not in emitted:
            emitted.add(line)
            extra_lines.append(line)
    tail = _line("Message-ID", scan.message_id) if scan is not None and scan.message_id else b""

    budget = MAX_REPLY_BYTES - sum(map(len, head)) - len(first_line) - len(tail)
    # extra Message lines outrank Symbol lines; among symbols, the shim's own context symbols
    # (last in the list) outrank Rspamd's, and Rspamd's high-|score| symbols the 0.00 ones
    kept_extra, kept_symbols = trim_reply(extra_lines, symbol_lines,
                                          [s.score for s in symbols],
                                          len(decision.symbols), budget)

    return b"".join(
        head
        + [line for i, line in enumerate(symbol_lines) if i in kept_symbols]
        + [first_line]
        + [line for i, line in enumerate(extra_lines) if i in kept_extra]
        + [tail]
    )


class RspamcCodec:
    """Exim ``variant=rspamd``: ``CHECK``/``SYMBOLS RSPAMC`` (see :mod:`.codec`)."""

    name = "rspamc"

    def answer_at_once(self, request: Request) -> bytes | None:
        return None  # both commands are scans

    def envelope(self, request: Request, config: Config) -> Envelope:
        return envelope(request)

    def reply(self, request: Request, decision: Decision, config: Config) -> bytes | None:
        """The reply bytes; None for ``defer``: the connection closes unanswered, so
        Exim's ``spam`` condition defers."""
        return None if decision.defer else build_reply(decision)


CODEC = RspamcCodec()
