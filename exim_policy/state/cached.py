"""The daemon's SQLite store: the working state in memory, the file written behind it.

Reading an account for every outbound message from SQLite means a hand-off to the store's
thread and back (the event loop must not wait on the disk), twice per message: that cost
more CPU than the rest of the account logic together. So the daemon keeps the working
state (status, open incident, counts, recent evidence) of every account with something in
the retention in memory, loaded from the file at start, and answers ``state()`` from
there at once. The file stays the store of record:

- a counted message updates memory, and is written to the file in batches (one
  transaction for whatever gathered within :data:`WRITE_LINGER` seconds);
- a transition (an incident opens, an account is locked) is made in the file first, in
  one transaction that checks the stored state, exactly as without the cache, and the
  account is then reloaded from the file; transitions are rare;
- what other processes change (``exim-policy accounts lock/unlock/reset``) is in the
  file's change log, read by :meth:`refresh` a few times a second: those accounts are
  reloaded, so the daemon sees a human's change within a second.

One daemon per file: a second process that counts messages into the same file is not
seen here (its transitions are). A crash loses at most the batch being gathered or written
(counts, never a transition). History (incidents, audit) is read from the file.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from ..config import AccountsConfig
from ..model import AccountState, MessageEvent, Transition
from ..tally import Tally
from .base import AccountDetail, AccountSummary, Applied, StoreError
from .memory import MemoryStore
from .sqlite import SqliteStore

log = logging.getLogger("exim_policy.accounts")

#: counted messages waiting for the file at most; beyond, the oldest are dropped (logged)
MAX_PENDING = 100_000
#: seconds a counted message waits for others to share its transaction
WRITE_LINGER = 0.05


class CachedSqliteStore:
    def __init__(self, config: AccountsConfig, path: str | None = None) -> None:
        self.config = config
        self.file = SqliteStore(config, path)
        self.memory = MemoryStore(config)
        self._pending: list[tuple[str, MessageEvent]] = []
        self._writer: asyncio.Task[None] | None = None
        self._seen_change = 0
        self._loaded = False
        self._write_errors = Tally(log, logging.ERROR, 5.0)

    async def load(self, now: float) -> None:
        """Read every account with something in the retention (or held, locked) from the
        file; raises StoreError when the file cannot be opened."""
        self._seen_change, _ = await self.file.changes(0)
        for image in await self.file.images(None, now):
            self.memory.install(image)
        self._loaded = True

    async def _ready(self, now: float) -> None:
        if not self._loaded:
            await self.load(now)

    # ------------------------------------------------------------ per message --
    async def state(self, account: str, recipients: Sequence[str], now: float) -> AccountState:
        await self._ready(now)
        return await self.memory.state(account, recipients, now)

    async def record(self, account: str, event: MessageEvent | None,
                     transitions: Sequence[Transition], now: float) -> tuple[Applied, ...]:
        await self._ready(now)
        if transitions:  # the file decides, then memory follows it
            await self._flush()
            applied = await self.file.record(account, event, transitions, now)
            await self._reload([account], now)
            return applied
        if event is not None:
            await self.memory.record(account, event, (), now)
            self._pending.append((account, event))
            if len(self._pending) > MAX_PENDING:
                del self._pending[:len(self._pending) - MAX_PENDING]
                self._write_errors.hit(time.monotonic(), "account store %s: writes fall "
                                       "behind; the oldest counts were dropped",
                                       self.file.path)
            if self._writer is None:
                self._writer = asyncio.get_running_loop().create_task(self._write_behind())
        return ()

    async def _write_behind(self) -> None:
        try:
            while self._pending:
                # let a batch gather: one transaction for many messages costs little more
                # than one for one (a crash loses at most this much counting)
                await asyncio.sleep(WRITE_LINGER)
                batch, self._pending = self._pending, []
                try:
                    await self.file.record_many(batch)
                except StoreError as exc:
                    self._write_errors.hit(time.monotonic(), "%s (%d counted messages not "
                                           "written)", exc, len(batch))
        finally:
            self._writer = None

    async def _flush(self) -> None:
        """Every counted message so far is in the file (before a transition reads it)."""
        while self._writer is not None:
            await asyncio.shield(self._writer)
        if self._pending:
            batch, self._pending = self._pending, []
            await self.file.record_many(batch)

    async def _reload(self, accounts: Sequence[str], now: float) -> None:
        images = {image.account: image for image in await self.file.images(accounts, now)}
        for account in accounts:
            if account in images:
                self.memory.install(images[account])
            else:
                self.memory.forget(account)

    async def refresh(self, now: float) -> None:
        """Load the file (the first time), or reload the accounts other processes changed
        since the last call."""
        if not self._loaded:
            await self.load(now)
            return
        self._seen_change, changed = await self.file.changes(self._seen_change)
        if changed:
            await self._flush()
            await self._reload(changed, now)

    # ------------------------------------------------------------ for humans --
    async def reset(self, account: str, who: str, reason: str, now: float) -> bool:
        await self._flush()
        done = await self.file.reset(account, who, reason, now)
        await self._reload([account], now)
        return done

    async def detail(self, account: str, now: float) -> AccountDetail | None:
        await self._flush()
        return await self.file.detail(account, now)

    async def accounts(self, now: float) -> list[AccountSummary]:
        await self._flush()
        return await self.file.accounts(now)

    async def prune(self, now: float) -> None:
        await self.memory.prune(now)
        await self._flush()
        await self.file.prune(now)

    async def close(self) -> None:
        try:
            await self._flush()
        finally:
            await self.file.close()
