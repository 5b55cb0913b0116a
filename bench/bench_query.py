"""The policy helper: queries/s on the daemon's query socket, and start-up time of
``exim-policy query`` (what Exim's ``${run}`` pays per recipient).

Starts ``exim-policy serve`` with a 100,000-entry forwarding map and a TCP and a unix query
listener (no Rspamd is needed for queries), then drives it with concurrent one-shot
connections the way ``${readsocket}`` does (connect, send a line, half-close, read to EOF).

    .venv/bin/python bench/bench_query.py [--queries 60000] [--concurrency 32]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exim_policy.lab.ports import LOOPBACK, free_port, wait_tcp  # noqa: E402


async def ask(connect, payload: bytes) -> bytes:
    reader, writer = await connect()
    writer.write(payload)
    writer.write_eof()
    reply = await reader.read()
    writer.close()
    return reply


async def drive(connect, total: int, concurrency: int, entries: int) -> float:
    remaining = total

    async def worker(seed: int):
        nonlocal remaining
        i = seed
        while remaining > 0:
            remaining -= 1
            i += 7919
            addr = f"user{i % (entries * 2)}@example.com"  # half of them are in the map
            reply = await ask(connect, f"forwarding {addr}\n".encode())
            expected = b"yes" if i % (entries * 2) < entries else b"no"
            if reply != expected:
                raise SystemExit(f"wrong answer for {addr}: {reply!r}")

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return time.perf_counter() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=60000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--cli-runs", type=int, default=20)
    args = ap.parse_args()
    try:
        import uvloop
        new_loop = uvloop.new_event_loop
    except ImportError:
        new_loop = asyncio.new_event_loop

    with tempfile.TemporaryDirectory(prefix="exim-policy-qbench-") as work:
        fmap = Path(work, "forwardings.txt")
        fmap.write_text("# bench map\n" + "".join(
            f"user{i}@example.com\n" for i in range(args.entries)))
        port, sock = free_port(), os.path.join(work, "query.sock")
        config = Path(work, "config.toml")
        config.write_text(
            f'[server]\nlisten = ["{LOOPBACK}:{free_port()}"]\n'
            f'query_listen = ["{LOOPBACK}:{port}", "unix:{sock}"]\n'
            f'[rspamd]\nurl = "http://{LOOPBACK}:{free_port()}"\n'
            f'[forwarding]\nmap = "{fmap}"\n[logging]\nlevel = "warning"\n'
            '[quarantine]\nlisten = []\n')
        daemon = subprocess.Popen([sys.executable, "-m", "exim_policy", "serve", "--config",
                                   str(config)], stdin=subprocess.DEVNULL)
        try:
            wait_tcp(LOOPBACK, port, time.monotonic() + 30, alive=lambda: daemon.poll() is None)
            loop = new_loop()
            for name, connect in (
                    ("tcp", lambda: asyncio.open_connection(LOOPBACK, port)),
                    ("unix", lambda: asyncio.open_unix_connection(sock))):
                loop.run_until_complete(drive(connect, 2000, args.concurrency, args.entries))
                elapsed = loop.run_until_complete(
                    drive(connect, args.queries, args.concurrency, args.entries))
                print(f"query socket {name:4s}: {args.queries / elapsed:8.0f} queries/s "
                      f"({args.queries} one-shot connections, concurrency {args.concurrency},"
                      f" {args.entries} map entries; client and daemon share {os.cpu_count()}"
                      f" cores)")
            loop.close()

            for label, cfg in (("daemon socket", config), ("map file", _file_only(work, fmap))):
                times = []
                for _ in range(args.cli_runs):
                    started = time.perf_counter()
                    done = subprocess.run(
                        [sys.executable, "-m", "exim_policy", "query", "forwarding",
                         f"user{args.entries - 1}@example.com", "--config", str(cfg)],
                        capture_output=True, timeout=60)
                    times.append(time.perf_counter() - started)
                    assert done.stdout == b"yes\n", done
                median = statistics.median(times) * 1000
                print(f"exim-policy query ({label:13s}): median {median:6.1f}"
                      f" ms, min {min(times) * 1000:6.1f} ms over {args.cli_runs} runs")
            bare = []
            for _ in range(args.cli_runs):
                started = time.perf_counter()
                subprocess.run([sys.executable, "-c", "pass"], timeout=60)
                bare.append(time.perf_counter() - started)
            print(f"(python -c pass: median {statistics.median(bare) * 1000:6.1f} ms)")
        finally:
            daemon.terminate()
            daemon.wait(10)
    return 0


def _file_only(work: str, fmap: Path) -> Path:
    cfg = Path(work, "file-only.toml")
    cfg.write_text(f'[forwarding]\nmap = "{fmap}"\n')
    return cfg


if __name__ == "__main__":
    sys.exit(main())
