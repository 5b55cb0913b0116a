"""From a parsed request to reply bytes: envelope, context, scan, decide, encode.

Transport-free (the server owns sockets), so the daemon and ``exim-policy test`` share
:meth:`PolicyService.evaluate`, the one code path from message to decision.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar
from collections.abc import Callable

from .config import Config
from .model import (Context, Decision, Envelope, Request, ScanFailure, ScanResult, ScanSkipped,
                    Traffic)
from .policy import account_of, classify, decide, must_scan
from .protocol.codec import Codec
from .protocol.mbox import strip_mbox_from_line, subject_of
from .protocol.text import printable
from .scanner import Scanner, ScannerError
from .scanner.rspamd import within
from .state.tracker import AccountTracker

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("exim_policy.decision")
#: what a codec answers (reply bytes, an HTTP reply)
A = TypeVar("A")


@dataclass(frozen=True)
class Evaluation:
    envelope: Envelope
    decision: Decision
    elapsed: float
    #: seconds Rspamd took to answer (or to fail); None: not scanned, or no scan slot
    scan_elapsed: float | None = None


class PolicyService:
    #: counts each message once it is decided (None: metrics off); set by
    #: :meth:`Metrics.instrument <exim_policy.metrics.Metrics.instrument>`
    metrics: Metrics | None = None

    def __init__(self, config: Config, scanner: Scanner, forwards: Callable[[str], bool],
                 accounts: AccountTracker | None = None, *, record: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        """``accounts``: the account store's tracker (None: accounts off); with
        ``record=False`` an account's state is read but nothing is recorded (the
        ``test`` command). ``clock`` gives ``now`` for decide() and the store."""
        self.config = config
        self.scanner = scanner
        #: "does this recipient forward externally" (the current forwarding map)
        self.forwards = forwards
        self.accounts = accounts if config.accounts.enabled else None
        self.record = record
        self.clock = clock
        #: scans under way at once (server.max_scans): each is a connection to Rspamd
        self._scan_slots = asyncio.Semaphore(config.server.max_scans)
        #: scans under way now (a gauge of the metrics, read when scraped)
        self.scanning = 0

    def context_for(self, envelope: Envelope) -> Context:
        """What the shim knows before the scan: the recipients that forward, and so the
        traffic class (classified once per message, here)."""
        context = Context(forwarding=frozenset(r for r in envelope.recipients
                                               if self.forwards(r)))
        return dataclasses.replace(context, traffic=classify(envelope, context, self.config))

    async def evaluate(self, envelope: Envelope, body: bytes | bytearray) -> Evaluation:
        """Scan one message and decide. A scanner failure (or no free scan slot within
        ``server.queue_timeout``) becomes a configured decision here, in one place; every
        other exception is a bug and propagates. An account's outbound mail is recorded
        before the answer goes out, so its next message is counted with this one."""
        started = time.monotonic()
        now = self.clock()
        context = self.context_for(envelope)
        traffic, _ = context.traffic  # type: ignore[misc]
        account = account_of(envelope, traffic, self.config) if self.accounts else None
        if account is not None and self.accounts is not None:
            facts = await self.accounts.facts(account, envelope.recipients, now)
            context = dataclasses.replace(context, account=facts)
        scan: ScanResult | ScanFailure | ScanSkipped
        scan_elapsed = None
        if not must_scan(envelope, context, self.config):
            scan = ScanSkipped("the account is over a limit")
        else:
            scan, scan_elapsed = await self._scan(body, envelope, traffic)
            if context.account is not None and isinstance(scan, ScanResult) \
                    and scan.action in self.config.outbound.spam_actions:
                # evidence for a notice is kept for spam only: read its Subject then
                context = dataclasses.replace(context, subject=subject_of(body))
        decision = decide(envelope, scan, context, self.config, now)
        if self.record and self.accounts is not None and decision.account is not None:
            await self.accounts.record(decision)
        return Evaluation(envelope, decision, time.monotonic() - started, scan_elapsed)

    async def _scan(self, body: bytes | bytearray, envelope: Envelope,
                    traffic: Traffic) -> tuple[ScanResult | ScanFailure, float | None]:
        """The verdict, and how long Rspamd took (None: no scan slot, Rspamd not asked)."""
        try:
            await self._scan_slot()
        except TimeoutError:
            return ScanFailure(f"no free scan slot within {self.config.server.queue_timeout:g}s"
                               f" (server.max_scans = {self.config.server.max_scans})",
                               "no_slot"), None
        self.scanning += 1
        started = time.monotonic()
        try:
            return (await self.scanner.scan(strip_mbox_from_line(body), envelope, traffic),
                    time.monotonic() - started)
        except ScannerError as exc:
            return ScanFailure(str(exc), exc.kind), time.monotonic() - started
        finally:
            self.scanning -= 1
            self._scan_slots.release()

    async def _scan_slot(self) -> None:
        if not self._scan_slots.locked():
            await self._scan_slots.acquire()  # free: returns at once, no timer needed
            return
        if self.metrics is not None:
            self.metrics.limit_wait("max_scans")
        try:
            await within(self.config.server.queue_timeout, self._scan_slots.acquire())
        except asyncio.TimeoutError:  # (an alias of TimeoutError only from 3.11)
            if self.metrics is not None:
                self.metrics.limit_timeout("max_scans")
            raise TimeoutError from None

    async def answer(self, codec: Codec[A], request: Request) -> A:
        """The answer to one request, in its codec's terms: at once when it needs no scan
        (a ``PING``), else after :meth:`evaluate`, logged and counted."""
        at_once = codec.answer_at_once(request)
        if at_once is not None:
            return at_once
        evaluation = await self.evaluate(codec.envelope(request, self.config), request.body)
        log_decision(codec.name, request.command, evaluation)
        if self.metrics is not None:
            self.metrics.message(codec.name, evaluation)
        return codec.reply(request, evaluation.decision, self.config)


def log_decision(protocol: str, command: str, evaluation: Evaluation) -> None:
    """One line per message, formatted once (logs.LogWriter); its fields are built only
    for the JSON format."""
    d, env = evaluation.decision, evaluation.envelope
    scan = d.scan
    level = logging.WARNING if d.failure is not None else logging.INFO
    if not log.isEnabledFor(level):
        return
    account = d.account
    proto = f"{protocol}/{command}"
    # makeRecord + handle: what log.log() does, without looking up the caller's frame
    log.handle(log.makeRecord(
        log.name, level, "", 0, _DECISION_LINE,
        (env.queue_id or "-", proto, d.traffic.value,
         printable(env.user) if env.user is not None else "-", env.ip or "-",
         len(env.recipients), len(d.forwarding),
         repr(scan.action) if scan else _unscanned(d),
         f"{scan.score:.2f}/{scan.required_score:.2f}" if scan else "-",
         d.action, " (no answer: defer)" if d.defer else "",
         f" would={d.would!r}" if d.would is not None else "",
         f"{account.account}:{account.status.value}" if account else "-",
         evaluation.elapsed * 1000, d.reason),
        None, None,
        # the request itself is not kept: its body would live until the line is written
        extra={"fields": lambda: decision_fields(proto, evaluation)}))


_DECISION_LINE = ("qid=%s proto=%s traffic=%s user=%s ip=%s rcpts=%d forwarding=%d "
                  "rspamd=%s score=%s final=%r%s%s account=%s ms=%.1f reason=%s")


def _unscanned(decision: Decision) -> str:
    return "SKIPPED" if decision.failure is None else "FAILED"


def decision_fields(proto: str, evaluation: Evaluation) -> dict[str, object]:
    """The decision line as keys (the JSON log format)."""
    d, env = evaluation.decision, evaluation.envelope
    scan, account = d.scan, d.account
    return {
        "qid": env.queue_id, "proto": proto, "traffic": d.traffic.value,
        "user": printable(env.user) if env.user is not None else None, "ip": env.ip,
        "rcpts": len(env.recipients), "forwarding": len(d.forwarding),
        "rspamd": scan.action if scan else _unscanned(d),
        "score": scan.score if scan else None,
        "required_score": scan.required_score if scan else None,
        "final": d.action, "defer": d.defer, "would": d.would,
        "account": account.account if account else None,
        "account_status": account.status.value if account else None,
        "ms": round(evaluation.elapsed * 1000, 1), "reason": d.reason,
    }
