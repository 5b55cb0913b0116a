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
round is in its CPU figure). It also times the metrics calls themselves in this process: the
counting per message, a ``labels()`` lookup, one scrape.

``--workers 2`` (a list: ``2,4``): a shim with ``server.workers = 2`` runs beside the first
(workers = 1) in the same rounds; its CPU is the supervisor's and its workers' together. With
``--metrics`` too, one more with workers and ``[metrics]`` on, and the metrics calls are
timed again in the workers' multi-process mode (values in files: prometheus_client's
``PROMETHEUS_MULTIPROC_DIR``).

``--baseline DIR``: one more shim, running the code of another checkout (``git worktree add
DIR COMMIT``), beside this one in the same rounds: a change's CPU and throughput, before and
after, under the same load.

``--unix``: both hops over unix sockets too, side by side with TCP: "direct unix" sends
straight to Rspamd's socket, "shim unix" to the shim's socket, which scans over Rspamd's
(``rspamd.url = "unix:..."``).

``--floor``: one more path, bench/bare_relay.py -- a relay that does only the I/O a shim
must do (accept, read, POST to the upstream, read to EOF, answer, close), on the same
event loop: its CPU per message is the floor under any asyncio shim on this machine.

``--upstream canned``: in Rspamd's place a canned /checkv2 responder (a process of its own,
answering "no action" at once, and the legacy protocol for the direct path), so the shim's
own CPU is what limits the throughput, not Rspamd's one worker; "direct" then measures the
client and the responder alone.

Run as root (Rspamd runs as _rspamd):  .venv/bin/python bench/bench_shim.py [--messages 2000]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
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
    body = exim_mbox_wrap(ham(i, paragraphs), sender="alice@example.org",
                          recipients=["bob@stack.test"])
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


async def one(address: int | str, payload: bytes) -> tuple[float, bytes]:
    """One request on a connection of its own to a loopback port, or a unix socket path."""
    started = time.perf_counter()
    if isinstance(address, str):
        reader, writer = await asyncio.open_unix_connection(address)
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", address)
    writer.write(payload)
    await writer.drain()
    reply = await reader.read()  # both servers close after the reply
    writer.close()
    return time.perf_counter() - started, reply


async def run_round(address: int | str, payloads: list[bytes],
                    concurrency: int) -> tuple[float, list[float]]:
    queue = list(reversed(payloads))
    latencies: list[float] = []

    async def worker():
        while queue:
            latency, reply = await one(address, queue.pop())
            if b"Action: no action" not in reply:
                raise SystemExit(f"unexpected reply from {address}: {reply[:200]!r}")
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


def micro_metrics(number: int = 200_000, shared_dir: str | None = None) -> None:
    """The metrics calls on their own, in this process (no I/O): per call, in µs;
    ``shared_dir``: in the workers' multi-process mode (process-wide: call it last, or in a
    process of its own)."""
    from exim_policy.config import from_dict
    from exim_policy.metrics import Metrics
    from exim_policy.model import Decision, Envelope, ScanResult, Traffic
    from exim_policy.pipeline import Evaluation

    metrics = Metrics(shared_dir)
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
    mode = "workers' multi-process mode" if shared_dir else "this process"
    print(f"  metrics calls ({mode}, {number} calls each): Metrics.message "
          f"{(per_message - empty) / number * 1e6:.2f} µs per message; labels() "
          f"{(labels - empty) / number * 1e6:.2f} µs (kept children avoid it); a child's "
          f"inc() {(inc - empty) / number * 1e6:.2f} µs")
    print(f"  one scrape (generate_latest, {size} bytes): "
          f"{(scrape - loop_only) / scrapes * 1000:.3f} ms")


def micro_metrics_shared(number: int = 200_000) -> None:
    """:func:`micro_metrics` in the multi-process mode, in a forked child."""
    with tempfile.TemporaryDirectory(prefix="exim-policy-bench-metrics-") as directory:
        pid = os.fork()
        if pid == 0:
            try:
                micro_metrics(number, directory)
                sys.stdout.flush()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)


