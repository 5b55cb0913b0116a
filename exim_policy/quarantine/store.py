"""The quarantine on disk: one file per message, and an SQLite index of the rest.

``PATH/messages/ID.eml`` is the message as the MTA sent it (CRLF lines, the
``X-Exim-Policy-*`` fields left out); ``PATH/index.db`` holds its envelope (sender and
every recipient, Bcc included), the evidence, its state and its audit trail.

Durability: a message is written to ``PATH/tmp``, fsync'd, renamed into ``messages/``,
the directory fsync'd, and only then indexed (SQLite with ``synchronous = FULL``); the
receiver answers 250 after :meth:`QuarantineStore.commit` returns. A crash before that
leaves at most a file no row names, which :meth:`QuarantineStore.purge` removes.

Release is exactly once per recipient: :meth:`claim` moves a message from ``held`` to
``releasing`` in one transaction (a second release finds it taken), :meth:`finish`
records per recipient what the release path answered. A release that was interrupted
stays ``releasing`` (whether it went out is in Exim's log) until someone forces it.

The methods block (file and SQLite I/O): the daemon calls them from a
:class:`~exim_policy.state.thread.StoreThread`, the CLI directly.
"""
from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from .evidence import Evidence

HELD, RELEASING, RELEASED, DELETED = "held", "releasing", "released", "deleted"
STATES = (HELD, RELEASING, RELEASED, DELETED)
#: recipient states: "failed" keeps the release path's refusal and is retried by a release
R_HELD, R_RELEASED, R_FAILED = "held", "released", "failed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY, received REAL NOT NULL, state TEXT NOT NULL, sender TEXT NOT NULL,
    account TEXT NOT NULL, subject TEXT NOT NULL, from_header TEXT NOT NULL,
    message_id TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL,
    source TEXT NOT NULL, score REAL, evidence TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS messages_received ON messages (received);
CREATE INDEX IF NOT EXISTS messages_account ON messages (account, received);
CREATE INDEX IF NOT EXISTS messages_sha256 ON messages (sha256);
CREATE TABLE IF NOT EXISTS recipients (
    id TEXT NOT NULL, seq INTEGER NOT NULL, address TEXT NOT NULL, state TEXT NOT NULL,
    at REAL, detail TEXT NOT NULL DEFAULT '', PRIMARY KEY (id, address));
