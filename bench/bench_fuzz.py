"""Fuzz every codec: a seeded mutator over the golden corpus, a million cases per codec.

    .venv/bin/python bench/bench_fuzz.py [--cases 1000000] [--codecs rspamc,http,...]
                                         [--seed 1] [--procs 2]

Drives the same targets as the normal suite's bounded lane (tests/fuzz_targets.py, where
the properties are written down): each case is a seed from the codec's corpus with 0 to 8
mutations (byte flips, inserted CR/LF/NUL and protocol tokens, cuts, duplicated lines and
headers, huge numbers, splices of two seeds), split at 0 to 9 random points (sometimes
byte by byte). hypothesis costs milliseconds per case, this loop microseconds, so the
million cases run here. An input whose outcome (kind and error text, numbers blanked) was
not seen before joins the corpus: cheap feedback, not coverage guidance (atheris, the
coverage-guided fuzzer, is not a dependency of the project).

Each codec's cases are cut into ``--procs`` shares run by a process pool (each share has
its own seed; the cheapest codecs first, a line as each share ends), so the run stops by
itself after ``--cases`` per codec. Columns:

  cases      cases run
  cases/s    per process: cases / CPU-seconds of the processes that ran them
  corpus     seeds + inputs added for a new outcome (summed over the shares), and bytes
  outcomes   distinct outcomes seen
  failures   cases that broke a property or raised; distinct failures are listed below
             the table with a reproducer (codec, seed, case number, the input's repr)

Exit status 1 when anything failed. Nothing listens, nothing leaves the process: the
targets use in-memory transports and a temporary directory for the forwarding sources.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fuzz_targets as ft  # noqa: E402

#: inputs added to a share's corpus for new outcomes, at most (the seeds stay)
MAX_GROWN = 512
#: CPU-microseconds per case, roughly (a 2-core Debian 12 VM): the cheapest codecs run
#: first, so that a run cut short has whole codecs done
COST = {"helper": 40, "rspamc": 90, "spamc": 120, "http": 170, "sqlite": 210,
        "smtp_data": 290, "lsearch": 450, "quarantine": 1800}
#: cases in one share at most: a share reports when it ends, so a long run shows its
#: progress (and what it found) codec by codec
SHARE_CASES = 100_000
#: distinct failures kept per share (each with its first reproducer)
MAX_FAILURES = 20


@dataclass(frozen=True)
class Share:
    """One process's part of one codec's run."""

    codec: str
    cases: int
    seed: int


@dataclass(frozen=True)
class Failure:
    codec: str
    seed: int
    index: int
    error: str
    data: bytes
    cuts: tuple[int, ...]
    flags: int


@dataclass(frozen=True)
class ShareResult:
    codec: str
    cases: int
    cpu: float
    corpus: int
    corpus_bytes: int
    outcomes: frozenset[str]
    failed: int
    failures: tuple[Failure, ...] = field(default=())


def make_case(rng: random.Random, corpus: list[bytes], max_bytes: int) -> ft.Case:
    """A seed from ``corpus`` mutated, split and flagged with ``rng``'s numbers."""
    seed = corpus[rng.randrange(len(corpus))]
    n_ops = 0 if rng.random() < 0.05 else rng.choice((1, 1, 1, 2, 2, 3, 4, 8))
    ops = [(rng.randrange(ft.N_OPS), rng.getrandbits(20), rng.getrandbits(16),
            rng.getrandbits(16)) for _ in range(n_ops)]
    data = ft.mutate(seed, ops, corpus, max_bytes)
    if len(data) <= 512 and rng.random() < 0.05:
        cuts = tuple(range(1, len(data)))  # byte by byte
    else:
        cuts = tuple(rng.randrange(len(data) + 1) for _ in range(rng.choice((0, 0, 1, 2, 3, 5, 9))))
    return ft.Case(data, cuts, rng.getrandbits(32))