CANNED_JSON = b'{"action": "no action", "score": 0.0, "required_score": 15.0, ' \
    b'"symbols": {}, "messages": {}}'
CANNED_RSPAMC = (b"RSPAMD/1.3 0 EX_OK\r\nMetric: default; False; 0.00 / 15.00 / 0.00\r\n"
                 b"Action: no action\r\n")


def canned_upstream(port_pipe: int, socket_path: str) -> None:
    """Serve "no action" to /checkv2 (HTTP) and to the legacy CHECK request, one request
    per connection, then close, on a loopback port and on a unix socket at ``socket_path``;
    writes the port to ``port_pipe``. Runs until killed."""
    try:
        import uvloop
        new_loop = uvloop.new_event_loop
    except ImportError:
        new_loop = asyncio.new_event_loop

    class Canned(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.data, self.need = transport, bytearray(), None

        def data_received(self, data):
            self.data += data
            if self.need is None:
                end = self.data.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.data[:end]).lower()
                length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                self.need, self.http = end + 4 + length, not head.startswith(b"check ")
            if len(self.data) >= self.need:
                if self.http:
                    self.transport.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
                                         b"Content-Type: application/json\r\n"
                                         b"Content-Length: %d\r\n\r\n" % len(CANNED_JSON)
                                         + CANNED_JSON)
                else:
                    self.transport.write(CANNED_RSPAMC)
                self.transport.close()

    loop = new_loop()
    server = loop.run_until_complete(loop.create_server(Canned, "127.0.0.1", 0, backlog=1024))
    loop.run_until_complete(loop.create_unix_server(Canned, socket_path, backlog=1024))
    os.write(port_pipe, str(server.sockets[0].getsockname()[1]).encode())
    os.close(port_pipe)
    loop.run_forever()


class CannedLab:
    """The canned responder as a process, where the bench would use the lab's Rspamd."""

    def __init__(self, workdir: str) -> None:
        self.socket_path = os.path.join(workdir, "canned.sock")
        self.socket_url = f"unix:{self.socket_path}"

    def __enter__(self):
        read, write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(read)
            try:
                canned_upstream(write, self.socket_path)
            finally:
                os._exit(0)
        os.close(write)
        self.port = int(os.read(read, 32))
        os.close(read)
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc):
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


