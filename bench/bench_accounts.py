"""Accounts: throughput and CPU per message with the account store on (sqlite, redis)
against off, side by side in one run; and the store's size for many accounts.

Part 1 starts the lab's Rspamd and Redis and four shims: accounts off, on with SQLite
(the daemon's cached store), on with the memory store (the account logic alone), on with
Redis (one limit and the incident rules configured, as a site would). Every shim
gets the same authenticated (outbound) ham, the exact ``CHECK RSPAMC/1.3`` request Exim
sends, from ``--accounts`` different users, at the same concurrency, in alternating
rounds. Prints msg/s, p50/p99, CPU per message of each shim, and the ratios to "off".

Part 2 writes ``--size-accounts`` accounts into each store directly (``--per-account``
messages of 2 recipients each, spread over one hour, every tenth account with one spam
verdict) and prints the SQLite file size and Redis's memory growth.

Run as root:  .venv/bin/python bench/bench_accounts.py [--messages 4000] [--size-accounts 100000]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_shim import cpu_seconds, pct  # noqa: E402

from exim_policy.config import from_dict  # noqa: E402
from exim_policy.lab import Lab  # noqa: E402
from exim_policy.lab.redis import RedisLab  # noqa: E402
from exim_policy.lab.shim import ShimLab  # noqa: E402
from exim_policy.model import MessageEvent  # noqa: E402
from exim_policy.protocol.mbox import exim_mbox_wrap  # noqa: E402
from exim_policy.state.memory import MemoryStore  # noqa: E402
from exim_policy.state.redis import RedisStore  # noqa: E402
from exim_policy.state.sqlite import SqliteStore  # noqa: E402

PARAGRAPH = ("Thanks for sending over the notes from Tuesday's planning meeting. I went "
             "through the action items and I think we are in good shape for the release.\n\n")
RULES = """
[[accounts.limits]]
window = "1h"
messages = 100000
recipients = 200000
unique_recipients = 100000
[accounts.incident]
window = "1h"
spam_verdicts = 5
on_open = "hold"
"""


def request(i: int, user: str) -> bytes:
    message = (f"Date: Sun, 22 Nov 2026 06:00:00 +0000\nTo: carol@example.com\n"
               f"From: {user}@lab.test\nSubject: Notes {i}\nMessage-ID: <acct-{i}@lab.test>\n\n"
               + PARAGRAPH * 18).encode()
    body = exim_mbox_wrap(message, sender=f"{user}@lab.test", recipients=["carol@example.com"])
    return (f"CHECK RSPAMC/1.3\r\nContent-length: {len(body)}\r\nQueue-Id: 1acct-{i:06d}-00\r\n"
            f"From: <{user}@lab.test>\r\nRecipient-Number: 1\r\nRcpt: <carol@example.com>\r\n"
            f"Helo: client.test\r\nIP: 127.0.0.1\r\nUser: {user}\r\n\r\n").encode() + body


async def round_trip(port: int, payloads: list[bytes], concurrency: int):
    queue = list(reversed(payloads))
    latencies: list[float] = []

    async def worker():
        while queue:
            payload = queue.pop()
            started = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(payload)
            reply = await reader.read()
            writer.close()
            if b"Action: no action" not in reply:
                raise SystemExit(f"unexpected reply on port {port}: {reply[:300]!r}")
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


def throughput(args, workdir: str, lab: Lab, redis: RedisLab) -> None:
    accounts = {
        "off": "",
        "sqlite": f'\n[accounts]\nenabled = true\npath = "{workdir}/bench-accounts.db"\n'
                  + RULES,
        "memory": "\n[accounts]\nenabled = true\nstore = \"memory\"\n" + RULES,
        "redis": f'\n[accounts]\nenabled = true\nstore = "redis"\nredis_url = "{redis.url}"\n'
                 'redis_prefix = "bench:"\n' + RULES,
    }
    shims = {}
    for name, toml in accounts.items():
        shims[name] = ShimLab(Path(workdir) / name, rspamd_url=lab.rspamd.url,
                              log_level=args.log_level, extra_toml=toml)
        shims[name].start()
    try:
        per_round = args.messages // args.rounds
        payloads = [request(i, f"user{i % args.accounts}") for i in range(per_round)]
        for shim in shims.values():  # warm-up
            asyncio.run(round_trip(shim.port, payloads[:50], args.concurrency))
        stats = {name: ([], 0.0, 0.0) for name in shims}
        redis_cpu = 0.0
        for _ in range(args.rounds):
            for name, shim in shims.items():
                before = cpu_seconds([shim.proc.pid])
                redis_before = cpu_seconds([redis.process.pid])
                elapsed, lat = asyncio.run(round_trip(shim.port, payloads, args.concurrency))
                lats, total, cpu = stats[name]
                stats[name] = (lats + lat, total + elapsed,
                               cpu + cpu_seconds([shim.proc.pid]) - before)
                if name == "redis":
                    redis_cpu += cpu_seconds([redis.process.pid]) - redis_before
    finally:
        for shim in shims.values():
            shim.stop()
    n = per_round * args.rounds
    print(f"part 1: {n} outbound messages per shim, {args.accounts} accounts, concurrency "
          f"{args.concurrency}, {args.rounds} alternating rounds, {os.cpu_count()} cores")
    base_rate = base_cpu = 0.0
    for name, (lats, total, cpu) in stats.items():
        rate, per = len(lats) / total, cpu / n * 1000
        if name == "off":
            base_rate, base_cpu = rate, per
        print(f"  accounts {name:6s} {rate:7.1f} msg/s  p50 {pct(lats, 50):6.2f} ms  p99 "
              f"{pct(lats, 99):6.2f} ms  shim CPU {per:.3f} ms/msg  "
              f"throughput x{rate / base_rate:.3f}"
              f"  CPU x{per / base_cpu:.2f}")
    print(f"  (redis-server itself: {redis_cpu / n * 1000:.3f} ms CPU per message, on the same "
          f"{os.cpu_count()} cores)")


def store_size(args, workdir: str, redis: RedisLab) -> None:
    config = from_dict({"accounts": {"enabled": True, "path": f"{workdir}/size.db",
                                     "redis_prefix": "size:", "store": "sqlite",
                                     "limits": [{"window": "1h", "messages": 500,
                                                 "unique_recipients": 500}]}}).accounts
    now = 1_800_000_000.0
    rng = random.Random(7)
    events = []
    for a in range(args.size_accounts):
        for m in range(args.per_account):
            at = now - 3600 + rng.random() * 3600
            spam = m == 0 and a % 10 == 0
            events.append((at, f"account{a:06d}@example.com", MessageEvent(
                at=at, recipients=(f"r{rng.randrange(10**6)}@example.net",
                                   f"r{rng.randrange(10**6)}@example.org"),
                counted=True, spam=spam, ip="192.0.2.7", queue_id=f"1x{a:06d}-{m}",
                subject="Notes from the meeting", action="reject" if spam else "no action",
                score=15.0 if spam else 0.5, symbols=("GTUBE",) if spam else ())))
    events.sort(key=lambda e: e[0])

    async def fill(store) -> float:
        started = time.perf_counter()
        batch = []
        for at, account, event in events:
            batch.append(store.record(account, event, (), at))
            if len(batch) >= 64:
                await asyncio.gather(*batch)
                batch = []
        await asyncio.gather(*batch)
        return time.perf_counter() - started

    async def info_memory() -> int:
        import redis.asyncio as aioredis
        client = aioredis.from_url(redis.url)
        try:
            return int((await client.info("memory"))["used_memory"])
        finally:
            await client.aclose()

    tracemalloc.start()
    memory = MemoryStore(config)  # what the daemon holds in front of the SQLite file
    asyncio.run(fill(memory))
    cache_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del memory
    sqlite = SqliteStore(config)
    took_sqlite = asyncio.run(_close_after(sqlite, fill(sqlite)))
    db_bytes = sum(os.path.getsize(p) for p in Path(workdir).glob("size.db*"))
    before = asyncio.run(info_memory())
    rstore = RedisStore(config, url=redis.url)
    took_redis = asyncio.run(_close_after(rstore, fill(rstore)))
    grown = asyncio.run(info_memory()) - before
    n = len(events)
    print(f"part 2: {args.size_accounts} accounts, {n} messages over one hour "
          f"({args.per_account} each, 2 recipients; every 10th account one spam verdict)")
    print(f"  sqlite: {db_bytes / 2**20:.1f} MB on disk ({db_bytes / n:.0f} bytes/message), "
          f"written in {took_sqlite:.1f} s ({n / took_sqlite:.0f} records/s)")
    print(f"  redis:  {grown / 2**20:.1f} MB of memory ({grown / n:.0f} bytes/message), "
          f"written in {took_redis:.1f} s ({n / took_redis:.0f} records/s)")
    print(f"  the daemon's cache in front of SQLite: {cache_bytes / 2**20:.1f} MB "
          f"({cache_bytes / args.size_accounts:.0f} bytes/account)")


async def _close_after(store, work):
    try:
        return await work
    finally:
        await store.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=4000, help="per shim, over all rounds")
    ap.add_argument("--accounts", type=int, default=500, help="distinct senders in part 1")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--size-accounts", type=int, default=100_000)
    ap.add_argument("--per-account", type=int, default=3)
    ap.add_argument("--skip", choices=["throughput", "size"], help="run only the other part")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="exim-policy-bench-") as workdir:
        os.chmod(workdir, 0o755)
        with Lab(workdir) as lab, RedisLab(workdir) as redis:
            if args.skip != "throughput":
                throughput(args, workdir, lab, redis)
            if args.skip != "size":
                store_size(args, workdir, redis)
    return 0


if __name__ == "__main__":
    sys.exit(main())
