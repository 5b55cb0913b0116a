"""One contract for every account store: memory, sqlite, the daemon's cached sqlite, and
redis (a real redis-server).

Time is passed in (``now``); nothing here sleeps. Each test gets a fresh store: a new
SQLite file, or a Redis key prefix of its own on the session's server.
"""
from __future__ import annotations

import asyncio
import uuid

import pytest

from exim_policy.config import from_dict
from exim_policy.model import (AccountStatus, MessageEvent, Transition, TransitionKind)
from exim_policy.state.base import AUDIT_KEPT, EVIDENCE_KEPT, INCIDENTS_KEPT
from exim_policy.state.cached import CachedSqliteStore
from exim_policy.state.memory import MemoryStore
from exim_policy.state.redis import RedisStore
from exim_policy.state.sqlite import SqliteStore

T0 = 1_800_000_000.0
ACCOUNTS = {"enabled": True,
            "limits": [{"window": "1m", "messages": 100}, {"window": "1h", "messages": 100}],
            "incident": {"window": "10m", "spam_verdicts": 3}, "history": "1d"}
CONFIG = from_dict({"accounts": ACCOUNTS}).accounts

OK, HELD, LOCKED = AccountStatus.OK, AccountStatus.HELD, AccountStatus.LOCKED


@pytest.fixture(params=["memory", "sqlite", "cached",
                        pytest.param("redis", marks=pytest.mark.real)])
def backend(request, tmp_path):
    """A factory: ``backend()`` opens the store (again: the same data, for persistence)."""
    kind = request.param
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    opened = []

    def open_store(config=CONFIG):
        if kind == "memory":
            store = opened[0] if opened else MemoryStore(config)  # it lives in the process
        elif kind == "sqlite":
            store = SqliteStore(config, path=str(tmp_path / "accounts.db"))
        elif kind == "cached":  # the daemon's: memory in front of the same file
            store = CachedSqliteStore(config, path=str(tmp_path / "accounts.db"))
        else:
            redis_server = request.getfixturevalue("redis_server")
            store = RedisStore(from_dict({"accounts": {**ACCOUNTS, "store": "redis",
                                                       "redis_prefix": prefix}}).accounts,
                               url=redis_server.url)
        opened.append(store)
        return store

    open_store.kind = kind
    return open_store  # each test closes what it opens (in_each)


def run(coro):
    return asyncio.run(coro)


def event(at, rcpts=("x@example.net",), counted=True, spam=False, subject="hi", ip="192.0.2.7"):
    return MessageEvent(at=at, recipients=tuple(rcpts), counted=counted, spam=spam, ip=ip,
                        queue_id=f"q{int(at)}", subject=subject, action="reject" if spam
                        else "no action", score=15.0 if spam else 0.0,
                        symbols=("GTUBE",) if spam else ())


def opened(mode="hold", to=HELD, shadow=False):
    return Transition(TransitionKind.OPENED, to, expect=(OK,), reason="3 spam verdicts",
                      mode=mode, shadow=shadow)


LOCK = Transition(TransitionKind.LOCKED, LOCKED, expect=(HELD,), reason="more spam", mode="lock")
MANUAL_LOCK = Transition(TransitionKind.LOCKED, LOCKED, expect=(OK, HELD), reason="phished",
                         who="root")
UNLOCK = Transition(TransitionKind.UNLOCKED, OK, expect=(), reason="password changed",
                    who="root")


async def in_each(store, coro_fn):
    """Run with a store and close it in the same event loop (redis clients are bound to
    the loop that made their connections)."""
    try:
        return await coro_fn(store)
    finally:
        await store.close()


def with_store(backend, fn):
    return run(in_each(backend(), fn))


# --------------------------------------------------------------------- counting --
def test_a_new_account_is_ok_and_empty(backend):
    async def go(store):
        return await store.state("alice", ["a@x", "b@x", "A@X"], T0)
    state = with_store(backend, go)
    assert state.status is OK and state.incident is None and state.spam_verdicts == 0
    assert [(c.window, c.messages, c.recipients, c.unique_recipients, c.fresh_recipients)
            for c in state.windows] == [(60.0, 0, 0, 0, 2), (3600.0, 0, 0, 0, 2)]


