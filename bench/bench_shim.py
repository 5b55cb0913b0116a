"""Throughput, latency and CPU: Exim-style requests through the shim vs. straight to Rspamd.

Both paths get the same bytes (the exact ``CHECK RSPAMC/1.3`` request Exim sends, mbox-wrapped
body, one connection per message) at the same concurrency, in alternating rounds of one run
(the order rotates from round to round), so machine noise hits both alike. Prints
messages/s, p50/p99 latency, the throughput ratio shim/direct, and CPU seconds per message
of the shim process vs. Rspamd's processes.

``--metrics``: two more shims run beside the first (no metrics, text logs) in the same
alternating rounds: one with ``[metrics]`` on, one with ``[metrics]`` on and JSON logs.
Each prints its CPU per message; a metered shim is scraped before and after each of its
rounds (its counters must have moved by exactly the messages sent; the scrape after the
round is in its CPU figure). It also times the metrics calls themselves in this process: the counting per
message, a ``labels()`` lookup, one scrape.

Run as root (Rspamd runs as _rspamd):  .venv/bin/python bench/bench_shim.py [--messages 2000]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
import timeit
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exim_policy.lab import Lab  # noqa: E402
from exim_policy.lab.process import group_members  # noqa: E402
from exim_policy.lab.shim import ShimLab  # noqa: E402
from exim_policy.protocol.mbox import exim_mbox_wrap  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")
PARAGRAPH = ("Thanks for sending over the notes from Tuesday's planning meeting. I went "
             "through the action items and I think we are in good shape for the release.\n\n")


def ham(i: int, paragraphs: int = 18) -> bytes:
    return (f"Date: Sun, 22 Nov 2026 06:00:00 +0000\nTo: bob@stack.test\n"
            f"From: alice@example.org\nSubject: Notes from the planning meeting {i}\n"
            f"Message-ID: <bench-{i}@example.org>\nMIME-Version: 1.0\n"
            f"Content-Type: text/plain; charset=UTF-8\n\nHi Bob,\n\n"
            + PARAGRAPH * paragraphs + "Best regards,\nAlice\n").encode()


def exim_request(i: int, paragraphs: int = 18) -> bytes:
    body = exim_mbox_wrap(ham(i, paragraphs), sender="alice@example.org", recipients=["bob@stack.test"])
    head = (f"CHECK RSPAMC/1.3\r\nContent-length: {len(body)}\r\nQueue-Id: 1bench-{i:06d}-00\r\n"
            f"From: <alice@example.org>\r\nRecipient-Number: 1\r\nRcpt: <bob@stack.test>\r\n"
            f"Helo: client.test\r\nIP: 127.0.0.1\r\n\r\n")
    return head.encode() + body


def cpu_times(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of the processes, from /proc/PID/stat."""
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user, system = user + int(fields[11]), system + int(fields[12])
    return user / HZ, system / HZ


def cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_times(pids))


async def one(port: int, payload: bytes) -> tuple[float, bytes]:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    reply = await reader.read()  # both servers close after the reply
    writer.close()
    return time.perf_counter() - started, reply


async def run_round(port: int, payloads: list[bytes], concurrency: int) -> tuple[float, list[float]]:
    queue = list(reversed(payloads))
    latencies: list[float] = []

    async def worker():
        while queue:
            latency, reply = await one(port, queue.pop())
            if b"Action: no action" not in reply:
                raise SystemExit(f"unexpected reply on port {port}: {reply[:200]!r}")
            latencies.append(latency)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000


