"""HTTP /checkv2 throughput, latency and CPU: straight to Rspamd vs. through the shim's HTTP front.

Run as root (Rspamd runs as _rspamd):

    .venv/bin/python bench/bench_http.py [--messages 2000] [--concurrency 8] [--rounds 4]

Four rows, one run: route ``direct`` (the lab Rspamd's own ``/checkv2``) or ``shim`` (the
shim's ``http_listen``, which scans with that same Rspamd), each with keep-alive ``on``
(every concurrent client keeps one HTTP/1.1 connection and sends request after request on
it, reconnecting only when a reply says ``Connection: close``) and ``off`` (a new
connection per request, sent with ``Connection: close``). Every row sends the same bytes:
bench_shim.py's ~3 KB ham (``--paragraphs``), raw (no mbox wrapping), with ``Content-Length``
and the envelope headers an MTA sends (From, Rcpt, IP, Helo, Queue-Id). The rows run in
``--rounds`` interleaved rounds, the row order rotated each round, so machine drift hits
every row alike; a warm-up of 50 requests per route comes first and is not counted.

Columns:
  req/s      requests answered per second of wall time (all clients together)
  p50/p99    per-request latency in ms, from before the connect (when one is needed) to
             the last byte of the reply, so a reconnect is part of the request it serves
  conns      TCP connections the clients opened for the row. Rspamd 3.4 answers every
             request with ``Connection: close``, so "direct / on" opens one per request
             too: keep-alive is asked for but not granted, and the column shows it
  errors     replies that were not HTTP 200 with an ``action`` in the JSON, plus failed
             or timed-out requests; any non-zero count is flagged under the table
  shim CPU   user+system CPU ms per request of the shim process (/proc/PID/stat, before
             and after each shim row); "-" for direct rows
  Rspamd CPU user+system CPU ms per request of all Rspamd processes (master + workers)
             during the row, as bench_shim.py measures it

Everything binds 127.0.0.1; every process started (NXDOMAIN DNS, Rspamd, the shim) is
stopped on the way out, errors included.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_shim import cpu_seconds, ham, pct  # noqa: E402  same messages, same CPU probe
from exim_policy.lab import Lab  # noqa: E402
from exim_policy.lab.process import group_members  # noqa: E402
from exim_policy.lab.shim import ShimLab  # noqa: E402

LOOPBACK = "127.0.0.1"
SENDER, RECIPIENT = "alice@example.org", "bob@stack.test"  # bench_shim's ham is To: bob@stack.test
MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024


def checkv2_request(i: int, port: int, *, keep_alive: bool, paragraphs: int) -> bytes:
    body = ham(i, paragraphs)
    head = (f"POST /checkv2 HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"From: <{SENDER}>\r\nRcpt: <{RECIPIENT}>\r\nIP: 127.0.0.1\r\n"
            f"Helo: client.test\r\nQueue-Id: 1bench-{i:06d}-00\r\n"
            + ("" if keep_alive else "Connection: close\r\n") + "\r\n")
    return head.encode() + body


class BadReply(Exception):
    pass


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """(status, server keeps the connection open, body) of one HTTP/1.x reply."""
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > MAX_HEAD:
        raise BadReply("reply head too large")
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    try:
        status = int(rest.split(" ", 1)[0])
    except ValueError:
        raise BadReply(f"bad status line {lines[0]!r}") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep = ("keep-alive" in tokens) if version == "HTTP/1.0" else ("close" not in tokens)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
            if len(body) > MAX_BODY:
                raise BadReply("reply body too large")
        return status, keep, bytes(body)
    if "content-length" in headers:
        length = int(headers["content-length"])
        if length > MAX_BODY:
            raise BadReply("reply body too large")
        return status, keep, await reader.readexactly(length)
    return status, False, await reader.read(MAX_BODY)  # delimited by the close


@dataclass
class Row:
    route: str
    keep_alive: bool
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    connections: int = 0
    closed_by_server: int = 0  # replies that said Connection: close although we did not ask
    stale: int = 0             # kept connections found closed before the reply: retried once
    errors: int = 0
    first_error: str = ""
    shim_cpu: float = 0.0
    rspamd_cpu: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.route} / {'on' if self.keep_alive else 'off'}"


class Client:
    """One concurrent client: at most one connection, reused while the server allows."""

    def __init__(self, port: int, row: Row, timeout: float) -> None:
        self.port, self.row, self.timeout = port, row, timeout
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def close(self) -> None:
        if self.conn is not None:
            writer = self.conn[1]
            self.conn = None
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def _exchange(self, payload: bytes) -> tuple[int, bool, bytes]:
        if self.conn is None:
            self.conn = await asyncio.open_connection(LOOPBACK, self.port)
            self.row.connections += 1
        reader, writer = self.conn
        writer.write(payload)  # never half-close: Rspamd 3.4 drops the task if we do
        await writer.drain()
        return await read_reply(reader)

    async def request(self, payload: bytes) -> float:
        started = time.perf_counter()
        reused = self.conn is not None
        try:
            try:
                status, keep, body = await asyncio.wait_for(self._exchange(payload), self.timeout)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                partial = getattr(exc, "partial", b"")
                if not (reused and not partial):
                    raise
                # the server closed the kept connection while it was idle: reconnect, once
                self.row.stale += 1
                await self.close()
                status, keep, body = await asyncio.wait_for(self._exchange(payload), self.timeout)
            latency = time.perf_counter() - started
            if self.row.keep_alive and not keep:
                self.row.closed_by_server += 1
            if not (self.row.keep_alive and keep):
                await self.close()
            if status != 200:
                raise BadReply(f"HTTP {status}: {body[:200]!r}")
            try:
                action = json.loads(body).get("action")
            except (ValueError, AttributeError):
                action = None
            if not action:
                raise BadReply(f"no action in the reply: {body[:200]!r}")
            return latency
        except (BadReply, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                asyncio.TimeoutError, ValueError) as exc:
            self.row.errors += 1
            if not self.row.first_error:
                self.row.first_error = f"{type(exc).__name__}: {exc}"[:300]
            await self.close()
            return -1.0


async def run_row(port: int, payloads: list[bytes], row: Row, concurrency: int,
                  timeout: float) -> None:
    queue = list(reversed(payloads))
    clients = [Client(port, row, timeout) for _ in range(concurrency)]

    async def worker(client: Client) -> None:
        try:
            while queue:
                latency = await client.request(queue.pop())
                if latency >= 0:
                    row.latencies.append(latency)
        finally:
            await client.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in clients))
    row.elapsed += time.perf_counter() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000, help="per row, over all rounds")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--log-level", default="info", help="the shim's log level")
    ap.add_argument("--paragraphs", type=int, default=18,
                    help="message size: 18 gives ~3 KB (as bench_shim.py), 300 ~50 KB")
    ap.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    args = ap.parse_args()
    per_round = max(1, args.messages // args.rounds)

    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="exim-policy-bench-") as workdir, \
            Lab(workdir) as lab:
        shim = ShimLab(workdir, rspamd_url=lab.rspamd.url, log_level=args.log_level)
        shim.start()
        try:
            rspamd_pids = group_members(lab.rspamd.process.pid)  # master + workers
            ports = {"direct": lab.rspamd.port, "shim": shim.http_port}
            rows = [Row(route, ka) for route in ("direct", "shim") for ka in (True, False)]
            payloads = {(row.route, row.keep_alive):
                        [checkv2_request(i, ports[row.route], keep_alive=row.keep_alive,
                                         paragraphs=args.paragraphs) for i in range(per_round)]
                        for row in rows}
            for route in ports:  # warm-up (first scans after a start are slower); not counted
                scratch = Row(route, True)
                asyncio.run(run_row(ports[route], payloads[(route, True)][:50], scratch,
                                    args.concurrency, args.timeout))
                if scratch.errors:
                    raise SystemExit(f"warm-up via {route} failed: {scratch.first_error}\n"
                                     f"{shim.log_tail() if route == 'shim' else ''}")
            for r in range(args.rounds):
                for row in rows[r % len(rows):] + rows[:r % len(rows)]:
                    c_shim, c_rspamd = cpu_seconds([shim.proc.pid]), cpu_seconds(rspamd_pids)
                    asyncio.run(run_row(ports[row.route], payloads[(row.route, row.keep_alive)],
                                        row, args.concurrency, args.timeout))
                    row.shim_cpu += cpu_seconds([shim.proc.pid]) - c_shim
                    row.rspamd_cpu += cpu_seconds(rspamd_pids) - c_rspamd
            shim_alive = shim.alive()
        finally:
            shim.stop()
    wall = time.perf_counter() - wall

    n = per_round * args.rounds
    print(f"requests per row: {n}  concurrency: {args.concurrency}  rounds: {args.rounds}"
          f" (interleaved, order rotated)  message: {len(ham(0, args.paragraphs))} bytes"
          f"  cores: {os.cpu_count()}  shim log level: {args.log_level}")
    print(f"  {'route / keep-alive':19s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s}"
          f" {'conns':>6s} {'errors':>6s} {'shim CPU ms/req':>16s} {'Rspamd CPU ms/req':>18s}")
    for row in rows:
        ok = len(row.latencies)
        rate = ok / row.elapsed if row.elapsed else 0.0
        p50 = f"{pct(row.latencies, 50):8.2f}" if ok > 1 else f"{'-':>8s}"
        p99 = f"{pct(row.latencies, 99):8.2f}" if ok > 1 else f"{'-':>8s}"
        shim_col = f"{row.shim_cpu / n * 1000:16.3f}" if row.route == "shim" else f"{'-':>16s}"
        print(f"  {row.label:19s} {rate:8.1f} {p50} {p99} {row.connections:6d} {row.errors:6d}"
              f" {shim_col} {row.rspamd_cpu / n * 1000:18.3f}")
    for row in rows:
        if row.keep_alive:
            print(f"  {row.label}: {row.connections} connections for {n} requests"
                  f" ({n / max(row.connections, 1):.1f} requests per connection);"
                  f" {row.closed_by_server} replies said Connection: close,"
                  f" {row.stale} kept connections found closed and retried")
    by = {(row.route, row.keep_alive): row for row in rows}
    for ka in (True, False):
        d, s = by[("direct", ka)], by[("shim", ka)]
        if d.elapsed and s.elapsed and d.latencies:
            ratio = (len(s.latencies) / s.elapsed) / (len(d.latencies) / d.elapsed)
            print(f"  throughput ratio shim/direct, keep-alive {'on' if ka else 'off'}:"
                  f" {ratio:.3f}")
    s_on, s_off = by[("shim", True)], by[("shim", False)]
    for row in (s_on, s_off):
        print(f"  shim CPU, keep-alive {'on' if row.keep_alive else 'off'}:"
              f" {row.shim_cpu / n * 1000:.3f} ms/req = "
              f"{row.shim_cpu / max(row.rspamd_cpu, 1e-9) * 100:.1f} % of Rspamd's CPU in that row")
    print(f"  wall time (lab start to stop): {wall:.1f} s")
    errors = sum(row.errors for row in rows)
    if errors or not shim_alive:
        for row in rows:
            if row.errors:
                print(f"  ERRORS {row.label}: {row.errors}, first: {row.first_error}")
        if not shim_alive:
            print("  ERROR: the shim process died during the run")
        print("  THIS RUN HAD ERRORS: the figures above are not comparable")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
