"""The whole business logic: classify a message and decide the final action.

The functions are pure: everything they need comes in as arguments (the envelope, Rspamd's
result or failure, the shim's context with the account's state, the configuration, the
time) and a :class:`Decision` comes out, with what to record for the account. No logging,
no I/O, no clock of their own, so the tests are tables.
"""
from __future__ import annotations

import dataclasses
from typing import TypedDict

from .config import Config, format_duration
from .model import (
    NO_ACTION,
    REJECT,
    SOFT_REJECT,
    AccountFacts,
    AccountOutcome,
    AccountState,
    AccountStatus,
    Context,
    Decision,
    Envelope,
    FailureMode,
    MessageEvent,
    ScanFailure,
    ScanResult,
    ScanSkipped,
    Symbol,
    Traffic,
    Transition,
    TransitionKind,
)
from .networks import network_of
from .state.names import relay_account, user_account

#: context symbols the shim adds to every reply where they apply (score 0: flags, not points)
SYM_OUTBOUND = "EXIM_POLICY_OUTBOUND"
SYM_FORWARDING = "EXIM_POLICY_FORWARDING"
SYM_SCANNER_FAILED = "EXIM_POLICY_SCANNER_FAILED"
SYM_ACCOUNT = "EXIM_POLICY_ACCOUNT"
#: policy.mode = "shadow": what the shim would have answered (its option)
SYM_SHADOW = "EXIM_POLICY_SHADOW"
#: how many of Rspamd's symbols (by |score|) an account's evidence keeps per message
EVIDENCE_SYMBOLS = 5
_ON_OPEN = {"notify": AccountStatus.OK, "hold": AccountStatus.HELD, "lock": AccountStatus.LOCKED}


def classify(envelope: Envelope, context: Context, config: Config) -> tuple[Traffic, str]:
    """Traffic class of a message and the reason, e.g. (OUTBOUND, "authenticated as alice").

    Outbound wins over forwarding: a customer sending to a local alias that forwards is
    still the customer's outbound mail.
    """
    if envelope.user is not None:
        who = envelope.user or "an unknown id"
        return Traffic.OUTBOUND, f"authenticated as {who}"
    relay = network_of(envelope.ip, config.outbound.all_relay_networks) if envelope.ip else None
    if relay is not None:
        return Traffic.OUTBOUND, f"client {envelope.ip} is in relay network {relay}"
    if context.forwarding:
        return Traffic.FORWARDING, "inbound, recipient forwards externally: " + ", ".join(
            sorted(context.forwarding))
    return Traffic.INBOUND, "inbound (not authenticated, not from a relay network)"


def account_of(envelope: Envelope, traffic: Traffic, config: Config) -> str | None:
    """The account an outbound message counts for (None: accounts off, or not outbound):
    the authenticated id, else per ``accounts.relay_key`` the client IP or the sender."""
    if not config.accounts.enabled or traffic is not Traffic.OUTBOUND:
        return None
    if envelope.user:
        return user_account(envelope.user)
    if config.accounts.relay_key == "sender":
        return relay_account("sender", envelope.sender)
    return relay_account("ip", envelope.ip)


def over_limit(state: AccountState, recipients: int, fresh: int | None,
               config: Config) -> str | None:
    """The first limit a message of ``recipients`` recipients (``fresh`` of them new to a
    window; None: as the store counted them) would go over, as text, or None."""
    for limit, counts in zip(config.accounts.limits, state.windows, strict=True):
        new = counts.fresh_recipients if fresh is None else fresh
        per = format_duration(limit.window)
        if limit.messages and counts.messages + 1 > limit.messages:
            return f"{limit.messages} messages per {per}"
        if limit.recipients and counts.recipients + recipients > limit.recipients:
            return f"{limit.recipients} recipients per {per}"
        if limit.unique_recipients and counts.unique_recipients + new > limit.unique_recipients:
            return f"{limit.unique_recipients} unique recipients per {per}"
    return None