def messages_counted(url: str) -> float:
    """exim_policy_messages_total summed over its labels, scraped from ``url``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == "exim_policy_messages_total")


def micro_metrics(number: int = 200_000) -> None:
    """The metrics calls on their own, in this process (no I/O): per call, in µs."""
    from exim_policy.config import from_dict
    from exim_policy.metrics import Metrics
    from exim_policy.model import Decision, Envelope, ScanResult, Traffic
    from exim_policy.pipeline import Evaluation

    metrics = Metrics()
    metrics.instrument(from_dict({}))
    scan = ScanResult("no action", 1.0, 15.0)
    evaluation = Evaluation(Envelope(), Decision("no action", Traffic.INBOUND, "", scan=scan),
                            0.004, 0.003)
    counter = metrics._messages.metric
    per_message = timeit.timeit(lambda: metrics.message("rspamc", evaluation), number=number)
    labels = timeit.timeit(lambda: counter.labels("rspamc", "inbound", "no action", "no action"),
                           number=number)
    inc = timeit.timeit(metrics._messages["rspamc", Traffic.INBOUND, "no action",
                                          "no action"].inc, number=number)
    empty = timeit.timeit(lambda: None, number=number)
    for protocol in ("rspamc", "spamc", "http"):  # a registry of a busy daemon's size
        for traffic in Traffic:
            for action in ("no action", "add header", "reject", "soft reject"):
                metrics._messages[protocol, traffic, action, action].inc()
    scrapes = 200
    scrape = timeit.timeit(lambda: asyncio.run(metrics.scrape()), number=scrapes)
    loop_only = timeit.timeit(lambda: asyncio.run(asyncio.sleep(0)), number=scrapes)
    size = len(asyncio.run(metrics.scrape()).body)
    print(f"  metrics calls (this process, {number} calls each): Metrics.message "
          f"{(per_message - empty) / number * 1e6:.2f} µs per message; labels() "
          f"{(labels - empty) / number * 1e6:.2f} µs (kept children avoid it); a child's "
          f"inc() {(inc - empty) / number * 1e6:.2f} µs")
    print(f"  one scrape (generate_latest, {size} bytes): "
          f"{(scrape - loop_only) / scrapes * 1000:.3f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000, help="per path, over all rounds")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--log-level", default="info", help="the shim's log level")
    ap.add_argument("--paragraphs", type=int, default=18,
                    help="message size: 18 gives ~3 KB, 300 ~50 KB")
    ap.add_argument("--idle", type=int, default=0,
                    help="connections held open to the shim meanwhile, half of them silent, "
                         "half having sent one byte (a slowloris)")
    ap.add_argument("--metrics", action="store_true",
                    help="also shims with [metrics] on (text logs, JSON logs), side by side")
    args = ap.parse_args()
    if args.metrics:
        micro_metrics()

    payloads = [exim_request(i, args.paragraphs) for i in range(args.messages // args.rounds)]
    with tempfile.TemporaryDirectory(prefix="exim-policy-bench-") as workdir, \
            Lab(workdir) as lab:
        shim = ShimLab(workdir, rspamd_url=lab.rspamd.url, log_level=args.log_level)
        shim.start()
        shims = {"shim": shim}
        if args.metrics:
            for name, log_format in (("shim+metrics", "text"), ("shim+metrics+json", "json")):
                shims[name] = ShimLab(os.path.join(workdir, name), rspamd_url=lab.rspamd.url,
                                      log_level=args.log_level, log_format=log_format,
                                      metrics={})
                shims[name].start()
        idle = [socket.create_connection(("127.0.0.1", shim.port)) for _ in range(args.idle)]
        for sock in idle[::2]:
            sock.sendall(b"C")
        try:
            rspamd_pids = group_members(lab.rspamd.process.pid)  # master + workers
            results = {name: ([], 0.0, 0.0) for name in ("direct", *shims)}
            cpu = {name: [0.0, 0.0, 0.0] for name in shims}  # shim, its system part, Rspamd
            # warm-up every path (first scans after start are slower)
            asyncio.run(run_round(lab.rspamd.port, payloads[:50], args.concurrency))
            for one_shim in shims.values():
                asyncio.run(run_round(one_shim.port, payloads[:50], args.concurrency))
            names = list(results)
            for r in range(args.rounds):
                # each path in turn takes each place in a round: no path always follows
                # the same one
                for name in names[r % len(names):] + names[:r % len(names)]:
                    port = shims[name].port if name in shims else lab.rspamd.port
                    pid = shims[name].proc.pid if name in shims else shim.proc.pid
                    metered = name in shims and shims[name].metrics_port is not None
                    counted = messages_counted(shims[name].metrics_url) if metered else 0.0
                    c_shim, c_rspamd = cpu_seconds([pid]), cpu_seconds(rspamd_pids)
                    c_sys = cpu_times([pid])[1]
                    elapsed, lat = asyncio.run(run_round(port, payloads, args.concurrency))
                    if metered:  # (this scrape is in the round's CPU figure)
                        moved = messages_counted(shims[name].metrics_url) - counted
                        if moved != len(payloads):
                            raise SystemExit(f"metrics: {moved:g} messages counted, "
                                             f"{len(payloads)} sent")
                    d_shim = cpu_seconds([pid]) - c_shim
                    d_rspamd = cpu_seconds(rspamd_pids) - c_rspamd
                    lats, total, _ = results[name]
                    results[name] = (lats + lat, total + elapsed, 0.0)
                    if name in shims:
                        cpu[name][0] += d_shim
                        cpu[name][1] += cpu_times([pid])[1] - c_sys
                        cpu[name][2] += d_rspamd
        finally:
            for sock in idle:
                sock.close()
            for one_shim in shims.values():
                one_shim.stop()

    print(f"messages per path: {len(payloads) * args.rounds}  concurrency: {args.concurrency}"
          f"  rounds: {args.rounds}  message: {len(payloads[0])} bytes  cores: {os.cpu_count()}"
          f"  idle connections to the shim: {args.idle}")
    rates = {}
    for name, (lats, total, _) in results.items():
        rates[name] = len(lats) / total
        print(f"  {name:17s} {rates[name]:7.1f} msg/s   p50 {pct(lats, 50):6.2f} ms"
              f"   p99 {pct(lats, 99):6.2f} ms")
    n = len(payloads) * args.rounds
    print(f"  throughput ratio shim/direct: {rates['shim'] / rates['direct']:.3f}")
    for name, (shim_cpu, shim_sys, rspamd_cpu) in cpu.items():
        print(f"  CPU per message: {name} {shim_cpu / n * 1000:.3f} ms, Rspamd "
              f"{rspamd_cpu / n * 1000:.3f} ms -> shim/Rspamd "
              f"{shim_cpu / max(rspamd_cpu, 1e-9) * 100:.1f} %"
              f"  (shim: {(shim_cpu - shim_sys) / n * 1000:.3f} ms user +"
              f" {shim_sys / n * 1000:.3f} ms system)")
    plain = cpu["shim"][0] / n
    for name in ("shim+metrics", "shim+metrics+json"):
        if name in cpu:
            other = cpu[name][0] / n
            print(f"  {name} vs shim: {(other - plain) * 1e6:+.1f} µs CPU per message "
                  f"({(other / plain - 1) * 100:+.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
