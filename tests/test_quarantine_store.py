"""The quarantine store: files + SQLite index, exactly-once release bookkeeping, purge."""
from __future__ import annotations

import hashlib
import os
import time

import pytest

from exim_policy.quarantine.evidence import Evidence
from exim_policy.quarantine.store import (DELETED, HELD, RELEASED, RELEASING, NewMessage,
                                          QuarantineError, QuarantineStore)

BODY = b"From: a@lab.test\r\nSubject: s\r\n\r\nspam\r\n"


@pytest.fixture
def store(tmp_path):
    s = QuarantineStore(tmp_path / "q")
    yield s
    s.close()


def put(store: QuarantineStore, body: bytes = BODY, recipients=("x@example.com",),
        sender="a@lab.test", account="alice", received: float | None = None):
    path, fh = store.temp_file()
    with fh:
        fh.write(body)
    message = NewMessage(sender=sender, recipients=tuple(recipients),
                         evidence=Evidence(account=account, score=15.0,
                                           symbols=(("GTUBE", 0.0),)),
                         size=len(body), sha256=hashlib.sha256(body).hexdigest(),
                         subject="s", received=received or time.time())
    return store.commit(path, message)


def test_commit_keeps_file_envelope_and_evidence(store):
    entry_id, merged = put(store, recipients=("x@example.com", "y@example.net"))
    assert not merged
    assert store.path_of(entry_id).read_bytes() == BODY
    assert oct(store.path_of(entry_id).stat().st_mode & 0o777) == "0o600"
    entry = store.get(entry_id)
    assert entry.state == HELD and entry.sender == "a@lab.test"
    assert [r.address for r in entry.recipients] == ["x@example.com", "y@example.net"]
    assert entry.evidence.symbols == (("GTUBE", 0.0),) and entry.evidence.account == "alice"
    assert list(store.tmp.iterdir()) == []


def test_the_same_message_again_is_one_entry_with_every_recipient(store):
    """Exim resends after a lost 250, or splits a long recipient list: one entry."""
    first, _ = put(store, recipients=("x@example.com",))
    again, merged = put(store, recipients=("x@example.com", "z@example.org"))
    assert (again, merged) == (first, True)
    assert len(list(store.messages.iterdir())) == 1 and list(store.tmp.iterdir()) == []
    assert [r.address for r in store.get(first).recipients] == ["x@example.com",
                                                                "z@example.org"]
    assert store.get(first).last("merged").detail == "1 more recipient(s)"


def test_claim_is_exactly_once(store):
    entry_id, _ = put(store)
    store.claim(entry_id, "root", "customer asked")
    assert store.get(entry_id).state == RELEASING
    with pytest.raises(QuarantineError, match="did not finish"):
        store.claim(entry_id, "root", "again")
    store.finish(entry_id, "root", "customer asked", "exim", {"x@example.com": (True, "ok")})
    entry = store.get(entry_id)
    assert entry.state == RELEASED and entry.recipients[0].state == "released"
    with pytest.raises(QuarantineError, match="already released on .* by root"):
        store.claim(entry_id, "root", "again")
    assert store.claim(entry_id, "root", "really", force=True).state == RELEASED
    actions = [a.action for a in store.get(entry_id).audit]
    assert actions == ["release-started", "released", "release-started"]


def test_a_refused_recipient_stays_held_for_the_next_release(store):
    entry_id, _ = put(store, recipients=("x@example.com", "y@example.net"))
    store.claim(entry_id, "root", "r")
    entry = store.finish(entry_id, "root", "r", "smtp:127.0.0.1:10025",
                         {"x@example.com": (True, "250 OK"), "y@example.net": (False, "451 later")})
    assert entry.state == HELD
    assert [(r.address, r.state) for r in entry.recipients] == [
        ("x@example.com", "released"), ("y@example.net", "failed")]
    assert "refused: y@example.net: 451 later" in entry.last("released").detail


def test_abandon_makes_it_held_again(store):
    entry_id, _ = put(store)
    store.claim(entry_id, "root", "r")
    store.abandon(entry_id, "root", "exim exited with status 1")
    entry = store.get(entry_id)
    assert entry.state == HELD and entry.last("release-failed").detail.startswith("exim")


def test_delete_removes_the_file_and_keeps_the_record(store):
    entry_id, _ = put(store)
    store.delete(entry_id, "root", "confirmed spam")
    entry = store.get(entry_id)
    assert entry.state == DELETED and not store.path_of(entry_id).exists()
    assert entry.last("deleted").reason == "confirmed spam"
    with pytest.raises(QuarantineError, match="deleted on"):
        store.claim(entry_id, "root", "r", force=True)
    with pytest.raises(QuarantineError, match="already deleted"):
        store.delete(entry_id, "root", "again")
    with pytest.raises(QuarantineError, match="no such message"):
        store.delete("nope", "root", "x")


def test_list_filters(store):
    old, _ = put(store, body=BODY + b"1", account="alice", received=time.time() - 7200)
    new, _ = put(store, body=BODY + b"2", account="bob")
    assert [e.id for e in store.list()] == [new, old]
    assert [e.id for e in store.list(account="alice")] == [old]
    assert [e.id for e in store.list(since=time.time() - 3600)] == [new]
    store.delete(new, "root", "x")
    assert [e.id for e in store.list(state=HELD)] == [old]
    assert store.list(limit=1)[0].id == new


def test_purge_removes_old_entries_and_orphan_files(store):
    old, _ = put(store, body=BODY + b"old", received=time.time() - 40 * 86400)
    new, _ = put(store, body=BODY + b"new")
    orphan = store.messages / "deadbeef0000.eml"  # a crash between file and index
    orphan.write_bytes(b"x")
    stale_tmp = store.tmp / "1.tmp"
    stale_tmp.write_bytes(b"x")
    for path in (orphan, stale_tmp):
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    assert store.purge(time.time() - 30 * 86400) == [old]
    assert store.get(old) is None and not store.path_of(old).exists()
    assert store.get(new) is not None and store.path_of(new).exists()
    assert not orphan.exists() and not stale_tmp.exists()


def test_opening_without_a_quarantine_is_a_clear_error(tmp_path):
    with pytest.raises(QuarantineError, match="no quarantine here"):
        QuarantineStore(tmp_path / "none", create=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(QuarantineError, match="cannot open the quarantine"):
        QuarantineStore(tmp_path / "file" / "q")
