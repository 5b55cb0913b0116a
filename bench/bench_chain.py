"""The whole chain under load and faults: real Exim -> shim -> real Rspamd (+ Redis for
the accounts, the quarantine receiver) -> SMTP sink, every message accounted for.

N messages (``--messages``) at C concurrent SMTP clients (``--clients``, one connection
per message), a mix of inbound ham and spam to mailboxes, to a forwarder and to mixed
recipient sets, authenticated outbound ham and spam, relay-host (::1) ham and spam
(bench/chain_traffic.py). While they run, the faults of ``--faults`` happen in turn, each
once the clients have settled its share of the messages (fault i of F at (i+1)/(F+1)):

    rspamd-kill       all Rspamd processes SIGKILLed, started again after --down s
    rspamd-stop       all Rspamd processes SIGSTOPped --stall s (15), then SIGCONT
    shim-hup          the shim SIGHUPed --hups times (10), --hup-interval s apart
    shim-restart      the shim SIGTERMed (it finishes what it has), started after --down s
    redis-restart     Redis (the account store) stopped, started after --down s
    receiver-restart  the quarantine receiver stopped, started after --down s

Clients retry a 4xx (bounded back-off); Exim's queue is run (``exim -qff``) every
``--queue-interval`` s (0: never, Exim's retry times alone, as a production queue runner
would honour them) and drained at the end. Then every message is looked up by its
Message-ID in the Maildirs, the sink and the quarantine (bench/chain_account.py): lost,
duplicated, wrong outcome. Per fault: what the clients saw per direction (in = inbound to
mailboxes, fwd = inbound with a forwarding recipient, out = authenticated or relay host),
the recovery time after the peer was back (the last degraded transaction that began after
it), latencies and Exim's delivery delay; for Redis, when the shim wrote to it again.

``--soak S``: S seconds at a steady ``--rate`` (messages/s), no faults unless
``--faults`` names some; the shim's RSS, descriptors and tasks and the latency are
sampled every ``--sample-interval`` s into ``--out``/samples.csv and plotted
(bench/plot_soak.py) into ``--out``/soak.png.

Everything listens on loopback; every process started here is stopped here (also on
SIGTERM/SIGINT). Run as root (Exim -C, Rspamd as _rspamd, Redis as redis):

    .venv/bin/python bench/bench_chain.py --messages 1000 --down 2
    .venv/bin/python bench/bench_chain.py --messages 100000
    nohup .venv/bin/python bench/bench_chain.py --soak 3600 --rate 15 --out /tmp/soak &
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from chain_account import (account, maildir_copies, quarantine_copies,  # noqa: E402
                           sink_copies)
from chain_report import (SAMPLE_FIELDS, baseline, fault_rows, latency_summary,  # noqa: E402
                          pct, sample_summary, views, write_samples, write_txns)
from chain_stack import LOCAL_USERS, ChainStack, FaultTimes, process_stats  # noqa: E402
from chain_traffic import Clients, make_plan  # noqa: E402

FAULTS = ("rspamd-kill", "rspamd-stop", "shim-hup", "shim-restart", "redis-restart",
          "receiver-restart")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=1000)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--faults", default=",".join(FAULTS),
                   help="comma list of " + ", ".join(FAULTS) + ', or "none"')
    p.add_argument("--down", type=float, default=5.0, help="seconds a stopped peer stays down")
    p.add_argument("--stall", type=float, default=15.0, help="seconds of SIGSTOP")
    p.add_argument("--hups", type=int, default=10)
    p.add_argument("--hup-interval", type=float, default=0.5)
    p.add_argument("--settle", type=float, default=10.0,
                   help="at least this long between a peer's return and the next fault")
    p.add_argument("--soak", type=float, default=0.0, metavar="SECONDS")
    p.add_argument("--rate", type=float, default=15.0, help="messages/s in --soak")
    p.add_argument("--sample-interval", type=float, default=0.0,
                   help="seconds between samples (default 5, 10 with --soak)")
    p.add_argument("--queue-interval", type=float, default=10.0,
                   help="seconds between forced queue runs (exim -qff); 0: none until the "
                        "final drain")
    p.add_argument("--drain-timeout", type=float, default=600.0)
    p.add_argument("--max-attempts", type=int, default=60)
    p.add_argument("--retry-max", type=float, default=8.0)
    p.add_argument("--failure-inbound", choices=("accept", "tempfail"), default="accept",
                   help="the shim's failure.inbound (the product's default: accept)")
    p.add_argument("--shim-workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", help="default: a new temp dir, removed afterwards")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--out", help="write samples.csv, txns.csv, report.txt (and soak.png) here")
    args = p.parse_args(argv)
    args.faults = [] if args.faults in ("", "none") else args.faults.split(",")
    unknown = [f for f in args.faults if f not in FAULTS]
    if unknown:
        p.error(f"unknown fault(s): {', '.join(unknown)}")
    if args.soak:
        args.messages = int(args.soak * args.rate)
        if "--faults" not in " ".join(argv or sys.argv):
            args.faults = []
    args.sample_interval = args.sample_interval or (10.0 if args.soak else 5.0)
    return args


class Report:
    """Prints and keeps the lines (for report.txt)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