def as_seen(state: AccountState, config: Config) -> AccountState:
    """The state as this mode sees it: enforcing ignores what a shadow-mode incident did
    (switching shadow mode off must not suddenly hold the accounts it would have held)."""
    incident = state.incident
    if not config.accounts_shadow and incident is not None and incident.shadow:
        return dataclasses.replace(state, status=AccountStatus.OK, incident=None,
                                   spam_since_hold=0)
    return state


def account_status(state: AccountState | None, config: Config) -> AccountStatus:
    """What the policy helper answers for an account (``account USER``): its stored
    status, or ``throttled`` when a one-recipient message would go over a limit now.
    Shadow mode and accounts off always answer ``ok``."""
    if state is None or not config.accounts.enabled or config.accounts_shadow:
        return AccountStatus.OK
    state = as_seen(state, config)
    if state.status is AccountStatus.OK and over_limit(state, 1, 1, config):
        return AccountStatus.THROTTLED
    return state.status


def must_scan(envelope: Envelope, context: Context, config: Config) -> bool:
    """False when the answer is known without Rspamd: an enforced limit refuses it."""
    facts = context.account
    if facts is None or facts.state is None or config.accounts_shadow:
        return True
    state = as_seen(facts.state, config)
    return state.status is not AccountStatus.OK or \
        over_limit(state, len(envelope.recipients), None, config) is None


def decide(envelope: Envelope, scan: ScanResult | ScanFailure | ScanSkipped, context: Context,
           config: Config, now: float) -> Decision:
    """The final ``$spam_action`` for one message, with the reason and context symbols,
    and (for an account's outbound mail) what to record for the account at ``now``."""
    if isinstance(scan, ScanSkipped):
        if context.account is None or context.account.state is None:
            raise ValueError("a scan is only skipped for an account over a limit")
        traffic, traffic_reason = context.traffic or classify(envelope, context, config)
        unscanned = Decision(action=SOFT_REJECT, traffic=traffic, reason="",
                             traffic_reason=traffic_reason,
                             symbols=_context_symbols(traffic, traffic_reason, ()))
        return _account_decision(unscanned, envelope, scan, context.account, context, config,
                                 now)
    verdict = _verdict(envelope, scan, context, config)
    if context.account is not None:
        verdict = _account_decision(verdict, envelope, scan, context.account, context, config,
                                    now)
    if config.policy.mode == "shadow" and isinstance(scan, ScanResult):
        return _shadowed(verdict, scan, config)
    return verdict


def _shadowed(decision: Decision, scan: ScanResult, config: Config) -> Decision:
    """policy.mode = "shadow": Rspamd's verdict is the answer, with the public text it
    would have without the shim; the reason and an EXIM_POLICY_SHADOW symbol
    say what the shim would have answered. What to record for the account stays (as
    shadow: accounts_shadow)."""
    if decision.action == scan.action:
        return decision
    return dataclasses.replace(
        decision, action=scan.action, would=decision.action, defer=False,
        message=_rspamd_text(scan, config),
        reason=f"shadow mode, would answer {decision.action!r}: {decision.reason}",
        symbols=decision.symbols + (Symbol(SYM_SHADOW, 0.0, (decision.action,)),))


class _Common(TypedDict):
    """The fields every verdict of one message shares."""

    traffic: Traffic
    forwarding: tuple[str, ...]
    traffic_reason: str


def _verdict(envelope: Envelope, scan: ScanResult | ScanFailure, context: Context,
             config: Config) -> Decision:
    """The answer from the traffic class and Rspamd's result alone."""
    traffic, traffic_reason = context.traffic or classify(envelope, context, config)
    forwarding = tuple(r for r in envelope.recipients if r in context.forwarding)
    symbols = _context_symbols(traffic, traffic_reason, forwarding)
    common = _Common(traffic=traffic, forwarding=forwarding, traffic_reason=traffic_reason)

    if isinstance(scan, ScanFailure):
        return _on_failure(scan, config.failure.for_traffic(traffic), symbols, common,
                           config)

    action = scan.action
    summary = f"Rspamd said {action!r}, score {scan.score:.2f} / {scan.required_score:.2f}"
    if traffic is Traffic.OUTBOUND and action in config.outbound.spam_actions:
        return Decision(action=REJECT, scan=scan, symbols=symbols, **common,
                        reason=f"outbound spam ({traffic_reason}): {summary}",
                        message=config.texts.outbound)
    if traffic is Traffic.FORWARDING and action in config.forwarding.spam_actions:
        return Decision(action=REJECT, scan=scan, symbols=symbols, **common,
                        reason="spam to a recipient that forwards externally ("
                               + ", ".join(forwarding) + f") is rejected: {summary}",
                        message=config.texts.forwarding)
    return Decision(action=action, scan=scan, symbols=symbols, **common,
                    reason=_rspamd_reason(scan, summary), message=_rspamd_text(scan, config))


