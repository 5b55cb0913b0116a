"""The account store in one SQLite file (the default): one MX node, the daemon and the CLI.

Every query runs on one thread of the store's own (the event loop never waits on the
disk). WAL mode lets the CLI read while the daemon writes; each ``record`` is one
``BEGIN IMMEDIATE`` transaction, so two processes writing the same account (the daemon
and ``accounts unlock``) never interleave. ``synchronous = NORMAL``: a power loss may drop
the last commits (counts), never corrupt the file.
"""
from __future__ import annotations

import json
import os
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..config import AccountsConfig
from ..model import (AccountState, AccountStatus, Counts, Incident, MessageEvent, Transition,
                     TransitionKind)
from .base import (AUDIT_KEPT, EVIDENCE_KEPT, INCIDENTS_KEPT, AccountDetail, AccountImage,
                   AccountSummary,
                   Applied, AuditEntry, StoreError, allowed, audit_action, event_from_json,
                   event_json, evidence, incident_state, recipient_key, windows_of)
from .memory import DAEMON
from .thread import StoreThread

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    id TEXT PRIMARY KEY, status TEXT NOT NULL DEFAULT 'ok', incident INTEGER,
    since_hold INTEGER NOT NULL DEFAULT 0, last_seen REAL NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (account TEXT NOT NULL, at REAL NOT NULL,
                                     recipients INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS messages_by_account ON messages (account, at);
CREATE TABLE IF NOT EXISTS recipients (account TEXT NOT NULL, recipient TEXT NOT NULL,
                                       at REAL NOT NULL, PRIMARY KEY (account, recipient))
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS recipients_by_time ON recipients (account, at);
CREATE TABLE IF NOT EXISTS spam (account TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS spam_by_account ON spam (account, at);
CREATE TABLE IF NOT EXISTS evidence (id INTEGER PRIMARY KEY, account TEXT NOT NULL,
                                     event TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS evidence_by_account ON evidence (account, id);
CREATE TABLE IF NOT EXISTS incidents (
    id INTEGER PRIMARY KEY AUTOINCREMENT, account TEXT NOT NULL, opened REAL NOT NULL,
    state TEXT NOT NULL, reason TEXT NOT NULL, shadow INTEGER NOT NULL, closed REAL,
    evidence TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS incidents_by_account ON incidents (account, id);
CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY, account TEXT NOT NULL,
                                  at REAL NOT NULL, who TEXT NOT NULL, action TEXT NOT NULL,
                                  reason TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_by_account ON audit (account, id);
-- accounts whose status, incident or counters a writer changed other than by counting a
-- message: a cache in another process (the daemon's) reloads them
CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT,
                                    origin TEXT NOT NULL, account TEXT NOT NULL,
                                    at REAL NOT NULL);
"""
#: rows of the change log kept (a cache polls it a few times a second)
CHANGES_KEPT_SECONDS = 3600.0


class SqliteStore:
    def __init__(self, config: AccountsConfig, path: str | None = None) -> None:
        self.config = config
        self.path = path or config.path
        self._thread = StoreThread("exim-policy-sqlite")
        self._db: sqlite3.Connection | None = None
        #: this store's name in the change log (its own changes are not news to it)
        self.origin = uuid.uuid4().hex

    # ------------------------------------------------------------ the store thread --
    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await self._thread.call(fn, *args)
        except sqlite3.Error as exc:
            raise StoreError(f"account store {self.path}: {exc}") from None
        except OSError as exc:
            raise StoreError(f"account store {self.path}: {exc.strerror or exc}") from None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            directory = os.path.dirname(self.path)
            if directory and not os.path.isdir(directory):
                raise sqlite3.OperationalError(f"no directory {directory}")
            db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.executescript(SCHEMA)
            self._db = db
        return self._db

    # -------------------------------------------------------------------- reading --
    def _state(self, db: sqlite3.Connection, account: str, recipients: Sequence[str],
               now: float) -> AccountState:
        row = db.execute("SELECT status, incident, since_hold FROM accounts WHERE id = ?",
                         (account,)).fetchone()
        status, incident_id, since_hold = row or ("ok", None, 0)
        incident = self._incident(db, incident_id) if incident_id is not None else None
        wanted = {recipient_key(r) for r in recipients}
        windows = []
        for window in windows_of(self.config):
            start = now - window
            messages, total = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(recipients), 0) FROM messages "
                "WHERE account = ? AND at >= ?", (account, start)).fetchone()
            unique, = db.execute("SELECT COUNT(*) FROM recipients WHERE account = ? AND at >= ?",
                                 (account, start)).fetchone()
            seen = set()
            if wanted:
                marks = ",".join("?" * len(wanted))
                seen = {r for r, in db.execute(
                    f"SELECT recipient FROM recipients WHERE account = ? AND at >= ? "
                    f"AND recipient IN ({marks})", (account, start, *wanted))}
            windows.append(Counts(window, messages, total, unique, len(wanted - seen)))
        spam, = db.execute("SELECT COUNT(*) FROM spam WHERE account = ? AND at >= ?",
                           (account, now - self.config.incident.window)).fetchone()
        return AccountState(account, AccountStatus(status), incident, tuple(windows), spam,
                            since_hold)

    @staticmethod
    def _incident(db: sqlite3.Connection, incident_id: int) -> Incident | None:
        row = db.execute("SELECT id, account, opened, state, reason, shadow, closed, evidence "
                         "FROM incidents WHERE id = ?", (incident_id,)).fetchone()
        if row is None:
            return None
        return Incident(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6],
                        json.loads(row[7]))

    def _evidence(self, db: sqlite3.Connection, account: str) -> list[MessageEvent]:
        return [event_from_json(text) for text, in db.execute(
            "SELECT event FROM evidence WHERE account = ? ORDER BY id DESC", (account,))]

    async def state(self, account: str, recipients: Sequence[str], now: float) -> AccountState:
        return await self._run(lambda: self._state(self._connect(), account, recipients, now))

    # -------------------------------------------------------------------- writing --
    def _record(self, account: str, event: MessageEvent | None,
                transitions: Sequence[Transition], now: float) -> tuple[Applied, ...]:
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT INTO accounts (id) VALUES (?) ON CONFLICT DO NOTHING", (account,))
            if event is not None:
                self._add_event(db, account, event, now)
            applied = []
            for transition in transitions:
                status, incident_id = db.execute(
                    "SELECT status, incident FROM accounts WHERE id = ?", (account,)).fetchone()
                incident = self._incident(db, incident_id) if incident_id is not None else None
                if allowed(transition, AccountStatus(status), incident):
                    applied.append(Applied(transition, self._make(db, account, incident,
                                                                  transition, now)))
            if applied:
                self._changed(db, account, now)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return tuple(applied)

    def _add_event(self, db: sqlite3.Connection, account: str, event: MessageEvent,
                   now: float) -> None:
        db.execute("UPDATE accounts SET last_seen = ? WHERE id = ?", (now, account))
        if event.counted:
            db.execute("INSERT INTO messages VALUES (?, ?, ?)",
                       (account, now, len(event.recipients)))
            db.executemany(
                "INSERT INTO recipients VALUES (?, ?, ?) ON CONFLICT (account, recipient) "
                "DO UPDATE SET at = excluded.at",
                [(account, rcpt, now) for rcpt in {recipient_key(r) for r in event.recipients}])
        if event.spam:
            db.execute("INSERT INTO spam VALUES (?, ?)", (account, now))
            db.execute("INSERT INTO evidence (account, event) VALUES (?, ?)",
                       (account, event_json(event)))
            db.execute("DELETE FROM evidence WHERE account = ? AND id <= (SELECT id FROM "
                       "evidence WHERE account = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                       (account, account, EVIDENCE_KEPT))
            db.execute("UPDATE accounts SET since_hold = since_hold + 1 "
                       "WHERE id = ? AND status = 'held'", (account,))

    def _make(self, db: sqlite3.Connection, account: str, old: Incident | None,
              transition: Transition, now: float) -> Incident:
        proof = evidence(account, transition, self._state(db, account, (), now),
                         self._evidence(db, account), self.config, now)
        if transition.kind is TransitionKind.UNLOCKED:
            if old is not None:
                db.execute("UPDATE incidents SET state = 'closed', closed = ?, evidence = ? "
                           "WHERE id = ?", (now, json.dumps(proof), old.id))
            incident = Incident(old.id if old else 0, account, old.opened if old else now,
                                "closed", old.reason if old else transition.reason,
                                old.shadow if old else False, now, proof)
            db.execute("UPDATE accounts SET status = 'ok', incident = NULL, since_hold = 0 "
                       "WHERE id = ?", (account,))
            self._clear_counters(db, account)
        elif transition.kind is TransitionKind.OPENED or old is None:
            if old is not None:  # a shadow-mode incident, superseded by an enforced one
                db.execute("UPDATE incidents SET state = 'closed', closed = ? WHERE id = ?",
                           (now, old.id))
            state = incident_state(transition.to)
            cursor = db.execute(
                "INSERT INTO incidents (account, opened, state, reason, shadow, evidence) "
                "VALUES (?, ?, ?, ?, ?, ?)", (account, now, state, transition.reason,
                                              int(transition.shadow), json.dumps(proof)))
            assert cursor.lastrowid is not None  # an INSERT's row id
            incident = Incident(cursor.lastrowid, account, now, state, transition.reason,
                                transition.shadow, None, proof)
            db.execute("UPDATE accounts SET status = ?, incident = ?, since_hold = 0 "
                       "WHERE id = ?", (transition.to.value, incident.id, account))
            db.execute("DELETE FROM incidents WHERE account = ? AND id <= (SELECT id FROM "
                       "incidents WHERE account = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                       (account, account, INCIDENTS_KEPT))
        else:
            state = incident_state(transition.to)
            db.execute("UPDATE incidents SET state = ?, evidence = ? WHERE id = ?",
                       (state, json.dumps(proof), old.id))
            incident = Incident(old.id, account, old.opened, state, old.reason, old.shadow,
                                None, proof)
            db.execute("UPDATE accounts SET status = ? WHERE id = ?",
                       (transition.to.value, account))
        self._audit(db, account, now, transition.who or DAEMON, audit_action(transition),
                    transition.reason)
        return incident

    @staticmethod
    def _audit(db: sqlite3.Connection, account: str, now: float, who: str, action: str,
               reason: str) -> None:
        db.execute("INSERT INTO audit (account, at, who, action, reason) VALUES (?, ?, ?, ?, ?)",
                   (account, now, who, action, reason))
        db.execute("DELETE FROM audit WHERE account = ? AND id <= (SELECT id FROM audit "
                   "WHERE account = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                   (account, account, AUDIT_KEPT))

    def _changed(self, db: sqlite3.Connection, account: str, now: float) -> None:
        db.execute("INSERT INTO changes (origin, account, at) VALUES (?, ?, ?)",
                   (self.origin, account, now))

    @staticmethod
    def _clear_counters(db: sqlite3.Connection, account: str) -> None:
        for table in ("messages", "recipients", "spam", "evidence"):
            db.execute(f"DELETE FROM {table} WHERE account = ?", (account,))

    async def record(self, account: str, event: MessageEvent | None,
                     transitions: Sequence[Transition], now: float) -> tuple[Applied, ...]:
        return await self._run(self._record, account, event, tuple(transitions), now)

    def _record_many(self, items: Sequence[tuple[str, MessageEvent]]) -> None:
        """Events without transitions, in one transaction: a cache's writes. The common
        case (counted, not spam) goes in three statements for the whole batch."""
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT INTO accounts (id, last_seen) VALUES (?, ?) ON CONFLICT (id) "
                "DO UPDATE SET last_seen = MAX(last_seen, excluded.last_seen)",
                [(account, event.at) for account, event in items])
            plain = [(a, e) for a, e in items if e.counted and not e.spam]
            db.executemany("INSERT INTO messages VALUES (?, ?, ?)",
                           [(a, e.at, len(e.recipients)) for a, e in plain])
            db.executemany(
                "INSERT INTO recipients VALUES (?, ?, ?) ON CONFLICT (account, recipient) "
                "DO UPDATE SET at = excluded.at",
                [(a, rcpt, e.at) for a, e in plain
                 for rcpt in {recipient_key(r) for r in e.recipients}])
            for account, event in items:
                if event.spam or not event.counted:
                    self._add_event(db, account, event, event.at)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def record_many(self, items: Sequence[tuple[str, MessageEvent]]) -> None:
        await self._run(self._record_many, list(items))

    # ------------------------------------------------------------ for a cache --
    def _images(self, accounts: Sequence[str] | None, now: float) -> list[AccountImage]:
        """The working state of ``accounts`` (None: of every account that has some)."""
        db = self._connect()
        start = now - self.config.retention
        if accounts is None:
            accounts = [a for a, in db.execute(
                "SELECT id FROM accounts WHERE status != 'ok' OR incident IS NOT NULL "
                "OR last_seen >= ?", (start,))]
        images = []
        for account in accounts:
            row = db.execute("SELECT status, incident, since_hold, last_seen FROM accounts "
                             "WHERE id = ?", (account,)).fetchone()
            if row is None:
                continue
            status, incident_id, since_hold, last_seen = row
            images.append(AccountImage(
                account, AccountStatus(status),
                self._incident(db, incident_id) if incident_id is not None else None,
                since_hold, last_seen,
                db.execute("SELECT at, recipients FROM messages WHERE account = ? AND at >= ? "
                           "ORDER BY at", (account, start)).fetchall(),
                dict(db.execute("SELECT recipient, at FROM recipients WHERE account = ? "
                                "AND at >= ?", (account, start)).fetchall()),
                [at for at, in db.execute("SELECT at FROM spam WHERE account = ? AND at >= ? "
                                          "ORDER BY at", (account, start))],
                list(reversed(self._evidence(db, account)))))
        return images

    async def images(self, accounts: Sequence[str] | None, now: float) -> list[AccountImage]:
        return await self._run(self._images, accounts, now)

    def _changes(self, after: int) -> tuple[int, list[str]]:
        """(the newest seq, accounts changed by other writers after ``after``)."""
        db = self._connect()
        rows = db.execute("SELECT seq, origin, account FROM changes WHERE seq > ? ORDER BY seq",
                          (after,)).fetchall()
        if not rows:
            newest, = db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()
            return max(newest, after), []
        return rows[-1][0], list(dict.fromkeys(a for _, origin, a in rows
                                               if origin != self.origin))

    async def changes(self, after: int) -> tuple[int, list[str]]:
        return await self._run(self._changes, after)

    def _reset(self, account: str, who: str, reason: str, now: float) -> bool:
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            found = db.execute("SELECT 1 FROM accounts WHERE id = ?", (account,)).fetchone()
            if found:
                self._clear_counters(db, account)
                self._audit(db, account, now, who, "reset", reason)
                self._changed(db, account, now)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return found is not None

    async def reset(self, account: str, who: str, reason: str, now: float) -> bool:
        return await self._run(self._reset, account, who, reason, now)

    # ------------------------------------------------------------------ for humans --
    def _detail(self, account: str, now: float) -> AccountDetail | None:
        db = self._connect()
        row = db.execute("SELECT last_seen FROM accounts WHERE id = ?", (account,)).fetchone()
        if row is None:
            return None
        incidents = tuple(self._incident(db, i) for i, in db.execute(
            "SELECT id FROM incidents WHERE account = ? ORDER BY id DESC", (account,)))
        audit = tuple(AuditEntry(*r) for r in db.execute(
            "SELECT at, who, action, reason FROM audit WHERE account = ? ORDER BY id DESC",
            (account,)))
        return AccountDetail(self._state(db, account, (), now), row[0] or None,
                             tuple(i for i in incidents if i is not None), audit,
                             tuple(self._evidence(db, account)))

    async def detail(self, account: str, now: float) -> AccountDetail | None:
        return await self._run(self._detail, account, now)

    def _accounts(self, now: float) -> list[AccountSummary]:
        db = self._connect()
        out = []
        for account, status, incident, last_seen in db.execute(
                "SELECT id, status, incident, last_seen FROM accounts ORDER BY id").fetchall():
            state = self._state(db, account, (), now)
            messages = state.windows[0].messages if state.windows else 0
            out.append(AccountSummary(account, AccountStatus(status), last_seen, incident,
                                      messages, state.spam_verdicts))
        return out

    async def accounts(self, now: float) -> list[AccountSummary]:
        return await self._run(self._accounts, now)

    def _prune(self, now: float) -> None:
        db = self._connect()
        start = now - self.config.retention
        db.execute("BEGIN IMMEDIATE")
        try:
            for table in ("messages", "recipients", "spam"):
                db.execute(f"DELETE FROM {table} WHERE at < ?", (start,))
            db.execute("DELETE FROM changes WHERE at < ?", (now - CHANGES_KEPT_SECONDS,))
            # accounts with nothing counted, no status and no recent history go, with all
            # they keep
            quiet = db.execute(
                "SELECT id FROM accounts a WHERE status = 'ok' AND incident IS NULL "
                "AND NOT EXISTS (SELECT 1 FROM messages WHERE account = a.id) "
                "AND NOT EXISTS (SELECT 1 FROM spam WHERE account = a.id) "
                "AND NOT EXISTS (SELECT 1 FROM recipients WHERE account = a.id) "
                "AND (NOT EXISTS (SELECT 1 FROM audit WHERE account = a.id) "
                "     AND NOT EXISTS (SELECT 1 FROM incidents WHERE account = a.id) "
                "     OR MAX(a.last_seen, COALESCE((SELECT MAX(at) FROM audit "
                "            WHERE account = a.id), 0)) < ?)",
                (now - self.config.history,)).fetchall()
            for account, in quiet:
                for table in ("evidence", "incidents", "audit"):
                    db.execute(f"DELETE FROM {table} WHERE account = ?", (account,))
                db.execute("DELETE FROM accounts WHERE id = ?", (account,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def prune(self, now: float) -> None:
        await self._run(self._prune, now)

    async def refresh(self, now: float) -> None:
        pass  # every read goes to the file

    async def close(self) -> None:
        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None
        await self._run(shut)
        self._thread.stop()
