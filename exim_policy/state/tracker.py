"""The daemon's side of the account store: read before the scan, record after the answer.

- ``facts()``: the account's state for ``decide()``. When the store cannot be reached,
  the state is None and ``remembered`` is what this daemon last saw: a hold or a lock
  it has seen stays enforced from memory (``failure.accounts`` decides the rest).
- ``record()``: what ``decide()`` returned to record; the transitions the store made are
  logged and notified (once: only the daemon whose record made them notifies).
- ``status()``: the policy helper's answer (``account USER``), from a cache of at most
  :data:`STATUS_TTL` seconds; with the store's own refresh every :data:`REFRESH_EVERY`
  seconds, a change made by the CLI is seen within a second.

Store failures are logged at most once per :data:`FAILURE_LOG_EVERY` seconds.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..config import Config
from ..model import AccountFacts, AccountState, AccountStatus, Decision, TransitionKind
from ..policy import account_status
from ..tally import Tally
from .base import AccountStore, Applied, StoreError

if TYPE_CHECKING:
    from ..metrics import Metrics

log = logging.getLogger("exim_policy.accounts")

STATUS_TTL = 0.5
FAILURE_LOG_EVERY = 5.0
#: how often a cache in front of the store takes in other processes' changes
REFRESH_EVERY = 0.25
#: accounts whose hold or lock this daemon remembers (for a store outage)
REMEMBERED = 100_000
PRUNE_EVERY = 60.0


class AccountTracker:
    #: counts transitions and store errors (None: metrics off); set by Metrics.instrument
    metrics: Metrics | None = None

    def __init__(self, config: Config, store: AccountStore,
                 notify: Callable[[Applied], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.notify = notify
        self.clock = clock
        self._contained: collections.OrderedDict[str, AccountStatus] = \
            collections.OrderedDict()
        self._status_cache: dict[str, tuple[float, AccountStatus]] = {}
        self._failures = Tally(log, logging.ERROR, FAILURE_LOG_EVERY)
        self.store_errors = 0

    # ------------------------------------------------------------ per message --
    async def facts(self, account: str, recipients: Sequence[str], now: float) -> AccountFacts:
        try:
            state = await self.store.state(account, recipients, now)
        except StoreError as exc:
            self._failed(exc)
            return AccountFacts(account, None, self._contained.get(account, AccountStatus.OK))
        self._remember(state)
        return AccountFacts(account, state)

    async def record(self, decision: Decision) -> tuple[Applied, ...]:
        outcome = decision.account
        if outcome is None or outcome.store_failed or outcome.event is None:
            return ()
        try:
            applied = await self.store.record(outcome.account, outcome.event,
                                              outcome.transitions, outcome.event.at)
        except StoreError as exc:
            self._failed(exc)
            return ()
        self._status_cache.pop(outcome.account, None)  # its counts moved: ask again
        for made in applied:
            self.announce(made)
        return applied

    def announce(self, made: Applied) -> None:
        """Log one transition the store made, remember it, and hand it to the notifier."""
        step, incident = made.transition, made.incident
        if step.kind is TransitionKind.UNLOCKED:
            self._contained.pop(incident.account, None)
        elif not incident.shadow and step.to is not AccountStatus.OK:
            self._contained[incident.account] = step.to
        self._status_cache.pop(incident.account, None)
        state = f" ({incident.state})" if step.kind is TransitionKind.OPENED else ""
        would = " (shadow mode: nothing is stopped, would be " \
            f"{incident.state})" if step.shadow else ""
        log.warning("account %s: incident %d %s%s%s: %s", incident.account, incident.id,
                    step.kind.value, "" if step.shadow else state, would, step.reason)
        if self.metrics is not None:
            self.metrics.incident(step.kind.value, incident.state, step.shadow)
        if self.notify is not None:
            self.notify(made)

    # ------------------------------------------------------------- the helper --
    async def status(self, account: str) -> AccountStatus:
        now = self.clock()
        cached = self._status_cache.get(account)
        if cached is not None and now - cached[0] < STATUS_TTL:
            return cached[1]
        try:
            state: AccountState | None = await self.store.state(account, (), now)
        except StoreError as exc:
            self._failed(exc)
            state = None
        if state is None:
            remembered = self._contained.get(account, AccountStatus.OK)
            answer = AccountStatus.OK if self.config.accounts_shadow else remembered
        else:
            self._remember(state)
            answer = account_status(state, self.config)
        if len(self._status_cache) > REMEMBERED:
            self._status_cache.clear()
        self._status_cache[account] = (now, answer)
        return answer

    # ----------------------------------------------------------------- upkeep --
    async def run(self) -> None:
        """Take in other processes' changes a few times a second; prune now and then."""
        next_prune = time.monotonic() + PRUNE_EVERY
        while True:
            await asyncio.sleep(REFRESH_EVERY)
            try:
                await self.store.refresh(self.clock())
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + PRUNE_EVERY
                    await self.store.prune(self.clock())
            except StoreError as exc:
                self._failed(exc)

    def _remember(self, state: AccountState) -> None:
        contained = state.status is not AccountStatus.OK and not (
            state.incident is not None and state.incident.shadow)
        if contained:
            self._contained[state.account] = state.status
            self._contained.move_to_end(state.account)
            while len(self._contained) > REMEMBERED:
                self._contained.popitem(last=False)
        else:
            self._contained.pop(state.account, None)

    def _failed(self, exc: StoreError) -> None:
        self.store_errors += 1
        if self.metrics is not None:
            self.metrics.store_error()
        self._failures.hit(time.monotonic(), "%s (failure.accounts = %s)", exc,
                           self.config.failure.accounts)
