"""Why a message was held: read from the fields the bundled DATA ACL adds.

``acl_data.conf`` adds, to outbound spam only (and removes any such field a sender sent):

- ``X-Exim-Policy-Quarantine: reason="..."; auth="alice"; ip=192.0.2.10; helo="...";
  queue=1tXy7a-000Abc-3Q; host=mx1.example.net; score=15.0; action=reject`` (values as
  Exim's ``${quote:}`` writes them). Before this format it was ``REASON; auth=alice;
  score=15.0`` (or ``host=IP``), which quarantine mailboxes from then still hold.
- ``X-Exim-Policy-Report:`` the shim's reply as Exim's ``$spam_report`` folds it, one
  ``Symbol: NAME(score)`` / ``Message: ...`` line per continuation line.
- ``X-Exim-Policy-Recipients:`` ``$recipients`` (read by ``quarantine import`` only: the
  receiver gets the recipients as the SMTP envelope).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import Config
from ..protocol.text import printable, split_address_list, valid_ip
from ..state.names import relay_account, user_account
from .headers import first, lines_of, unfold

_PAIR = re.compile(r'\s*([a-z_]+)=("(?:[^"\\]|\\.)*"|[^;]*)\s*(?:;|$)')
#: (a number float() reads: "1.5.0" or "." is not a score)
_SYMBOL = re.compile(r"^Symbol: ([^(\s]+)\((-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\)")
_INCIDENT = re.compile(r"\bincident (\d+)\b")
_ESCAPES = {"n": "\n", "r": "\r"}


@dataclass(frozen=True)
class Evidence:
    reason: str = ""
    #: the account id the accounts feature uses ("alice", "ip:192.0.2.10")
    account: str = ""
    ip: str = ""
    helo: str = ""
    queue_id: str = ""
    #: the MTA that held it ($primary_hostname)
    host: str = ""
    action: str = ""
    score: float | None = None
    #: (name, score) as the shim answered, in its order
    symbols: tuple[tuple[str, float], ...] = ()
    #: the shim's whole answer, one line per item
    report: tuple[str, ...] = ()
    incident: int | None = None

    def top_symbols(self, n: int = 3) -> tuple[str, ...]:
        ranked = sorted(self.symbols, key=lambda item: -abs(item[1]))
        return tuple(name for name, _ in ranked[:n])


def from_fields(fields: list[tuple[str, bytes]], sender: str, config: Config) -> Evidence:
    """``sender``: the envelope sender (the account of a relay host with relay_key = sender)."""
    raw = first(fields, "X-Exim-Policy-Quarantine")
    pairs = parse_pairs(unfold(raw)) if raw is not None else {}
    report = tuple(lines_of(first(fields, "X-Exim-Policy-Report") or b""))
    symbols = []
    action = pairs.get("action", "")
    for line in report:
        match = _SYMBOL.match(line)
        if match:
            symbols.append((match[1], float(match[2])))
        elif line.startswith("Action: ") and not action:
            action = line[8:]
    reason = pairs.get("reason", "")
    ip = valid_ip(pairs.get("ip") or pairs.get("host_ip")) or ""
    incident = _INCIDENT.search(reason)
    return Evidence(
        reason=printable(reason, limit=1000), account=_account(pairs, ip, sender, config), ip=ip,
        helo=printable(pairs.get("helo", "")), queue_id=printable(pairs.get("queue", "")),
        host=printable(pairs.get("host", "")) if "reason" in pairs else "",
        action=printable(action), score=_score(pairs.get("score")), symbols=tuple(symbols),
        report=report, incident=int(incident[1]) if incident else None)


def parse_pairs(text: str) -> dict[str, str]:
    """``key=value; key="quoted \\" value"`` -> dict; the older ``REASON; auth=..;
    score=..`` form gives ``reason`` (and ``ip`` for its ``host=``)."""
    if not text.startswith("reason="):
        reason, *rest = text.split("; ")
        old = dict(item.partition("=")[::2] for item in rest if "=" in item)
        pairs = {"reason": reason, "auth": old.get("auth", ""), "score": old.get("score", "")}
        if old.get("host"):
            pairs["host_ip"] = old["host"]
        return pairs
    pairs = {}
    for match in _PAIR.finditer(text):
        key, value = match[1], match[2].strip()
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            value = re.sub(r"\\(.)", lambda m: _ESCAPES.get(m[1], m[1]), value[1:-1])
        pairs[key] = value
    return pairs


def recipients_of(fields: list[tuple[str, bytes]]) -> list[str]:
    """The addresses of ``X-Exim-Policy-Recipients`` (``$recipients``: comma-separated)."""
    raw = first(fields, "X-Exim-Policy-Recipients")
    return split_address_list(unfold(raw)) if raw is not None else []


def _account(pairs: dict[str, str], ip: str, sender: str, config: Config) -> str:
    """The id the accounts feature gave the message's sender (policy.account_of)."""
    auth = pairs.get("auth", "")
    if auth:  # the codecs hand names over latin-1 decoded; user_account undoes that
        return user_account(auth.encode("utf-8", "replace").decode("latin-1"))
    if config.accounts.relay_key == "sender":
        return relay_account("sender", sender)
    return relay_account("ip", ip) if ip else ""


def _score(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None
