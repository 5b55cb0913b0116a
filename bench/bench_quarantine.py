"""Memory and speed of the quarantine receiver: large messages into ``exim-policy serve``.

Starts the daemon with its receiver on loopback (no Rspamd needed: nothing is scanned),
sends N messages of SIZE bytes at once over SMTP (smtplib, one thread each) and reports
the daemon's peak RSS (VmHWM) over its warm baseline, as a ratio to the bytes sent, and
the time to fsync'd 250. The receiver streams DATA to disk, so the ratio should be far
below 1; aiosmtpd's own DATA handling would hold 3-4 times the message.

    .venv/bin/python bench/bench_quarantine.py [--size 20M] [--concurrent 1 3]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import smtplib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exim_policy.lab.ports import LOOPBACK, free_port  # noqa: E402
from exim_policy.lab.shim import ShimLab  # noqa: E402


def message(size: int, tag: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    body = line * (size // len(line))
    return (f"From: a@lab.test\r\nTo: b@example.com\r\nSubject: big {tag}\r\n"
            f"Message-ID: <big{tag}.{time.time()}@lab.test>\r\n\r\n").encode() + body


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def deliver(port: int, data: bytes) -> float:
    started = time.monotonic()
    with smtplib.SMTP(LOOPBACK, port, timeout=300) as smtp:
        smtp.sendmail("a@lab.test", ["b@example.com"], data)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="20M", help="message size (K/M suffix)")
    parser.add_argument("--concurrent", type=int, nargs="+", default=[1, 3])
    args = parser.parse_args()
    units = {"K": 1024, "M": 1024 * 1024}
    size = int(args.size[:-1]) * units[args.size[-1]] if args.size[-1] in units \
        else int(args.size)
    with tempfile.TemporaryDirectory() as work:
        shim = ShimLab(work, rspamd_url=f"http://{LOOPBACK}:{free_port()}",
                       quarantine={}, log_level="warning")
        shim.start()
        try:
            pid = shim.proc.pid
            deliver(shim.quarantine_port, message(64 * 1024, 0))  # warm up
            print(f"{'messages':>8} {'size':>8} {'sent MB':>8} {'peak +MB':>9} {'ratio':>6} "
                  f"{'s each':>7} {'MB/s':>6}")
            for n in args.concurrent:
                baseline = status_kb(pid, "VmHWM")
                payloads = [message(size, i + 1) for i in range(n)]
                started = time.monotonic()
                with concurrent.futures.ThreadPoolExecutor(n) as pool:
                    times = list(pool.map(lambda d: deliver(shim.quarantine_port, d), payloads))
                wall = time.monotonic() - started
                peak = (status_kb(pid, "VmHWM") - baseline) / 1024
                sent = n * size / (1024 * 1024)
                print(f"{n:>8} {args.size:>8} {sent:>8.0f} {peak:>9.1f} {peak / sent:>6.2f} "
                      f"{sum(times) / n:>7.2f} {sent / wall:>6.0f}")
                del payloads
            held = len(os.listdir(shim.quarantine_path / "messages"))
            print(f"held: {held} messages in {shim.quarantine_path}")
        finally:
            shim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