# ---------------------------------------------------------------------- background --
class Every(threading.Thread):
    """Call ``fn`` every ``interval`` s until stopped (an error is printed, not fatal)."""

    def __init__(self, interval: float, fn, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.interval, self.fn = interval, fn
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            try:
                self.fn()
            except Exception as exc:  # a sample or a queue run that failed once
                print(f"{self.name}: {exc}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        self.halt.set()
        self.join(600)


class Sampler:
    """The shim's (and Rspamd's) resources, Exim's queue and the clients' latency."""

    def __init__(self, stack: ChainStack, clients: Clients, t0: float,
                 out: Path | None = None) -> None:
        self.stack, self.clients, self.t0 = stack, clients, t0
        self.samples: list[dict] = []
        #: samples.csv, rewritten at every sample: a long soak can be plotted while it runs
        self.out = out / "samples.csv" if out else None
        self._seen = 0
        self._last = t0

    def __call__(self) -> None:
        now = time.time()
        done = self.clients.completed[self._seen:]
        self._seen += len(done)
        lat = [(t.end - t.start) * 1000 for t in done if not t.split]
        shim = process_stats(self.stack.shim_pids())
        sample = {"t": round(now - self.t0, 1), "shim_rss_kb": shim["rss_kb"],
                  "shim_fds": shim["fds"], "shim_tasks": shim["tasks"],
                  "shim_procs": shim["procs"],
                  "rspamd_rss_kb": process_stats(self.stack.rspamd_pids())["rss_kb"],
                  "queue": self.stack.queue_count(), "txns": len(lat),
                  "degraded": sum(1 for t in done if t.temporary and not t.split),
                  "p50_ms": round(pct(lat, 50), 1), "p99_ms": round(pct(lat, 99), 1),
                  "rate": round(sum(1 for t in done if t.accepted) / (now - self._last), 2),
                  # other work on the same cores (the latency's other cause)
                  "load1": os.getloadavg()[0]}
        self._last = now
        self.samples.append(sample)
        if self.out is not None:
            write_samples(self.out, self.samples)


# -------------------------------------------------------------------------- faults --
def run_faults(args, stack: ChainStack, clients: Clients, say) -> list[FaultTimes]:
    """Each fault once its share of the messages is settled and the last one settled."""
    done: list[FaultTimes] = []
    total = len(clients.logs)
    for i, name in enumerate(args.faults):
        due = total * (i + 1) // (len(args.faults) + 1)
        while clients.settled() < due:
            time.sleep(0.1)
        if done:
            time.sleep(max(0.0, done[-1].back + args.settle - time.time()))
        if clients.settled() >= total:
            say(f"  {name}: skipped, every message was already settled")
            continue
        say(f"  fault {name} at {clients.settled()} settled messages")
        times = stack.fault(name, down=args.down, hups=args.hups,
                            hup_interval=args.hup_interval, stall=args.stall)
        if name == "redis-restart":
            times.notes.append(redis_recovery(stack, times.back))
        say(f"    back after {times.back - times.start:.2f} s; " + "; ".join(times.notes))
        done.append(times)
    return done


def redis_recovery(stack: ChainStack, back: float, timeout: float = 30.0) -> str:
    """When the shim wrote an account record to Redis again after it was back (the
    ``Paccounts`` index's newest activity moves on with every recorded message)."""
    import redis

    assert stack.redis is not None
    client = redis.Redis(host="127.0.0.1", port=stack.redis.port, socket_timeout=2)
    key = f"{stack.redis_prefix}accounts"
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            newest = client.zrevrange(key, 0, 0, withscores=True)
            if newest and newest[0][1] >= back:
                return f"first account record after it was back: +{time.time() - back:.2f} s"
            time.sleep(0.05)
        return f"no account record within {timeout:.0f} s after it was back"
    finally:
        client.close()


# ------------------------------------------------------------------------- the run --
def drain(stack: ChainStack, timeout: float, say) -> int:
    """Run the queue until it is empty (deferred deliveries: the receiver was down)."""
    deadline = time.monotonic() + timeout
    left = stack.queue_count()
    while left and time.monotonic() < deadline:
        stack.queue_run()
        time.sleep(1.0)
        left = stack.queue_count()
    say(f"Exim's queue after draining: {left} message(s)")
    if left:
        say(stack.exim.queue_list()[:3000] if stack.exim else "")
    return left


def warm_up(stack: ChainStack, say) -> None:
    """A few messages of every kind first (their Message-IDs are of no plan): the first
    scans after a start are slower, and the accounts' first records create their keys."""
    say("warming up")
    warm = Clients(make_plan(40, "warm", seed=99), stack.exim.port, threads=8,
                   max_attempts=3)
    warm.start()
    warm.wait(120)
    warm.stop()


def run(args, say) -> int:
    run_id = uuid.uuid4().hex[:8]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="chain-bench-"))
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    failure = {"inbound": args.failure_inbound} if args.failure_inbound != "accept" else {}
    stack = ChainStack(workdir, shim_workers=args.shim_workers, failure=failure,
                       redis_prefix=f"chain-{run_id}:")
    threads: list[Every] = []
    try:
        stack.start(lambda s: say(f"  {s}"))
        warm_up(stack, say)
        plan = make_plan(args.messages, run_id, args.seed)
        clients = Clients(plan, stack.exim.port, threads=args.clients,
                          rate=args.rate if args.soak else 0.0,
                          retry_max=args.retry_max, max_attempts=args.max_attempts)
        t0 = time.time()
        sampler = Sampler(stack, clients, t0, out)
        threads = [Every(args.sample_interval, sampler, "sampler")]
        if args.queue_interval > 0:  # 0: Exim's own retry times alone, as in production
            threads.append(Every(args.queue_interval, stack.queue_run, "queue-runner"))
        for thread in threads:
            thread.start()
        mode = f"soak {args.soak:.0f} s at {args.rate:g}/s" if args.soak else "as fast as it goes"
        say(f"sending {len(plan)} messages with {args.clients} clients ({mode}); faults: "
            f"{', '.join(args.faults) or 'none'}")
        clients.start()
        faults = run_faults(args, stack, clients, say)
        clients.wait()
        clients.stop()
        end = clients.finished
        say(f"all messages settled after {end - t0:.1f} s")
        for thread in threads:
            thread.stop()
        threads = []
        sampler()  # one more sample after the load
        left = drain(stack, args.drain_timeout, say)
        copies = [*maildir_copies(stack.exim.mail_dir, LOCAL_USERS),
                  *sink_copies(stack.sink.directory)]
        held, merges = quarantine_copies(stack.holder.quarantine_path)
        verdict = account(clients.logs, copies + held, LOCAL_USERS, merges)
        txns = views(clients.logs, verdict)
        report(args, say, clients, verdict, txns, faults, sampler.samples, t0, end, left)
        if out:
            write_samples(out / "samples.csv", sampler.samples)
            write_txns(out / "txns.csv", txns, t0)
            if args.soak:
                plot(out)
        return 0 if verdict.clean and not left else 1
    finally:
        for thread in threads:
            thread.stop()
        errors = stack.stop()
        if errors:
            say("stopping: " + "; ".join(errors))
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"work dir kept: {workdir}")