CREATE TABLE IF NOT EXISTS audit (
    id TEXT NOT NULL, at REAL NOT NULL, who TEXT NOT NULL, action TEXT NOT NULL,
    reason TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS audit_id ON audit (id, at);
"""


class QuarantineError(Exception):
    """A quarantine operation that cannot be done, worded for the administrator."""


@dataclass(frozen=True)
class Recipient:
    address: str
    state: str = R_HELD
    #: when it was released (or refused)
    at: float | None = None
    #: what the release path answered
    detail: str = ""


@dataclass(frozen=True)
class Audit:
    at: float
    who: str
    action: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class NewMessage:
    """What the receiver or ``import`` knows of a message it hands to :meth:`commit`."""

    sender: str
    recipients: tuple[str, ...]
    evidence: Evidence
    size: int
    sha256: str
    subject: str = ""
    from_header: str = ""
    message_id: str = ""
    #: "smtp from 127.0.0.1" or "import of /var/mail/quarantine"
    source: str = ""
    received: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Entry:
    id: str
    received: float
    state: str
    sender: str
    recipients: tuple[Recipient, ...]
    evidence: Evidence
    subject: str
    from_header: str
    message_id: str
    size: int
    sha256: str
    source: str
    audit: tuple[Audit, ...] = ()

    def last(self, action: str) -> Audit | None:
        for item in reversed(self.audit):
            if item.action == action:
                return item
        return None


class QuarantineStore:
    def __init__(self, path: str | os.PathLike, *, create: bool = True) -> None:
        self.root = Path(path)
        self.messages = self.root / "messages"
        self.tmp = self.root / "tmp"
        index = self.root / "index.db"
        if not create and not index.exists():
            raise QuarantineError(f"{index}: no quarantine here (quarantine.path)")
        try:
            for directory in (self.root, self.messages, self.tmp):
                directory.mkdir(mode=0o700, exist_ok=True)
            self._db = sqlite3.connect(index, timeout=10.0, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise QuarantineError(f"{self.root}: cannot open the quarantine: {exc}") from None

    def close(self) -> None:
        self._db.close()

    # -------------------------------------------------------------------- receiving --
    def temp_path(self) -> Path:
        """A fresh name in tmp/ (nothing is created yet)."""
        return self.tmp / f"{time.time():.6f}.{secrets.token_hex(4)}"

    def temp_file(self, path: Path | None = None):
        """A new file in tmp/ (mode 0600), open for binary writing: ``(path, file)``."""
        path = path or self.temp_path()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return path, os.fdopen(fd, "wb")

    def free_bytes(self) -> int:
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def commit(self, tmp_path: Path, message: NewMessage) -> tuple[str, bool]:
        """Make a written (and closed) temp file a held message: ``(id, merged)``.

        The same bytes from the same sender already held (the MTA resends after a lost
        250, or split the recipients over two transactions) are one message: the new
        recipients join it and the new file goes. ``merged`` then is true.
        """
        same = self._db.execute(
            "SELECT id FROM messages WHERE sha256 = ? AND sender = ? AND state != ?",
            (message.sha256, message.sender, DELETED)).fetchone()
        if same is not None:
            os.unlink(tmp_path)
            self._add_recipients(same[0], message.recipients)
            return same[0], True
        _fsync_file(tmp_path)
        for _ in range(5):
            entry_id = secrets.token_hex(6)
            final = self.messages / f"{entry_id}.eml"
            if not final.exists():
                break
        os.rename(tmp_path, final)
        _fsync_dir(self.messages)
        evidence = message.evidence
        try:
            with self._transaction():
                self._db.execute(
                    "INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (entry_id, message.received, HELD, message.sender, evidence.account,
                     message.subject, message.from_header, message.message_id,
                     message.size, message.sha256, message.source, evidence.score,
                     _evidence_json(evidence)))
                self._db.executemany(
                    "INSERT OR IGNORE INTO recipients (id, seq, address, state) "
                    "VALUES (?,?,?,?)",
                    [(entry_id, i, rcpt, R_HELD) for i, rcpt in enumerate(message.recipients)])
        except sqlite3.Error:
            os.unlink(final)
            raise
        return entry_id, False

    def _add_recipients(self, entry_id: str, recipients: tuple[str, ...]) -> None:
        with self._transaction():
            known = {row[0] for row in self._db.execute(
                "SELECT address FROM recipients WHERE id = ?", (entry_id,))}
            new = [r for r in recipients if r not in known]
            if not new:
                return
            start = len(known)
            self._db.executemany(
                "INSERT INTO recipients (id, seq, address, state) VALUES (?,?,?,?)",
                [(entry_id, start + i, rcpt, R_HELD) for i, rcpt in enumerate(new)])
            self._db.execute("UPDATE messages SET state = ? WHERE id = ? AND state = ?",
                             (HELD, entry_id, RELEASED))
            self._audit(entry_id, "receiver", "merged", "the same message again",
                        f"{len(new)} more recipient(s)")

    # ---------------------------------------------------------------------- reading --
    def counts(self) -> dict[str, int]:
        """Entries by state (every state, 0 when there are none)."""
        found = dict(self._db.execute("SELECT state, COUNT(*) FROM messages GROUP BY state"))
        return {state: found.get(state, 0) for state in STATES}

    def list(self, *, account: str | None = None, since: float | None = None,
             state: str | None = None, limit: int | None = None) -> list[Entry]:
        """Newest first, without audit trails."""
        where, args = [], []
        if account is not None:
            where.append("account = ?")
            args.append(account)
        if since is not None:
            where.append("received >= ?")
            args.append(since)
        if state is not None:
            where.append("state = ?")
            args.append(state)
        sql = "SELECT * FROM messages" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY received DESC" + (f" LIMIT {int(limit)}" if limit else "")
        rows = self._db.execute(sql, args).fetchall()
        recipients = self._recipients([row[0] for row in rows])
        return [_entry(row, recipients.get(row[0], ())) for row in rows]

    def get(self, entry_id: str) -> Entry | None:
        row = self._db.execute("SELECT * FROM messages WHERE id = ?", (entry_id,)).fetchone()
        if row is None:
            return None
        audit = tuple(Audit(*r) for r in self._db.execute(
            "SELECT at, who, action, reason, detail FROM audit WHERE id = ? ORDER BY at, "
            "rowid", (entry_id,)))
        return _entry(row, self._recipients([entry_id]).get(entry_id, ()), audit)

    def path_of(self, entry_id: str) -> Path:
        return self.messages / f"{entry_id}.eml"

    def _recipients(self, ids: list[str]) -> dict[str, tuple[Recipient, ...]]:
        found: dict[str, list[Recipient]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for entry_id, address, state, at, detail in self._db.execute(
                    f"SELECT id, address, state, at, detail FROM recipients "
                    f"WHERE id IN ({marks}) ORDER BY id, seq", chunk):
                found.setdefault(entry_id, []).append(Recipient(address, state, at, detail))
        return {k: tuple(v) for k, v in found.items()}

    # ------------------------------------------------------------------- releasing --
    def claim(self, entry_id: str, who: str, reason: str, *, force: bool = False) -> Entry:
        """Take a message for release (state ``releasing``); raises QuarantineError when it
        is gone, already released, or being released, unless ``force`` (not for deleted)."""
        with self._transaction():
            entry = self.get(entry_id)
            if entry is None:
                raise QuarantineError(f"{entry_id}: no such message in the quarantine")
            if entry.state == DELETED:
                done = entry.last("deleted")
                raise QuarantineError(f"{entry_id}: deleted{_by(done)}; nothing to release")
            if entry.state == RELEASED and not force:
                done = entry.last("released")
                raise QuarantineError(f"{entry_id}: already released{_by(done)}; nothing "
                                      "sent (--force sends it again)")
            if entry.state == RELEASING and not force:
                done = entry.last("release-started")
                raise QuarantineError(
                    f"{entry_id}: a release started{_by(done)} did not finish; whether it "
                    "went out is in Exim's main log (its queue id is in the audit trail); "
                    "--force sends it again")
            self._db.execute("UPDATE messages SET state = ? WHERE id = ?",
                             (RELEASING, entry_id))
            self._audit(entry_id, who, "release-started", reason, "forced" if force else "")
        return entry

    def finish(self, entry_id: str, who: str, reason: str, via: str,
               results: dict[str, tuple[bool, str]]) -> Entry:
        """Record the release path's answer per recipient; ``released`` once every
        recipient is, else ``held`` again (the refused ones stay for the next release)."""
        now = time.time()
        with self._transaction():
            for address, (ok, detail) in results.items():
                self._db.execute(
                    "UPDATE recipients SET state = ?, at = ?, detail = ? WHERE id = ? AND "
                    "address = ?", (R_RELEASED if ok else R_FAILED, now, detail, entry_id,
                                    address))
            left = self._db.execute(
                "SELECT COUNT(*) FROM recipients WHERE id = ? AND state != ?",
                (entry_id, R_RELEASED)).fetchone()[0]
            self._db.execute("UPDATE messages SET state = ? WHERE id = ?",
                             (RELEASED if left == 0 else HELD, entry_id))
            sent = sum(1 for ok, _ in results.values() if ok)
            detail = f"to {sent} of {len(results)} recipient(s) via {via}"
            refused = [f"{a}: {d}" for a, (ok, d) in results.items() if not ok]
            if refused:
                detail += "; refused: " + "; ".join(refused)
            self._audit(entry_id, who, "released" if sent else "release-failed", reason,
                        detail)
        entry = self.get(entry_id)
        assert entry is not None
        return entry

    def abandon(self, entry_id: str, who: str, error: str) -> None:
        """The release path failed before it took the message: held again."""
        with self._transaction():
            self._db.execute("UPDATE messages SET state = ? WHERE id = ? AND state = ?",
                             (HELD, entry_id, RELEASING))
            self._audit(entry_id, who, "release-failed", "", error)

    # -------------------------------------------------------------------- removing --
    def delete(self, entry_id: str, who: str, reason: str) -> Entry:
        """Remove the message file; the entry stays (state ``deleted``) with its audit."""
        with self._transaction():
            entry = self.get(entry_id)
            if entry is None:
                raise QuarantineError(f"{entry_id}: no such message in the quarantine")
            if entry.state == DELETED:
                raise QuarantineError(f"{entry_id}: already deleted{_by(entry.last('deleted'))}")
            if entry.state == RELEASING:
                raise QuarantineError(f"{entry_id}: a release is in progress")
            self._db.execute("UPDATE messages SET state = ? WHERE id = ?", (DELETED, entry_id))
            self._audit(entry_id, who, "deleted", reason)
            self.path_of(entry_id).unlink(missing_ok=True)
        return entry

    def purge(self, before: float) -> list[str]:
        """Remove entries received before ``before`` (rows, audit, files) and files that
        no row names and that are older than an hour (a crash between write and index)."""
        with self._transaction():
            ids = [row[0] for row in self._db.execute(
                "SELECT id FROM messages WHERE received < ? AND state != ?",
                (before, RELEASING))]
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                for table in ("messages", "recipients", "audit"):
                    self._db.execute(f"DELETE FROM {table} WHERE id IN ({marks})", chunk)
        for entry_id in ids:
            self.path_of(entry_id).unlink(missing_ok=True)
        hour_ago = time.time() - 3600
        for directory in (self.messages, self.tmp):
            for path in directory.iterdir():
                if path.stat().st_mtime >= hour_ago:
                    continue
                if directory is self.tmp or self._db.execute(
                        "SELECT 1 FROM messages WHERE id = ?", (path.stem,)).fetchone() is None:
                    path.unlink(missing_ok=True)
        return ids

    # ----------------------------------------------------------------------- helpers --
    def find(self, sha256: str) -> str | None:
        row = self._db.execute("SELECT id FROM messages WHERE sha256 = ?", (sha256,)).fetchone()
        return row[0] if row else None

    def _audit(self, entry_id: str, who: str, action: str, reason: str,
               detail: str = "") -> None:
        self._db.execute("INSERT INTO audit VALUES (?,?,?,?,?,?)",
                         (entry_id, time.time(), who, action, reason, detail))

    def _transaction(self):
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error); nested use joins the outer one."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._outer = False

    def __enter__(self):
        self._outer = not self._db.in_transaction
        if self._outer:
            self._db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._outer:
            return
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _by(item: Audit | None) -> str:
    if item is None:
        return ""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(item.at))
    why = f" ({item.reason})" if item.reason else ""
    return f" on {when} by {item.who}{why}"


def _evidence_json(evidence: Evidence) -> str:
    return json.dumps({
        "reason": evidence.reason, "account": evidence.account, "ip": evidence.ip,
        "helo": evidence.helo, "queue_id": evidence.queue_id, "host": evidence.host,
        "action": evidence.action, "score": evidence.score,
        "symbols": [list(s) for s in evidence.symbols], "report": list(evidence.report),
        "incident": evidence.incident})


def _evidence_from_json(text: str) -> Evidence:
    data = json.loads(text)
    data["symbols"] = tuple((name, score) for name, score in data.get("symbols", ()))
    data["report"] = tuple(data.get("report", ()))
    return Evidence(**data)


def _entry(row: tuple, recipients: tuple[Recipient, ...], audit: tuple[Audit, ...] = ()
           ) -> Entry:
    (entry_id, received, state, sender, _account, subject, from_header, message_id, size,
     sha256, source, _score, evidence) = row
    return Entry(entry_id, received, state, sender, recipients, _evidence_from_json(evidence),
                 subject, from_header, message_id, size, sha256, source, audit)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
