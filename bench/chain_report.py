"""The chain bench's figures: per fault what the clients saw and how long recovery took,
latencies, and the samples (RSS, descriptors, tasks) as a CSV for bench/plot_soak.py."""
from __future__ import annotations

import csv
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from chain_account import Copy, Verdict
from chain_stack import FaultTimes
from chain_traffic import MessageLog, Txn, direction

DIRECTIONS = ("in", "fwd", "out")


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values``, nearest rank; 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


@dataclass
class TxnView:
    """A transaction with what the accounting learnt of it."""

    txn: Txn
    way: str
    scenario: str
    unscanned: bool = False
    #: seconds from its 250 to its last copy's arrival (None: not accepted, or no copy)
    delay: float | None = None

    @property
    def degraded(self) -> bool:
        """What a fault shows a client: a 4xx (not acl_rcpt.conf's split), a lost
        connection, or inbound mail let in unscanned."""
        t = self.txn
        return (t.temporary and not t.split) or self.unscanned


def views(logs: list[MessageLog], verdict: Verdict) -> list[TxnView]:
    copies_of: dict[int, list[Copy]] = {id(t): c for t, c in verdict.accepted}
    out = []
    for log in logs:
        for txn in log.txns:
            view = TxnView(txn, direction(log.planned, txn.rcpts), log.planned.scenario)
            copies = copies_of.get(id(txn))
            if copies:
                view.unscanned = any(c.unscanned for c in copies)
                view.delay = max(c.at for c in copies) - txn.end
            out.append(view)
    return sorted(out, key=lambda v: v.txn.start)


@dataclass
class FaultRow:
    fault: FaultTimes
    until: float
    seen: dict[str, Counter] = field(default_factory=dict)
    recovery: dict[str, float] = field(default_factory=dict)
    latency_ms: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: Exim's delivery delay (250 -> copy arrived) of mail accepted during the fault
    delivery: tuple[float, float] = (0.0, 0.0)
    #: the same for mail begun once the peer was back
    delivery_after: tuple[float, float] = (0.0, 0.0)
    #: seconds after the peer's return until mail accepted before it had arrived
    backlog: float = 0.0
    extra: list[str] = field(default_factory=list)


def fault_rows(faults: list[FaultTimes], txns: list[TxnView], end: float) -> list[FaultRow]:
    """A fault's window: the replies from its start to the next fault's start (a reply
    shows the chain's state when it was given; a transaction begun before the fault may
    be answered in it)."""
    rows = []
    for i, fault in enumerate(faults):
        until = faults[i + 1].start if i + 1 < len(faults) else end + 1.0
        inside = [v for v in txns if fault.start <= v.txn.end < until]
        rows.append(_fault_row(fault, until, inside))
    return rows


def _fault_row(fault: FaultTimes, until: float, inside: list[TxnView]) -> FaultRow:
    row = FaultRow(fault, until)
    for way in DIRECTIONS:
        mine = [v for v in inside if v.way == way]
        row.seen[way] = _what_clients_saw(mine)
        # recovery: the last degraded reply to a transaction begun once the peer was back
        after = [v.txn.end - fault.back for v in mine if v.degraded and v.txn.start >= fault.back]
        row.recovery[way] = max(after) if after else 0.0
    lat = [(v.txn.end - v.txn.start) * 1000 for v in inside if not v.txn.split]
    row.latency_ms = (pct(lat, 50), pct(lat, 99), max(lat) if lat else 0.0)
    during = [v for v in inside if v.delay is not None and v.txn.end < fault.back]
    delays = [v.delay for v in during]
    row.delivery = (pct(delays, 50), max(delays) if delays else 0.0)
    # mail Exim accepted while the peer was away and queued (the receiver): when the
    # last of it arrived, counted from the peer's return
    row.backlog = max((v.txn.end + v.delay - fault.back for v in during), default=0.0)
    later = [v.delay for v in inside if v.delay is not None and v.txn.start >= fault.back]
    row.delivery_after = (pct(later, 50), max(later) if later else 0.0)
    return row


def _what_clients_saw(mine: list[TxnView]) -> Counter:
    seen: Counter = Counter()
    for v in mine:
        t = v.txn
        if t.split:
            continue
        if t.accepted:
            seen["250 unscanned" if v.unscanned else "250"] += 1
        elif t.code == 0:
            seen["lost connection"] += 1
        else:
            seen[f"{t.code // 100}xx {t.stage}"] += 1
    return seen


def baseline(txns: list[TxnView], faults: list[FaultTimes]) -> Counter:
    """Degraded transactions before the first fault: should be none."""
    first = faults[0].start if faults else float("inf")
    return Counter(v.way for v in txns if v.txn.end < first and v.degraded)


def latency_summary(txns: Iterable[TxnView]) -> tuple[float, float, float]:
    lat = [(v.txn.end - v.txn.start) * 1000 for v in txns if not v.txn.split]
    return pct(lat, 50), pct(lat, 99), max(lat) if lat else 0.0


# ------------------------------------------------------------------------- samples --
SAMPLE_FIELDS = ("t", "shim_rss_kb", "shim_fds", "shim_tasks", "shim_procs", "rspamd_rss_kb",
                 "queue", "txns", "degraded", "p50_ms", "p99_ms", "rate", "load1")


def write_samples(path: Path, samples: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, SAMPLE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(samples)


def write_txns(path: Path, txns: list[TxnView], t0: float) -> None:
    """Every transaction (for a closer look at a fault afterwards)."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(("start_s", "end_s", "message", "attempt", "scenario", "direction",
                         "stage", "code", "queue_id", "split", "unscanned", "delay_s", "text"))
        for v in txns:
            t = v.txn
            writer.writerow((f"{t.start - t0:.3f}", f"{t.end - t0:.3f}", t.n, t.attempt,
                             v.scenario, v.way, t.stage, t.code, t.queue_id or "",
                             int(t.split), int(v.unscanned),
                             "" if v.delay is None else f"{v.delay:.3f}", t.text[:120]))


def sample_summary(samples: list[dict], skip: float = 0.0) -> dict[str, object]:
    """Start/end/min/max of the resource figures, after the first ``skip`` seconds."""
    rows = [s for s in samples if s["t"] >= skip] or samples
    if not rows:
        return {}
    out: dict[str, object] = {}
    for key in ("shim_rss_kb", "shim_fds", "shim_tasks", "rspamd_rss_kb", "queue"):
        values = [s[key] for s in rows]
        out[key] = (values[0], values[-1], min(values), max(values))
    p50 = [s["p50_ms"] for s in rows if s["txns"]]
    p99 = [s["p99_ms"] for s in rows if s["txns"]]
    if p50:
        third = max(1, len(p50) // 3)
        out["p50_ms thirds"] = tuple(round(statistics.median(p50[i:i + third]), 1)
                                     for i in range(0, third * 3, third))
        out["p99_ms thirds"] = tuple(round(statistics.median(p99[i:i + third]), 1)
                                     for i in range(0, third * 3, third))
    return out