def _account_decision(verdict: Decision, envelope: Envelope,
                      scan: ScanResult | ScanFailure | ScanSkipped, facts: AccountFacts,
                      context: Context, config: Config, now: float) -> Decision:
    """The verdict, contained (held, locked, throttled) as the account's state says, with
    the message event and incident transitions to record. Shadow mode records the same
    and answers the verdict: the reason says what would have happened."""
    shadow = config.accounts_shadow
    who = facts.account
    state = facts.state
    if state is None:  # the store is unreachable: what this daemon remembers, and
        status = facts.remembered  # failure.accounts
        outcome = AccountOutcome(who, status, None, shadow=shadow, store_failed=True)
        if status in (AccountStatus.HELD, AccountStatus.LOCKED):
            return _contained(verdict, status, f"account {who} is {status.value} (as last seen;"
                              " the account store is unreachable)", outcome, shadow,
                              message=config.texts.held)
        if config.failure.accounts == "tempfail":
            return _contained(verdict, AccountStatus.THROTTLED, f"account store unreachable "
                              f"(failure.accounts = tempfail); account {who}", outcome, shadow,
                              message=config.texts.tempfail)
        return _annotated(verdict, outcome, f"account {who}: store unreachable, not counted")

    state = as_seen(state, config)
    status = state.status
    limit = over_limit(state, len(envelope.recipients), None, config) \
        if status is AccountStatus.OK else None
    spam = isinstance(scan, ScanResult) and scan.action in config.outbound.spam_actions
    event = MessageEvent(
        at=now, recipients=envelope.recipients, counted=limit is None, spam=spam,
        ip=envelope.ip, queue_id=envelope.queue_id, subject=context.subject,
        action=scan.action if isinstance(scan, ScanResult) else None,
        score=scan.score if isinstance(scan, ScanResult) else None,
        symbols=_top_symbols(scan) if isinstance(scan, ScanResult) else ())
    transitions = _transitions(state, spam, config, shadow)
    answered = AccountStatus.THROTTLED if limit else status
    outcome = AccountOutcome(who, answered, event, transitions, limit=limit, shadow=shadow)
    incident = state.incident
    if status is not AccountStatus.OK:
        ref = f": incident {incident.id}" if incident is not None else ""
        return _contained(verdict, status, f"account {who} is {status.value}{ref}", outcome,
                          shadow, message=config.texts.held)
    if limit is not None:
        return _contained(verdict, AccountStatus.THROTTLED,
                          f"account {who} is over its limit of {limit}", outcome, shadow,
                          message=config.texts.throttled)
    if transitions:
        step = transitions[0]
        would = "would open" if shadow else "opens"
        return _annotated(verdict, outcome, f"account {who}: {step.reason}: {would} an "
                                            f"incident ({step.mode})")
    return _annotated(verdict, outcome, "")


def _transitions(state: AccountState, spam: bool, config: Config,
                 shadow: bool) -> tuple[Transition, ...]:
    rules = config.accounts.incident
    if not spam:
        return ()
    if state.incident is None and rules.spam_verdicts \
            and state.spam_verdicts + 1 >= rules.spam_verdicts:
        return (Transition(TransitionKind.OPENED, _ON_OPEN[rules.on_open],
                           expect=(AccountStatus.OK,), shadow=shadow, mode=rules.on_open,
                           reason=f"{state.spam_verdicts + 1} spam verdicts within "
                                  f"{format_duration(rules.window)}"),)
    if state.status is AccountStatus.HELD and rules.lock_after \
            and state.spam_since_hold + 1 >= rules.lock_after:
        return (Transition(TransitionKind.LOCKED, AccountStatus.LOCKED,
                           expect=(AccountStatus.HELD,), shadow=shadow, mode="lock",
                           reason=f"{state.spam_since_hold + 1} more spam verdicts while "
                                  "held"),)
    return ()


