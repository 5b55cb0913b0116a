"""Memory of the shim with large messages in flight: peak RSS against the bytes it holds.

Starts the lab's real Rspamd and the shim (``exim-policy serve``), warms the shim up with a
small scan, then sends N messages of S MB at once, each the exact ``CHECK RSPAMC/1.3``
request Exim sends (mbox-wrapped body) in Exim's 8 KiB writes. Reports the shim's peak RSS
(VmHWM) over its warm baseline, divided by the message bytes it could hold at once (all N,
or what ``--budget`` lets in). The aim is a growth of at most 1.5 x the bytes in flight.

Run as root (Rspamd runs as _rspamd):
    .venv/bin/python bench/bench_memory.py [--messages 5] [--size-mb 20] [--budget-mb 256]
"""
from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exim_policy.lab import Lab  # noqa: E402
from exim_policy.lab.shim import ShimLab  # noqa: E402
from exim_policy.protocol.mbox import exim_mbox_wrap  # noqa: E402

EXIM_CHUNK = 8192
MB = 1024 * 1024


def message(size: int, tag: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog, again and again, line %08d.\n"
    head = (f"From: alice@example.org\nTo: bob@lab.test\nSubject: big {tag}\n"
            f"Message-ID: <bench-big-{tag}@example.org>\n\n").encode()
    return head + b"".join(line % i for i in range(size // len(line % 0)))


def request(size: int, tag: int) -> bytes:
    body = exim_mbox_wrap(message(size, tag), sender="alice@example.org",
                          recipients=["bob@lab.test"])
    return (f"CHECK RSPAMC/1.3\r\nContent-length: {len(body)}\r\nQueue-Id: 1big-{tag:06d}-00\r\n"
            "From: <alice@example.org>\r\nRecipient-Number: 1\r\nRcpt: <bob@lab.test>\r\n"
            "Helo: client.test\r\nIP: 127.0.0.1\r\n\r\n").encode() + body


def send(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=300) as sock:
        for i in range(0, len(payload), EXIM_CHUNK):
            sock.sendall(payload[i:i + EXIM_CHUNK])
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=5, help="sent at once")
    ap.add_argument("--size-mb", type=float, default=20.0)
    ap.add_argument("--budget-mb", type=float, default=256.0,
                    help="server.max_bytes_in_flight of the shim")
    args = ap.parse_args()
    size = int(args.size_mb * MB)
    budget = int(args.budget_mb * MB)
    payloads = [request(size, i) for i in range(args.messages)]
    body_bytes = len(payloads[0]) - payloads[0].index(b"\r\n\r\n") - 4

    with tempfile.TemporaryDirectory(prefix="exim-policy-bench-") as workdir, \
            Lab(workdir) as lab:
        server = {"max_bytes_in_flight": budget, "queue_timeout": 300.0,
                  "max_message_size": max(body_bytes, 1 * MB)}
        shim = ShimLab(workdir, rspamd_url=lab.rspamd.url, rspamd_timeout=120.0, server=server)
        shim.start()
        try:
            pid = shim.proc.pid
            send(shim.port, request(4096, 999))  # warm: imports, first connection to Rspamd
            baseline = status_kb(pid, "VmHWM")
            replies: list[bytes] = [b""] * len(payloads)
            started = time.perf_counter()
            threads = [threading.Thread(target=lambda i=i: replies.__setitem__(
                i, send(shim.port, payloads[i]))) for i in range(len(payloads))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - started
            peak = status_kb(pid, "VmHWM")
            after = status_kb(pid, "VmRSS")
        finally:
            shim.stop()

    ok = sum(1 for r in replies if r.startswith(b"RSPAMD/1.3 0 EX_OK"))
    in_flight = min(args.messages, budget // body_bytes) * body_bytes
    grown = (peak - baseline) / 1024
    print(f"messages: {args.messages} x {body_bytes / MB:.1f} MB at once, answered {ok}/"
          f"{args.messages} in {elapsed:.1f} s; budget {budget / MB:.0f} MB "
          f"(holds {in_flight / body_bytes:.0f} at a time)")
    print(f"  shim RSS: baseline {baseline / 1024:.1f} MB, peak {peak / 1024:.1f} MB "
          f"(+{grown:.1f} MB), after {after / 1024:.1f} MB")
    print(f"  peak growth / bytes in flight: {grown * MB / in_flight:.2f}  (aim <= 1.5)")
    return 0 if ok == args.messages else 1


if __name__ == "__main__":
    sys.exit(main())
