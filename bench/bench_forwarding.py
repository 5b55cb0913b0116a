#!/usr/bin/env python3
"""Forwarding-map build benchmark: wall time and peak memory per alias-set shape and size.

    python bench/bench_forwarding.py                       # every shape at 100k, 300k, 1M
    python bench/bench_forwarding.py --shapes cycle,gen --sizes 1000000 --repeat 3
    python bench/bench_forwarding.py --sizes 50000,200000 --edges-per-alias 2

For each shape and size: generate a synthetic alias set with bench/forwarding_gen.py (not
timed; its docstring describes the shapes: ``gen``, ``cycle`` -- one random cycle through
all keys, with exits everywhere --, ``crlf``, ``sources`` -- four files -- and ``bare`` --
an /etc/aliases-style file), then run one ``build_map`` (parse + graph + closure + sorted
write of a new map) in a *fresh* Python process, ``--repeat`` times, so that its peak RSS
(``resource.getrusage().ru_maxrss``) belongs to that run alone.  Prints wall time, peak
RSS, microseconds per alias and the map size.  "child MB" is the largest peak RSS of the
build's worker processes (0 when none ran); the processes count the pages they share, so
"system MB" -- the largest drop of the machine's available memory during the build -- is
what they take together.  The per-alias time and memory should stay roughly flat as sizes
grow (linear scaling).  Target: 1,000,000 aliases / 2,000,000 targets in <= 5 s and
<= 500 MB on every shape.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHAPES = ("gen", "cycle", "crlf", "sources", "bare")

# Runs in the child process: one build, then its own measurements as JSON.
CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from exim_policy.config import load
from exim_policy.forwarding.build import build_map
config = load({config!r}).forwarding
started = time.perf_counter()
result = build_map(config)
seconds = time.perf_counter() - started
assert result.written
usage = resource.getrusage
print(json.dumps({{"seconds": seconds, "maxrss_kb": usage(resource.RUSAGE_SELF).ru_maxrss,
                   "child_maxrss_kb": usage(resource.RUSAGE_CHILDREN).ru_maxrss,
                   "entries": result.entries, "aliases": result.aliases, "targets": result.targets,
                   "map": result.map_path, "warnings": result.warning_count}}))
"""


class _MemoryWatch:
    """The largest drop of the system's available memory (``MemAvailable`` in
    /proc/meminfo) while the block runs, sampled every 20 ms: what the build's processes
    take together, shared pages counted once (on an otherwise idle machine)."""

    def __enter__(self) -> _MemoryWatch:
        self.base = self.low = _available_kb()
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.low = min(self.low, _available_kb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = self.base - self.low


def _available_kb() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


def make_config(shape: str, aliases: int, edges: int, seed: int, workdir: Path,
                timeout: float) -> tuple[Path, float]:
    """Generate the alias set (or use the one generated before in ``workdir``: the same
    arguments give the same files); returns its configuration and the size of its files."""
    alias_file = workdir / f"virtual-{shape}-{aliases}-{edges}-{seed}"
    listing = Path(f"{alias_file}.sources")
    if not listing.exists():
        out = subprocess.run([sys.executable, str(HERE / "forwarding_gen.py"), "--shape", shape,
                              "--aliases", str(aliases), "--edges", str(edges),
                              "--seed", str(seed), "--out", str(alias_file)],
                             check=True, timeout=timeout, capture_output=True, text=True)
        listing.write_text(out.stdout)
    sources = json.loads(listing.read_text())
    # the generator's 70 MB are still being written back to disk: let that finish first,
    # or the build competes with the kernel's writeback (an alias file is not written in
    # the same second it is read, in real life)
    os.sync()
    config = workdir / f"config-{shape}-{aliases}.toml"
    map_file = workdir / f"map-{shape}-{aliases}.txt"
    map_file.unlink(missing_ok=True)  # (each build writes a new map)
    text = f"""\
[forwarding]
local_domains_file = "{alias_file}.domains"
map = "{map_file}"
"""
    for source in sources:
        text += f"""
[[forwarding.sources]]
type = "lsearch"
path = "{source['path']}"
domain = "{source['domain']}"
"""
    config.write_text(text)
    return config, sum(Path(s["path"]).stat().st_size for s in sources) / 2**20


def run_build(config: Path, timeout: float) -> dict:
    """One build of a new map in a fresh process."""
    with _MemoryWatch() as watch:
        out = subprocess.run([sys.executable, "-c",
                              CHILD.format(root=str(ROOT), config=str(config))],
                             check=True, capture_output=True, text=True, timeout=timeout)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    data["system_mb"] = watch.peak_kb / 1024
    os.unlink(data["map"])  # (the next run writes a new one)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help="comma-separated alias-set shapes (default %(default)s)")
    parser.add_argument("--sizes", default="100000,300000,1000000",
                        help="comma-separated alias counts (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=1, help="builds per shape and size")
    parser.add_argument("--edges-per-alias", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="deadline per generator/build process, seconds")
    parser.add_argument("--keep", metavar="DIR", help="write the files here and keep them "
                        "(alias sets already there are used again)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if not set(shapes) <= set(SHAPES):
        parser.error(f"--shapes: one of {', '.join(SHAPES)}")
    tmp = None
    if args.keep:
        workdir = Path(args.keep)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-forwarding-")
        workdir = Path(tmp.name)
    print(f"{'shape':>7} {'aliases':>9} {'targets':>9} {'file MB':>8} {'wall s':>7} {'peak MB':>8} "
          f"{'child MB':>8} {'system MB':>9} {'us/alias':>9} {'KB/alias':>9} "
          f"{'map lines':>10}")
    try:
        for shape in shapes:
            for aliases in sizes:
                edges = int(aliases * args.edges_per_alias)
                config, file_mb = make_config(shape, aliases, edges, args.seed, workdir,
                                              args.timeout)
                for _ in range(args.repeat):
                    r = run_build(config, args.timeout)
                    print(f"{shape:>7} {aliases:>9} {edges:>9} {file_mb:>8.1f} "
                          f"{r['seconds']:>7.2f} {r['maxrss_kb'] / 1024:>8.0f} "
                          f"{r['child_maxrss_kb'] / 1024:>8.0f} {r['system_mb']:>9.0f} "
                          f"{r['seconds'] / aliases * 1e6:>9.2f} "
                          f"{r['maxrss_kb'] / aliases:>9.3f} {r['entries']:>10}", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
