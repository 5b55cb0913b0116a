"""Account names: what Exim sends becomes one safe, stable id.

An id is what every store keys on, what the logs, notices, the CLI and the helper show.
It never holds a control character, a newline or a lone backslash (they are escaped), and
it is at most :data:`MAX_ID` characters (a longer name is cut and a hash of the whole name
keeps it unique), so no account name can reach a header, a key or a log line raw.
"""
from __future__ import annotations

import hashlib

from ..protocol.text import printable

#: longest id; a longer name keeps its first 200 characters and a hash of the rest
MAX_ID = 256
#: prefixes of the ids of unauthenticated relay-network senders
RELAY_PREFIXES = ("ip:", "sender:")
#: an authenticated name that starts like a relay id (or like this) gets this prefix
USER_PREFIX = "user:"


def _text(raw: str) -> str:
    """The codecs decode request bytes as latin-1; a UTF-8 name is shown as UTF-8."""
    try:
        return raw.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return raw


def _safe(text: str) -> str:
    escaped = printable(text, limit=10 * MAX_ID)
    if len(escaped) <= MAX_ID:
        return escaped
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{escaped[:200]}...#{digest}"


def user_account(name: str) -> str:
    """The id of an authenticated user (Exim's ``$authenticated_id``, as the codec got it)."""
    text = _safe(_text(name))
    if text.startswith((*RELAY_PREFIXES, USER_PREFIX)):
        return USER_PREFIX + text
    return text


def relay_account(kind: str, value: str | None) -> str:
    """``ip:192.0.2.10`` or ``sender:web@example.com`` (``sender:<>`` for a bounce)."""
    return f"{kind}:{_safe(_text(value or ('<>' if kind == 'sender' else 'unknown')))}"