class BareRelay:
    """bench/bare_relay.py as a process, in the shims' place in the rounds."""

    metrics_port = None

    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self.proc, self.port = proc, port

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start_bare_relay(upstream_port: int, workdir: str) -> BareRelay:
    port_file = os.path.join(workdir, "bare-relay.port")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("bare_relay.py")),
                             str(upstream_port), port_file], start_new_session=True)
    deadline = time.monotonic() + 10
    while not os.path.exists(port_file):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("bench/bare_relay.py did not start")
        time.sleep(0.05)
    return BareRelay(proc, int(Path(port_file).read_text()))


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
    ap.add_argument("--workers", default="",
                    help="also shims with server.workers = each of these (e.g. 2 or 2,4)")
    ap.add_argument("--baseline", metavar="DIR", default="",
                    help="also a shim running the code of the checkout at DIR, side by side")
    ap.add_argument("--unix", action="store_true",
                    help="also both hops over unix sockets: a path straight to Rspamd's "
                         "socket, and a shim listening on one and scanning over Rspamd's")
    ap.add_argument("--floor", action="store_true",
                    help="also the bare relay (bench/bare_relay.py): the I/O alone")
    ap.add_argument("--upstream", choices=("rspamd", "canned"), default="rspamd",
                    help="what the shim scans with: the lab's Rspamd, or a canned responder")
    args = ap.parse_args()
    workers = [int(n) for n in args.workers.split(",") if n.strip()]
    if args.metrics:
        micro_metrics()
        if workers:
            micro_metrics_shared()

    payloads = [exim_request(i, args.paragraphs) for i in range(args.messages // args.rounds)]
    with tempfile.TemporaryDirectory(prefix="exim-policy-bench-") as workdir, \
            (CannedLab(workdir) if args.upstream == "canned" else Lab(workdir)) as lab:
        upstream = lab if args.upstream == "canned" else lab.rspamd
        shim = ShimLab(workdir, rspamd_url=upstream.url, log_level=args.log_level)
        shim.start()
        shims = {"shim": shim}
        if args.metrics:
            for name, log_format in (("shim+metrics", "text"), ("shim+metrics+json", "json")):
                shims[name] = ShimLab(os.path.join(workdir, name), rspamd_url=upstream.url,
                                      log_level=args.log_level, log_format=log_format,
                                      metrics={})
                shims[name].start()
        for n in workers:
            for name, metrics in ((f"workers={n}", None),
                                  *(((f"workers={n}+metrics", {}),) if args.metrics else ())):
                shims[name] = ShimLab(os.path.join(workdir, name), rspamd_url=upstream.url,
                                      log_level=args.log_level, metrics=metrics, workers=n)
                shims[name].start()
        if args.baseline:
            shims["baseline"] = ShimLab(os.path.join(workdir, "baseline"),
                                        rspamd_url=upstream.url, log_level=args.log_level,
                                        code=args.baseline)
            shims["baseline"].start()
        if args.unix:  # both hops over unix sockets: the client's and the shim's
            shims["shim unix"] = ShimLab(os.path.join(workdir, "unix"),
                                         rspamd_url=upstream.socket_url,
                                         log_level=args.log_level, unix_socket=True)
            shims["shim unix"].start()
        address = {name: str(lab_shim.socket_path) if name == "shim unix" else lab_shim.port
                   for name, lab_shim in shims.items()}
        address["direct"] = upstream.port
        if args.unix:
            address["direct unix"] = str(upstream.socket_path)
        relay = start_bare_relay(upstream.port, workdir) if args.floor else None
        if relay is not None:
            shims["bare relay"] = relay
            address["bare relay"] = relay.port
        idle = [socket.create_connection(("127.0.0.1", shim.port)) for _ in range(args.idle)]
        for sock in idle[::2]:
            sock.sendall(b"C")
        try:
            rspamd_pids = [lab.pid] if args.upstream == "canned" else \
                group_members(lab.rspamd.process.pid)  # master + workers
            results = {name: ([], 0.0, 0.0) for name in
                       ("direct", *(["direct unix"] if args.unix else []), *shims)}
            cpu = {name: [0.0, 0.0, 0.0] for name in shims}  # shim, its system part, Rspamd
            client = {name: 0.0 for name in results}  # this process, the load
            # warm-up every path (first scans after start are slower)
            for name in results:
                asyncio.run(run_round(address[name], payloads[:50], args.concurrency))
            names = list(results)
            for r in range(args.rounds):
                # each path in turn takes each place in a round: no path always follows
                # the same one
                for name in names[r % len(names):] + names[:r % len(names)]:
                    # the shim's process, or its supervisor and workers (its process group)
                    pids = group_members((shims[name] if name in shims else shim).proc.pid)
                    metered = name in shims and shims[name].metrics_port is not None
                    counted = messages_counted(shims[name].metrics_url) if metered else 0.0
                    c_shim, c_rspamd = cpu_seconds(pids), cpu_seconds(rspamd_pids)
                    c_sys = cpu_times(pids)[1]
                    c_client = sum(os.times()[:2])
                    elapsed, lat = asyncio.run(run_round(address[name], payloads,
                                                         args.concurrency))
                    if metered:  # (this scrape is in the round's CPU figure)
                        moved = messages_counted(shims[name].metrics_url) - counted
                        if moved != len(payloads):
                            raise SystemExit(f"metrics: {moved:g} messages counted, "
                                             f"{len(payloads)} sent")
                    client[name] += sum(os.times()[:2]) - c_client
                    d_shim = cpu_seconds(pids) - c_shim
                    d_rspamd = cpu_seconds(rspamd_pids) - c_rspamd
                    lats, total, _ = results[name]
                    results[name] = (lats + lat, total + elapsed, 0.0)
                    if name in shims:
                        cpu[name][0] += d_shim
                        cpu[name][1] += cpu_times(pids)[1] - c_sys
                        cpu[name][2] += d_rspamd
        finally:
            for sock in idle:
                sock.close()
            for one_shim in shims.values():
                one_shim.stop()

    print(f"messages per path: {len(payloads) * args.rounds}  concurrency: {args.concurrency}"
          f"  rounds: {args.rounds}  message: {len(payloads[0])} bytes  cores: {os.cpu_count()}"
          f"  idle connections to the shim: {args.idle}  upstream: {args.upstream}")
    rates = {}
    for name, (lats, total, _) in results.items():
        rates[name] = len(lats) / total
        print(f"  {name:18s} {rates[name]:7.1f} msg/s   p50 {pct(lats, 50):6.2f} ms"
              f"   p99 {pct(lats, 99):6.2f} ms")
    n = len(payloads) * args.rounds
    print(f"  throughput ratio shim/direct: {rates['shim'] / rates['direct']:.3f}")
    if args.unix:
        print(f"  throughput ratio shim/direct, both over unix sockets: "
              f"{rates['shim unix'] / rates['direct unix']:.3f}")
    print("  CPU per message of the client (this process): " + ", ".join(
        f"{name} {seconds / n * 1000:.3f} ms" for name, seconds in client.items()))
    for name, (shim_cpu, shim_sys, rspamd_cpu) in cpu.items():
        print(f"  CPU per message: {name} {shim_cpu / n * 1000:.3f} ms, Rspamd "
              f"{rspamd_cpu / n * 1000:.3f} ms -> shim/Rspamd "
              f"{shim_cpu / max(rspamd_cpu, 1e-9) * 100:.1f} %"
              f"  (shim: {(shim_cpu - shim_sys) / n * 1000:.3f} ms user +"
              f" {shim_sys / n * 1000:.3f} ms system)")
    for name, (shim_cpu, _, rspamd_cpu) in cpu.items():
        elapsed = results[name][1]
        machine = (shim_cpu + rspamd_cpu + client[name]) / elapsed / (os.cpu_count() or 1)
        print(f"  busy during its rounds: {name} {shim_cpu / elapsed * 100:.0f} % of a core, "
              f"with Rspamd and the client {machine * 100:.0f} % of the machine's "
              f"{os.cpu_count()} cores")
    plain = cpu["shim"][0] / n
    for name in ("shim+metrics", "shim+metrics+json"):
        if name in cpu:
            other = cpu[name][0] / n
            print(f"  {name} vs shim: {(other - plain) * 1e6:+.1f} µs CPU per message "
                  f"({(other / plain - 1) * 100:+.1f} %)")
    if "shim unix" in cpu:
        other = cpu["shim unix"][0] / n
        print(f"  shim unix vs shim (TCP): throughput x{rates['shim unix'] / rates['shim']:.3f},"
              f" {(other - plain) * 1e6:+.1f} µs CPU per message "
              f"({(other / plain - 1) * 100:+.1f} %)")
    if "baseline" in cpu:
        base = cpu["baseline"][0] / n
        print(f"  shim vs baseline ({args.baseline}): throughput "
              f"x{rates['shim'] / rates['baseline']:.3f}, {(plain - base) * 1e6:+.1f} µs CPU "
              f"per message ({(plain / base - 1) * 100:+.1f} %)")
    for count in workers:
        name = f"workers={count}"
        other = cpu[name][0] / n
        print(f"  {name} vs shim (workers=1): throughput x{rates[name] / rates['shim']:.3f}, "
              f"{(other - plain) * 1e6:+.1f} µs CPU per message "
              f"({(other / plain - 1) * 100:+.1f} %)")
        if f"{name}+metrics" in cpu:
            metered = cpu[f"{name}+metrics"][0] / n
            print(f"  {name}+metrics vs {name}: {(metered - other) * 1e6:+.1f} µs CPU per "
                  f"message ({(metered / other - 1) * 100:+.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