def _failure_key(exc: BaseException) -> str:
    """A failure without the numbers that vary from case to case."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return re.sub(r"[0-9]+", "#", text)[:160]


def run_share(share: Share) -> ShareResult:
    codec = ft.CODECS[share.codec]
    rng = random.Random(share.seed)
    corpus = list(codec.seeds())
    n_seeds = len(corpus)
    seen: set[str] = set()
    failures: dict[str, Failure] = {}
    failed = 0
    started = time.process_time()
    for index in range(share.cases):
        case = make_case(rng, corpus, codec.max_bytes)
        try:
            result = codec.target(case)
        except Exception as exc:  # the property says "never": every exception is a finding
            failed += 1
            key = _failure_key(exc)
            if key not in failures and len(failures) < MAX_FAILURES:
                failures[key] = Failure(share.codec, share.seed, index, key, case.data,
                                        case.cuts, case.flags)
            continue
        if result not in seen:
            seen.add(result)
            # (a short input joins sooner: the corpus should not drift to the longest cases)
            if len(corpus) - n_seeds < MAX_GROWN and len(case.data) <= codec.max_bytes // 2:
                corpus.append(case.data)
    return ShareResult(share.codec, share.cases, time.process_time() - started, len(corpus),
                       sum(map(len, corpus)), frozenset(seen), failed,
                       tuple(failures.values()))


def shares(codecs: list[str], cases: int, procs: int, seed: int) -> list[Share]:
    """Each codec's cases in shares of at most SHARE_CASES (at least ``procs`` of them:
    the processes share each codec), the cheapest codecs first."""
    order = sorted(codecs, key=lambda name: COST.get(name, 1000))
    parts = max(procs, -(-cases // SHARE_CASES))
    out = []
    for name in order:
        for part in range(parts):
            count = cases // parts + (1 if part < cases % parts else 0)
            if count:  # (a share's seed: the run's, the codec's name and the share's number)
                out.append(Share(name, count, seed * 1_000_003 + _stable(name) * 1009 + part))
    return out


def _stable(name: str) -> int:
    """A number for ``name`` that is the same in every run (hash() is salted)."""
    return int.from_bytes(name.encode()[:8].ljust(8, b"_"), "big") % 1_000_000


def report(results: list[ShareResult], codecs: list[str], wall: float) -> int:
    print(f"{'codec':<11} {'cases':>9} {'cases/s':>9} {'corpus':>7} {'bytes':>9} "
          f"{'outcomes':>8} {'failures':>8}")
    failures: dict[tuple[str, str], Failure] = {}
    total_failed = 0
    for name in codecs:
        mine = [r for r in results if r.codec == name]
        cases = sum(r.cases for r in mine)
        cpu = sum(r.cpu for r in mine)
        failed = sum(r.failed for r in mine)
        total_failed += failed
        outcomes = frozenset().union(*(r.outcomes for r in mine))
        print(f"{name:<11} {cases:>9} {cases / cpu if cpu else 0:>9.0f} "
              f"{sum(r.corpus for r in mine):>7} {sum(r.corpus_bytes for r in mine):>9} "
              f"{len(outcomes):>8} {failed:>8}")
        for r in mine:
            for f in r.failures:
                failures.setdefault((name, f.error), f)
    print(f"wall time {wall:.1f} s")
    for f in failures.values():
        print(f"\nFAILURE {f.codec}: {f.error}\n  reproduce: {_reproducer(f)}")
    return 1 if total_failed else 0


def _reproducer(f: Failure) -> str:
    return (f"Case(data={f.data[:2000]!r}{'...' if len(f.data) > 2000 else ''}, "
            f"cuts={f.cuts[:50]}, flags={f.flags})  (share seed {f.seed}, case {f.index}, "
            f"{len(f.data)} bytes)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1_000_000, help="cases per codec")
    parser.add_argument("--codecs", default=",".join(ft.CODECS),
                        help=f"comma-separated, of: {', '.join(ft.CODECS)}")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--procs", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    codecs = [c for c in args.codecs.split(",") if c]
    unknown = [c for c in codecs if c not in ft.CODECS]
    if unknown:
        parser.error(f"unknown codec(s): {', '.join(unknown)}")
    work = shares(codecs, args.cases, args.procs, args.seed)
    started = time.monotonic()
    results = []
    # fork: the workers inherit the imported targets (and the fuzz sandbox directory)
    with multiprocessing.get_context("fork").Pool(args.procs) as pool:
        for result in pool.imap_unordered(run_share, work, chunksize=1):
            results.append(result)  # a line per share as it ends: a long run shows progress
            print(f"  {result.codec}: {result.cases} cases in {result.cpu:.0f} CPU-s, corpus "
                  f"{result.corpus}, {result.failed} failed ({time.monotonic() - started:.0f} s)",
                  flush=True)
            for failure in result.failures:  # (also here: a run cut short keeps them)
                print(f"    {failure.error}: {_reproducer(failure)}", flush=True)
    print(f"bench_fuzz: {args.cases} cases per codec, seed {args.seed}, {args.procs} "
          f"process(es)")
    return report(results, codecs, time.monotonic() - started)


if __name__ == "__main__":
    sys.exit(main())