def test_counts_slide_with_each_window(backend):
    async def go(store):
        await store.record("alice", event(T0, ["a@x", "b@x"]), (), T0)
        await store.record("alice", event(T0 + 30, ["B@X", "c@x"]), (), T0 + 30)
        await store.record("alice", event(T0 + 90, ["d@x"]), (), T0 + 90)
        return (await store.state("alice", ["c@x", "e@x"], T0 + 100),
                await store.state("alice", [], T0 + 3700))
    now, later = with_store(backend, go)
    minute, hour = now.windows
    # the last minute holds the messages at +90 (and nothing from +30: 70 s ago)
    assert (minute.messages, minute.recipients, minute.unique_recipients) == (1, 1, 1)
    assert minute.fresh_recipients == 2           # c@x was counted at +30: not in this minute
    assert (hour.messages, hour.recipients, hour.unique_recipients) == (3, 5, 4)
    assert hour.fresh_recipients == 1             # e@x only
    assert later.windows[1].messages == 0         # over an hour later: gone


def test_uncounted_messages_do_not_count_but_their_spam_verdict_does(backend):
    async def go(store):
        await store.record("alice", event(T0, counted=False, spam=True), (), T0)
        return await store.state("alice", ["x@example.net"], T0 + 1)
    state = with_store(backend, go)
    assert state.windows[0].messages == 0 and state.windows[0].fresh_recipients == 1
    assert state.spam_verdicts == 1


def test_spam_verdicts_count_within_the_incident_window(backend):
    async def go(store):
        for i in range(3):
            await store.record("alice", event(T0 + i * 300, spam=True), (), T0 + i * 300)
        return await store.state("alice", [], T0 + 650)
    assert with_store(backend, go).spam_verdicts == 2  # the first is 650 s old: out of 10m


def test_accounts_are_kept_apart_whatever_their_names(backend):
    names = ["alice", "ALICE", "a:b", "{x}", "*", "user:ip:1", "bad\\x00name", "ünï", "x" * 256]

    async def go(store):
        for i, name in enumerate(names):
            for _ in range(i + 1):
                await store.record(name, event(T0), (), T0)
        return [await store.state(name, [], T0) for name in names], await store.accounts(T0)
    states, listing = with_store(backend, go)
    assert [s.windows[0].messages for s in states] == list(range(1, len(names) + 1))
    assert sorted(s.account for s in listing) == sorted(names)


# ------------------------------------------------------------------- incidents --
def test_opening_an_incident_holds_the_account_once(backend):
    async def go(store):
        for i in range(2):
            await store.record("alice", event(T0 + i, spam=True), (), T0 + i)
        first = await store.record("alice", event(T0 + 2, spam=True), [opened()], T0 + 2)
        second = await store.record("alice", event(T0 + 3, spam=True), [opened()], T0 + 3)
        return first, second, await store.state("alice", [], T0 + 4), \
            await store.detail("alice", T0 + 4)
    first, second, state, detail = with_store(backend, go)
    [made] = first
    assert second == ()                   # one incident at a time
    incident = made.incident
    assert incident.id > 0 and incident.state == "held" and incident.opened == T0 + 2
    assert incident.reason == "3 spam verdicts" and not incident.shadow
    proof = incident.evidence
    assert proof["account"] == "alice" and proof["transition"] == "opened"
    assert proof["first_spam"] == T0 and proof["last_spam"] == T0 + 2
    assert proof["client_ips"] == ["192.0.2.7"] and proof["top_symbols"] == ["GTUBE"]
    assert proof["subjects"] == ["hi"] and len(proof["queue_ids"]) == 3
    assert proof["counts"]["1h"]["messages"] == 3
    assert state.status is HELD and state.incident.id == incident.id
    assert state.spam_since_hold == 1     # the spam after the hold, not the one that opened it
    assert [i.id for i in detail.incidents] == [incident.id]
    assert detail.audit[0].action == "incident opened (hold)" and detail.audit[0].who
    assert detail.incidents[0].evidence["transition"] == "opened"