def plot(out: Path) -> None:
    from plot_soak import plot_samples

    plot_samples(out / "samples.csv", out / "soak.png")


# -------------------------------------------------------------------------- report --
def report(args, say, clients: Clients, verdict, txns, faults, samples, t0, end,
           left) -> None:
    n = len(clients.logs)
    accepted = sum(1 for v in txns if v.txn.accepted)
    attempts = sum(log.attempts for log in clients.logs)
    say()
    say(f"messages: {n}  clients: {args.clients}  time: {end - t0:.1f} s  throughput: "
        f"{n / (end - t0):.1f} messages/s settled, {accepted / (end - t0):.1f} accepted "
        f"transactions/s  ({attempts} connections, {os.cpu_count()} cores)")
    p50, p99, worst = latency_summary(txns)
    say(f"latency per connection (connect .. last reply): p50 {p50:.0f} ms  p99 {p99:.0f} ms"
        f"  max {worst:.0f} ms")
    say()
    say("outcome per message            planned      seen")
    for outcome in sorted(set(verdict.planned) | set(verdict.seen)):
        say(f"  {outcome:28s} {verdict.planned.get(outcome, 0):8d}  "
            f"{verdict.seen.get(outcome, 0):8d}")
    say(f"per recipient: {dict(sorted(verdict.recipients.items()))}")
    say(f"deferred (4xx or lost connection), then accepted on retry: "
        f"{verdict.retried_then_accepted} messages; then refused: "
        f"{verdict.retried_then_refused}")
    say(f"acl_rcpt.conf splits (RCPT 451 4.5.3, sent apart at once): "
        f"{verdict.split_transactions}")
    say(f"accepted unscanned (failure.inbound = {args.failure_inbound}), per direction: "
        f"{dict(verdict.unscanned_accepted)}")
    say(f"copies found: {verdict.copies}; lost: {len(verdict.lost)}; duplicated: "
        f"{len(verdict.duplicated)}; wrong outcome: {len(verdict.wrong)}; given up by the "
        f"client: {len(verdict.gave_up)}; bounces: {verdict.bounces}; quarantine merges: "
        f"{verdict.quarantine_merges}; still queued: {left}")
    for title, items in (("lost", verdict.lost), ("duplicated", verdict.duplicated),
                         ("wrong", verdict.wrong), ("given up", verdict.gave_up)):
        for item in items[:10]:
            say(f"  {title}: {item}")
    base = baseline(txns, faults)
    say(f"degraded transactions before the first fault: {dict(base) or 'none'}")
    report_faults(say, faults, txns, end, t0)
    report_samples(say, samples, args)


