"""The Redis account store after Redis restarts (found by bench/bench_chain.py's
redis-restart fault): once Redis answers again, the store must answer too.

The client keeps a pool of connections. A restart closes every one of them on the server
side, and without a retry each pooled connection failed its next command once ("Connection
closed by server"), however long after the restart that came: the bench saw such failures
14 s after Redis was back, i.e. messages whose account was neither checked nor counted
(failure.accounts = open) or got a 451 (= tempfail) long after the store had recovered.
"""
from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from exim_policy.config import from_dict
from exim_policy.state.base import StoreError
from exim_policy.state.redis import RedisStore

pytestmark = pytest.mark.real

#: connections the pool holds before the restart (as many as messages in flight at once)
POOLED = 12


def store_for(url: str) -> RedisStore:
    config = from_dict({"accounts": {"enabled": True, "store": "redis", "redis_url": url,
                                     "redis_prefix": f"restart-{uuid.uuid4().hex[:8]}:"}})
    return RedisStore(config.accounts)


async def failures(store: RedisStore, count: int = POOLED) -> list[BaseException]:
    """``count`` reads at once (each on a connection of its own), the errors among them."""
    replies = await asyncio.gather(
        *(store.state(f"user{i}", ("rcpt@example.com",), time.time()) for i in range(count)),
        return_exceptions=True)
    return [r for r in replies if isinstance(r, BaseException)]


def test_every_pooled_connection_works_once_redis_is_back(redis_server):
    async def scenario() -> tuple[list, list, list]:
        store = store_for(redis_server.url)
        try:
            before = await failures(store)
            await asyncio.to_thread(redis_server.restart)
            await asyncio.sleep(0.5)  # back, and answering PING (RedisLab.start waits)
            after = await failures(store)
            again = await failures(store)
            return before, after, again
        finally:
            await store.close()

    before, after, again = asyncio.run(scenario())
    assert before == []
    assert after == [], f"{len(after)} of {POOLED} reads failed after Redis was back: {after[0]}"
    assert again == []


def test_a_store_that_is_down_still_fails_fast(redis_server):
    """The retry is for a connection that went stale, not a reason to wait on a store
    that is down: a refused connection still fails within the store's timeout."""
    async def scenario() -> tuple[float, list]:
        store = store_for(redis_server.url)
        try:
            await failures(store, 2)
            await asyncio.to_thread(redis_server.stop)
            started = time.monotonic()
            errors = await failures(store, 2)
            return time.monotonic() - started, errors
        finally:
            await store.close()

    try:
        elapsed, errors = asyncio.run(scenario())
    finally:
        redis_server.start()
    assert len(errors) == 2 and all(isinstance(e, StoreError) for e in errors), errors
    assert elapsed < 2.0, f"a store that is down took {elapsed:.1f}s to fail"