def test_two_shims_opening_at_once_make_one_incident(backend):
    async def go(store):
        results = await asyncio.gather(*(store.record("alice", event(T0, spam=True),
                                                      [opened()], T0) for _ in range(5)))
        return results, await store.detail("alice", T0)
    results, detail = with_store(backend, go)
    assert sum(len(r) for r in results) == 1 and len(detail.incidents) == 1


def test_a_held_account_escalates_to_locked_only_from_held(backend):
    async def go(store):
        not_held = await store.record("alice", event(T0, spam=True), [LOCK], T0)
        await store.record("alice", event(T0 + 1, spam=True), [opened()], T0 + 1)
        locked = await store.record("alice", event(T0 + 2, spam=True), [LOCK], T0 + 2)
        return not_held, locked, await store.state("alice", [], T0 + 3)
    not_held, locked, state = with_store(backend, go)
    assert not_held == ()
    [made] = locked
    assert made.incident.state == "locked" and state.status is LOCKED
    assert state.incident.id == made.incident.id  # the same incident, escalated


def test_a_manual_lock_opens_an_incident_and_an_unlock_ends_it_and_clears_counters(backend):
    async def go(store):
        await store.record("bob", event(T0, spam=True), (), T0)
        [lock] = await store.record("bob", None, [MANUAL_LOCK], T0 + 1)
        again = await store.record("bob", None, [MANUAL_LOCK], T0 + 2)
        [unlock] = await store.record("bob", None, [UNLOCK], T0 + 3)
        nothing = await store.record("bob", None, [UNLOCK], T0 + 4)  # nothing left to end
        return lock, again, unlock, nothing, await store.state("bob", ["x@example.net"], T0 + 5), \
            await store.detail("bob", T0 + 5)
    lock, again, unlock, nothing, state, detail = with_store(backend, go)
    assert lock.incident.state == "locked" and lock.incident.reason == "phished"
    assert again == () and nothing == ()
    assert unlock.incident.id == lock.incident.id and unlock.incident.state == "closed"
    assert unlock.incident.closed == T0 + 3
    assert state.status is OK and state.incident is None and state.spam_verdicts == 0
    assert state.windows[1].fresh_recipients == 1
    assert [(a.who, a.action, a.reason) for a in detail.audit] == [
        ("root", "unlocked", "password changed"), ("root", "locked", "phished")]
    assert detail.incidents[0].state == "closed" and detail.evidence == ()
    # the unlock's notice shows what it cleared
    assert unlock.incident.evidence["spam_verdicts"] == {"10m": 1}


def test_an_enforced_incident_supersedes_a_shadow_one(backend):
    async def go(store):
        [shadow] = await store.record("alice", event(T0, spam=True),
                                      [opened(shadow=True)], T0)
        repeat = await store.record("alice", event(T0 + 1, spam=True),
                                    [opened(shadow=True)], T0 + 1)
        [real] = await store.record("alice", event(T0 + 2, spam=True), [opened()], T0 + 2)
        return shadow, repeat, real, await store.detail("alice", T0 + 3)
    shadow, repeat, real, detail = with_store(backend, go)
    assert shadow.incident.shadow and repeat == ()
    assert real.incident.id != shadow.incident.id and not real.incident.shadow
    states = {i.id: i.state for i in detail.incidents}
    assert states == {shadow.incident.id: "closed", real.incident.id: "held"}
    assert detail.state.incident.id == real.incident.id


def test_reset_clears_counters_but_keeps_the_hold(backend):
    async def go(store):
        await store.record("alice", event(T0, spam=True), [opened()], T0)
        done = await store.reset("alice", "root", "false alarm", T0 + 1)
        unknown = await store.reset("nobody-at-all", "root", "x", T0 + 1)
        return done, unknown, await store.detail("alice", T0 + 2)
    done, unknown, detail = with_store(backend, go)
    assert done and not unknown
    assert detail.state.status is HELD and detail.state.windows[1].messages == 0
    assert detail.state.spam_verdicts == 0
    assert (detail.audit[0].action, detail.audit[0].reason) == ("reset", "false alarm")