def report_faults(say, faults, txns, end, t0) -> None:
    if not faults:
        return
    say()
    say("fault              at s  back s  direction: what the clients saw          "
        "recovery s")
    for row in fault_rows(faults, txns, end):
        f = row.fault
        first = True
        for way, seen in row.seen.items():
            text = ", ".join(f"{k} {v}" for k, v in sorted(seen.items())) or "-"
            head = (f"{f.name:17s} {f.start - t0:6.1f} {f.back - f.start:7.2f}" if first
                    else " " * 32)
            say(f"{head}  {way:4s} {text:42s} {row.recovery[way]:6.2f}")
            first = False
        say(f"{'':32s}  latency p50/p99/max {row.latency_ms[0]:.0f}/{row.latency_ms[1]:.0f}/"
            f"{row.latency_ms[2]:.0f} ms")
        say(f"{'':32s}  Exim's delivery delay (250 -> copy there), accepted while it was "
            f"away: p50 {row.delivery[0]:.2f} s, max {row.delivery[1]:.2f} s, the last there "
            f"{row.backlog:+.2f} s after it was back; begun after: p50 "
            f"{row.delivery_after[0]:.2f} s, max {row.delivery_after[1]:.2f} s")
        for note in f.notes:
            say(f"{'':32s}  {note}")


def report_samples(say, samples, args) -> None:
    if not samples:
        return
    say()
    skip = 300.0 if args.soak >= 1200 else 0.0
    for label, cut in (("whole run", 0.0), (f"after the first {skip:.0f} s", skip)):
        if label != "whole run" and not skip:
            continue
        summary = sample_summary(samples, cut)
        say(f"resources, {label} (first, last, min, max):")
        for key, value in summary.items():
            say(f"  {key:16s} {value}")
    rss = [s["shim_rss_kb"] for s in samples if s["t"] >= skip]
    if rss and rss[0]:
        say(f"shim RSS growth: {(rss[-1] - rss[0]) / rss[0] * 100:+.1f} % "
            f"({rss[0]} -> {rss[-1]} kB)")
    say(f"samples: {len(samples)} every {args.sample_interval:g} s ({', '.join(SAMPLE_FIELDS)})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_chain.py: run as root (Exim -C, Rspamd, Redis)", file=sys.stderr)
        return 2
    # SIGTERM (and SIGHUP without nohup) must unwind through run()'s clean-up
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    say = Report()
    try:
        return run(args, say)
    finally:
        if args.out:
            (Path(args.out) / "report.txt").write_text("\n".join(say.lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