def _top_symbols(scan: ScanResult) -> tuple[str, ...]:
    ranked = sorted(scan.symbols, key=lambda s: -abs(s.score))
    return tuple(s.name for s in ranked[:EVIDENCE_SYMBOLS])


def _account_symbol(outcome: AccountOutcome, note: str) -> Symbol:
    options = [outcome.account, outcome.status.value] + ([note] if note else [])
    return Symbol(SYM_ACCOUNT, 0.0, tuple(options))


def _annotated(verdict: Decision, outcome: AccountOutcome, note: str) -> Decision:
    """The verdict as it is, with what the account adds to it, if anything (then the
    reason says it and the reply carries an EXIM_POLICY_ACCOUNT symbol)."""
    if not note:
        return dataclasses.replace(verdict, account=outcome)
    return dataclasses.replace(verdict, reason=f"{verdict.reason}; {note}", account=outcome,
                               symbols=verdict.symbols + (_account_symbol(outcome, note),))


def _contained(verdict: Decision, status: AccountStatus, why: str, outcome: AccountOutcome,
               shadow: bool, message: str) -> Decision:
    """Held or locked: reject (the bundled config quarantines outbound "reject");
    throttled: soft reject (451); either with the public ``message``. In shadow mode the verdict
    stands and the reason says what would have been answered."""
    action = SOFT_REJECT if status is AccountStatus.THROTTLED else REJECT
    if shadow:
        return _annotated(verdict, outcome, f"shadow mode, would answer {action!r}: {why}")
    reason = f"{why} (verdict: {verdict.reason})" if verdict.reason else why
    return dataclasses.replace(verdict, action=action, reason=reason, message=message,
                               defer=False, account=outcome,
                               symbols=verdict.symbols + (_account_symbol(outcome, why),))


def _on_failure(failure: ScanFailure, mode: FailureMode, symbols: tuple[Symbol, ...],
                common: _Common, config: Config) -> Decision:
    symbols = symbols + (Symbol(SYM_SCANNER_FAILED, 0.0, (mode.value,)),)
    traffic = common["traffic"].value
    why = f"scanner unavailable ({failure.reason}); failure.{traffic} = {mode.value}"
    if mode is FailureMode.ACCEPT:
        return Decision(action=NO_ACTION, failure=failure, symbols=symbols, reason=why, **common)
    # "defer" sends no answer at all; the action is what the log shows
    return Decision(action=SOFT_REJECT, failure=failure, symbols=symbols, reason=why,
                    defer=mode is FailureMode.DEFER, message=config.texts.tempfail, **common)


def _context_symbols(traffic: Traffic, traffic_reason: str,
                     forwarding: tuple[str, ...]) -> tuple[Symbol, ...]:
    symbols = []
    if traffic is Traffic.OUTBOUND:
        symbols.append(Symbol(SYM_OUTBOUND, 0.0, (traffic_reason,)))
    if forwarding:
        symbols.append(Symbol(SYM_FORWARDING, 0.0, forwarding))
    return tuple(symbols)


def _rspamd_message(scan: ScanResult) -> str | None:
    """Rspamd's own SMTP message, if it gave one (e.g. "Gtube pattern")."""
    for key, text in scan.messages:
        if key in ("smtp_message", "") and text:
            return text
    return None


def _rspamd_reason(scan: ScanResult, summary: str) -> str:
    text = _rspamd_message(scan)
    return f"{text} ({summary})" if text else summary


def _rspamd_text(scan: ScanResult, config: Config) -> str | None:
    """The public text for Rspamd's own verdict: its SMTP message (public by Rspamd's
    design: it sends it to SMTP clients itself), else the configured text for a reject or
    soft reject; None for actions the client never sees a text for."""
    if scan.action not in (REJECT, SOFT_REJECT):
        return None
    text = _rspamd_message(scan)
    if text:
        return text
    return config.texts.spam if scan.action == REJECT else config.texts.soft_reject

