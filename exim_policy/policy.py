"""The whole business logic: classify a message and decide the final action.

Both functions are pure: everything they need comes in as arguments (the envelope, Rspamd's
result or failure, the shim's context, the configuration) and a :class:`Decision` comes
out. No logging, no I/O, no clock, so the tests are tables.
"""
from __future__ import annotations

import ipaddress

from .config import Config
from .model import (
    NO_ACTION,
    REJECT,
    SOFT_REJECT,
    Context,
    Decision,
    Envelope,
    FailureMode,
    ScanFailure,
    ScanResult,
    Symbol,
    Traffic,
)

#: context symbols the shim adds to every reply where they apply (score 0: flags, not points)
SYM_OUTBOUND = "EXIM_POLICY_OUTBOUND"
SYM_FORWARDING = "EXIM_POLICY_FORWARDING"
SYM_SCANNER_FAILED = "EXIM_POLICY_SCANNER_FAILED"


def classify(envelope: Envelope, context: Context, config: Config) -> tuple[Traffic, str]:
    """Traffic class of a message and the reason, e.g. (OUTBOUND, "authenticated as alice").

    Outbound wins over forwarding: a customer sending to a local alias that forwards is
    still the customer's outbound mail.
    """
    if envelope.user is not None:
        who = envelope.user or "an unknown id"
        return Traffic.OUTBOUND, f"authenticated as {who}"
    relay = _relay_network(envelope.ip, config.outbound.relay_networks)
    if relay is not None:
        return Traffic.OUTBOUND, f"client {envelope.ip} is in relay network {relay}"
    if context.forwarding:
        return Traffic.FORWARDING, "inbound, recipient forwards externally: " + ", ".join(
            sorted(context.forwarding))
    return Traffic.INBOUND, "inbound (not authenticated, not from a relay network)"


def decide(envelope: Envelope, scan: ScanResult | ScanFailure, context: Context,
           config: Config) -> Decision:
    """The final ``$spam_action`` for one message, with the reason and context symbols."""
    traffic, traffic_reason = classify(envelope, context, config)
    forwarding = tuple(r for r in envelope.recipients if r in context.forwarding)
    symbols = _context_symbols(traffic, traffic_reason, forwarding)
    common = dict(traffic=traffic, forwarding=forwarding, traffic_reason=traffic_reason)

    if isinstance(scan, ScanFailure):
        return _on_failure(scan, config.failure.for_traffic(traffic), symbols, common)

    action = scan.action
    summary = f"Rspamd said {action!r}, score {scan.score:.2f} / {scan.required_score:.2f}"
    if traffic is Traffic.OUTBOUND and action in config.outbound.spam_actions:
        return Decision(action=REJECT, scan=scan, symbols=symbols, **common,
                        reason=f"outbound spam ({traffic_reason}): {summary}")
    if traffic is Traffic.FORWARDING and action in config.forwarding.spam_actions:
        return Decision(action=REJECT, scan=scan, symbols=symbols, **common,
                        reason="spam to a recipient that forwards externally ("
                               + ", ".join(forwarding) + f") is rejected: {summary}",
                        message=config.forwarding.reject_message or None)
    return Decision(action=action, scan=scan, symbols=symbols, **common,
                    reason=_rspamd_reason(scan, summary))


def _on_failure(failure: ScanFailure, mode: FailureMode, symbols: tuple[Symbol, ...],
                common: dict) -> Decision:
    symbols = symbols + (Symbol(SYM_SCANNER_FAILED, 0.0, (mode.value,)),)
    traffic = common["traffic"].value
    why = f"scanner unavailable ({failure.reason}); failure.{traffic} = {mode.value}"
    if mode is FailureMode.ACCEPT:
        return Decision(action=NO_ACTION, failure=failure, symbols=symbols, reason=why, **common)
    # "defer" sends no answer at all; the action is what the log shows
    return Decision(action=SOFT_REJECT, failure=failure, symbols=symbols, reason=why,
                    defer=mode is FailureMode.DEFER, **common)


def _context_symbols(traffic: Traffic, traffic_reason: str,
                     forwarding: tuple[str, ...]) -> tuple[Symbol, ...]:
    symbols = []
    if traffic is Traffic.OUTBOUND:
        symbols.append(Symbol(SYM_OUTBOUND, 0.0, (traffic_reason,)))
    if forwarding:
        symbols.append(Symbol(SYM_FORWARDING, 0.0, forwarding))
    return tuple(symbols)


def _rspamd_reason(scan: ScanResult, summary: str) -> str:
    """Rspamd's own SMTP message when it gave one (e.g. "Gtube pattern"), else a summary."""
    for key, text in scan.messages:
        if key in ("smtp_message", "") and text:
            return f"{text} ({summary})"
    return summary


def _relay_network(ip: str | None, networks: tuple) -> object | None:
    if not ip or not networks:
        return None
    try:
        addr = ipaddress.ip_address(ip.strip("[]"))
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # Exim can report IPv4 clients on a dual-stack socket so
    for net in networks:
        if addr.version == net.version and addr in net:
            return net
    return None
