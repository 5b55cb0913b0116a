"""The shim's own Python work per message, without sockets: parse the bench's Exim request
(bench_shim.exim_request, 3 KB ham), its envelope, the scan (Rspamd 3.4's real /checkv2
reply for that message, bench/captures/, parsed as the scanner parses it), decide, the
RSPAMC reply, the decision log line (written by the daemon's log writer to /dev/null).
CPU per message of the whole process (its log writer thread too), for this checkout and
for each ``--baseline`` checkout, alternating, ``--runs`` times each, each in a fresh
process. Where the time of bench_shim.py's end-to-end figures goes that is not I/O.

    .venv/bin/python bench/bench_pipeline.py [--messages 20000] [--runs 4] [--baseline DIR]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPLY = HERE / "captures" / "rspamd-3.4-checkv2-ham.http"

# Runs in a fresh process with the checkout's directory first on sys.path.
CHILD = r'''
import asyncio, os, sys, time
tree, reply_path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path[:0] = [tree, os.path.join(tree, "bench")]
import bench_shim
from exim_policy.config import from_dict
from exim_policy.logs import start_logging
from exim_policy.pipeline import PolicyService
from exim_policy.protocol import rspamc
from exim_policy.protocol.parser import RequestParser
from exim_policy.scanner.rspamd import parse_reply, request_head
import exim_policy
assert exim_policy.__file__.startswith(tree), exim_policy.__file__
os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # (the log lines)
config = from_dict({})
writer = start_logging(config.logging)
reply = open(reply_path, "rb").read()
payload = bench_shim.exim_request(1)

class Scanner:
    async def scan(self, message, envelope, traffic=None):
        request_head(len(message), envelope, host="127.0.0.1:11333", path="/checkv2")
        return parse_reply(reply)

service = PolicyService(config, Scanner(), lambda rcpt: False, None)

async def run(count):
    for _ in range(count):
        parser = RequestParser(max_header_bytes=65536, max_body_bytes=10_000_000,
                               reserve=lambda amount: True)
        parser.feed(payload)
        await service.answer(rspamc.CODEC, parser.next_event())

loop = asyncio.new_event_loop()
loop.run_until_complete(run(2000))  # (warm-up)
started = time.process_time()
loop.run_until_complete(run(n))
writer.stop()
print((time.process_time() - started) / n)
'''


def one_run(tree: Path, messages: int) -> float:
    done = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(REPLY), str(messages)],
                          capture_output=True, text=True, cwd=tree, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--baseline", action="append", default=[], metavar="DIR",
                    help="another checkout (git worktree add DIR COMMIT); may repeat")
    args = ap.parse_args()
    trees = {"this checkout": HERE.parent, **{str(d): Path(d).resolve() for d in args.baseline}}
    seconds: dict[str, list[float]] = {name: [] for name in trees}
    for _ in range(args.runs):
        for name, tree in trees.items():
            seconds[name].append(one_run(tree, args.messages))
    print(f"Python work per message, {args.messages} messages, {args.runs} runs each "
          "(alternating), µs of CPU: median (min-max)")
    mine = statistics.median(seconds["this checkout"])
    for name, values in seconds.items():
        median = statistics.median(values)
        versus = "" if name == "this checkout" else \
            f"   this checkout: {(mine - median) * 1e6:+.0f} µs"
        print(f"  {name:30s} {median * 1e6:6.0f} ({min(values) * 1e6:.0f}-"
              f"{max(values) * 1e6:.0f}){versus}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