# ------------------------------------------------------------------- boundedness --
def test_evidence_audit_and_incidents_are_capped(backend):
    async def go(store):
        for i in range(EVIDENCE_KEPT + 5):
            await store.record("alice", event(T0 + i, spam=True, subject=f"s{i}"), (), T0 + i)
        for i in range(INCIDENTS_KEPT + 2):
            await store.record("alice", None, [MANUAL_LOCK], T0 + 100 + 2 * i)
            await store.record("alice", None, [UNLOCK], T0 + 101 + 2 * i)
        for i in range(AUDIT_KEPT):
            await store.reset("alice", "root", f"r{i}", T0 + 200)
        await store.record("alice", event(T0 + 300, spam=True, subject="last"), (), T0 + 300)
        return await store.detail("alice", T0 + 301)
    detail = with_store(backend, go)
    assert len(detail.incidents) == INCIDENTS_KEPT and len(detail.audit) == AUDIT_KEPT
    assert detail.evidence[0].subject == "last" and len(detail.evidence) <= EVIDENCE_KEPT


def test_prune_forgets_quiet_accounts_and_keeps_held_ones_and_history(backend):
    async def go(store):
        await store.record("quiet", event(T0), (), T0)
        await store.record("held", event(T0, spam=True), [opened()], T0)
        await store.record("history", None, [MANUAL_LOCK], T0)
        await store.record("history", None, [UNLOCK], T0)
        await store.prune(T0 + 7200)             # past the longest window (1h)
        soon = sorted(s.account for s in await store.accounts(T0 + 7200))
        await store.prune(T0 + 2 * 86400)        # past the history (1d) too
        later = sorted(s.account for s in await store.accounts(T0 + 2 * 86400))
        return soon, later
    soon, later = with_store(backend, go)
    if backend.kind == "redis":
        # Redis expires keys itself, by its own clock (not the test's): quiet accounts
        # go when their keys expire; what prune keeps is the same
        assert "held" in soon and "history" in soon and "held" in later
    else:
        assert soon == ["held", "history"] and later == ["held"]


# ------------------------------------------------------------------- persistence --
@pytest.mark.parametrize("backend", ["sqlite", "cached",  # memory: nothing to reopen
                                     pytest.param("redis", marks=pytest.mark.real)],
                         indirect=True)
def test_a_lock_survives_reopening_the_store(backend):
    async def lock(store):
        await store.record("alice", None, [MANUAL_LOCK], T0)

    async def read(store):
        return await store.state("alice", [], T0 + 1)

    run(in_each(backend(), lock))
    assert run(in_each(backend(), read)).status is LOCKED


def test_the_cached_store_sees_what_another_process_changed(tmp_path):
    """The daemon's cache and the CLI's direct store on one file: a lock, an unlock and a
    reset made by the CLI reach the cache at its next refresh; its own counts reach the
    file behind it."""
    path = str(tmp_path / "accounts.db")

    async def go():
        cache = CachedSqliteStore(CONFIG, path=path)
        cli = SqliteStore(CONFIG, path=path)
        await cache.refresh(T0)
        for i in range(3):
            await cache.record("alice", event(T0 + i), (), T0 + i)
        await cli.record("alice", None, [MANUAL_LOCK], T0 + 5)
        before = (await cache.state("alice", [], T0 + 6)).status
        await cache.refresh(T0 + 6)
        after = await cache.state("alice", [], T0 + 6)
        await cache.detail("alice", T0 + 6)  # (a read of the file: writes itself first)
        counted = (await cli.state("alice", [], T0 + 6)).windows[1].messages
        await cli.record("alice", None, [UNLOCK], T0 + 7)
        await cache.refresh(T0 + 8)
        unlocked = await cache.state("alice", [], T0 + 8)
        await cache.close()
        await cli.close()
        return before, after, counted, unlocked
    before, after, counted, unlocked = run(go())
    assert before is OK and after.status is LOCKED  # seen at the refresh, not before
    assert counted == 3                            # the cache's counts are in the file
    assert unlocked.status is OK and unlocked.windows[1].messages == 0
