"""A faithful Python model of how Exim 4.96 (src/spam.c) parses a spamd reply.

Used by the codec tests to prove that the bytes we send make Exim see exactly what the
Decision says. Modelled on docs/wire-formats.md, "How Exim reads a reply" to "What the ACL
sees" (source reading + experiments with the real Exim 4.96); the real-Exim proof is in the
end-to-end tests.

* :func:`sscanf` implements the C ``sscanf`` directives Exim's formats use: literal bytes,
  whitespace (matches zero or more whitespace bytes), ``%Ns``, ``%*s``, ``%lf``, ``%*u``, ``%n``.
* :func:`parse_rspamd` / :func:`parse_spamassassin` return an :class:`EximView` (what the ACL
  sees) or None where Exim would DEFER.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_WS = b" \t\n\v\f\r"
_FLOAT = re.compile(rb"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf(?:inity)?|nan)",
                    re.I)
_UNSIGNED = re.compile(rb"[+-]?[0-9]+")
_DIRECTIVE = re.compile(rb"%(\*?)([0-9]*)(lf|s|u|n)")

#: Exim reads into spamd_buffer[32600] and keeps at most 32599 bytes (ip_recv loop)
EXIM_READ_LIMIT = 32599
#: spam_action_buffer[32]
EXIM_ACTION_LIMIT = 31


def sscanf(data: bytes, fmt: bytes) -> tuple[int, list]:
    """(return value, assigned values incl. %n results in order) like glibc's sscanf.

    The return value counts assignments except %n; it is -1 (EOF) when the input ends before
    the first conversion. ``data`` is treated as a C string (ends at the first NUL).
    """
    data = data.split(b"\0", 1)[0]
    pos = 0
    count = 0
    values: list = []
    i = 0

    def input_failure() -> tuple[int, list]:
        return (count if count else -1), values

    while i < len(fmt):
        ch = fmt[i:i + 1]
        if ch in (b" ", b"\t", b"\n", b"\r", b"\v", b"\f"):
            while pos < len(data) and data[pos:pos + 1] in _WS:
                pos += 1
            i += 1
            continue
        if ch == b"%":
            m = _DIRECTIVE.match(fmt, i)
            assert m is not None, fmt[i:]
            i = m.end()
            suppress, width, conv = m.group(1) == b"*", m.group(2), m.group(3)
            if conv == b"n":
                values.append(pos)
                continue
            # every other conversion skips leading whitespace
            while pos < len(data) and data[pos:pos + 1] in _WS:
                pos += 1
            if pos >= len(data):
                return input_failure()
            if conv == b"s":
                limit = int(width) if width else len(data)
                start = pos
                while pos < len(data) and pos - start < limit and data[pos:pos + 1] not in _WS:
                    pos += 1
                value: object = data[start:pos]
            else:
                rx = _FLOAT if conv == b"lf" else _UNSIGNED
                num = rx.match(data, pos)
                if num is None:
                    return count, values
                pos = num.end()
                value = float(num.group()) if conv == b"lf" else int(num.group())
            if not suppress:
                values.append(value)
                count += 1
            continue
        # an ordinary byte must match exactly
        if pos >= len(data):
            return input_failure()
        if data[pos:pos + 1] != ch:
            return count, values
        pos += 1
        i += 1
    return count, values


@dataclass(frozen=True)
class EximView:
    """What the Exim ACL sees after a successful parse."""

    score: float
    threshold: float
    spam: bool            # the ``spam =`` condition (score >= threshold)
    action: str           # $spam_action
    report: str           # $spam_report
    spam_score: str       # $spam_score ("%.1f")


def _report(rest: bytes) -> str:
    """spam.c: drop every CR, add a space after every LF, cut trailing bytes <= ' '."""
    out = bytearray()
    for byte in rest.split(b"\0", 1)[0]:
        if byte == 0x0D:
            continue
        out.append(byte)
        if byte == 0x0A:
            out.append(0x20)
    while out and out[-1] <= 0x20:
        out.pop()
    return out.decode("latin-1")


def _view(score: float, threshold: float, action: str, rest: bytes) -> EximView:
    return EximView(score=score, threshold=threshold, spam=score >= threshold, action=action,
                    report=_report(rest), spam_score=f"{score:.1f}")


def parse_rspamd(reply: bytes, stale_action: str = "") -> EximView | None:
    """Exim's variant=rspamd parse (docs/wire-formats.md, "Exim's reply parser:
    variant=rspamd"); None means DEFER."""
    buf = reply[:EXIM_READ_LIMIT]
    rc, vals = sscanf(buf, b"RSPAMD/%7s 0 EX_OK\r\nMetric: default; %7s %lf / %lf / %lf\r\n%n")
    if rc != 5 or vals[5] >= len(buf):
        return None
    offset = vals[5]
    rest = buf[offset:]
    action = stale_action  # the static buffer is only rewritten when Action: is next
    if rest.startswith(b"Action: "):
        value = bytearray()
        for byte in rest[len(b"Action: "):]:
            if byte in (0, 0x0D) or len(value) >= EXIM_ACTION_LIMIT:
                break
            value.append(byte)
        action = value.decode("latin-1")
    return _view(vals[2], vals[3], action, rest)


def parse_spamassassin(reply: bytes) -> EximView | None:
    """Exim's SpamAssassin-variant parse (docs/wire-formats.md, "Exim's reply parser:
    SpamAssassin variant"); None means DEFER."""
    buf = reply[:EXIM_READ_LIMIT]
    rc, vals = sscanf(buf, b"SPAMD/%7s 0 EX_OK\r\nContent-length: %*u\r\n\r\n%lf/%lf\r\n%n")
    if rc != 3:
        rc, vals = sscanf(buf, b"SPAMD/%7s 0 EX_OK\r\nSpam: %*s ; %lf / %lf\r\n\r\n%n")
        if rc != 3:
            return None
    score, threshold = vals[1], vals[2]
    # no offset check in this branch: an empty report is fine
    # (docs/wire-formats.md, "Exim's reply parser: SpamAssassin variant")
    rest = buf[vals[3]:]
    action = "reject" if score >= threshold else "no action"
    return _view(score, threshold, action, rest)
