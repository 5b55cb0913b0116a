"""Hostile clients against the running daemon, while legitimate scans go on.

Starts the lab's Rspamd (with its loopback NXDOMAIN DNS) and ``exim-policy serve`` with
every listener on free loopback ports: the spamd listener (Exim's ``CHECK RSPAMC/1.3`` and
``REPORT SPAMC/1.2``), the HTTP front (``/checkv2``), the query helper, the metrics
endpoint and the quarantine receiver (SMTP). The limits are the production defaults
(``server.max_connections`` 1024 per worker, ``read_timeout`` 30 s, ``request_timeout``
110 s, ``max_bytes_in_flight`` 256 MiB, ``max_message_size`` 50 MiB; the query helper's
5 s, the metrics listener's 16 connections, the quarantine's 200 sessions). For each
``--workers`` setting (one daemon each): a quiet baseline, then every attack against every
listener it applies to, ``--duration`` seconds each, one after the other:

  slowloris    1,000 connections, each sending one byte of a valid request a second
               (a connection the daemon closes is opened again)
  idle         10,000 connections opened as fast as the daemon accepts them (at most 30 s),
               then held silent for --duration
  absurd       framing to refuse at once: 20- and 40-digit, negative, hex, repeated and
               over-limit Content-length; chunk sizes past 2^64 and past the limit;
               header floods; SMTP SIZE=10^25, BDAT 10^20; overlong lines
  hog          16 requests declaring the largest body allowed, then one body byte a
               second (what a declared length holds, as opposed to bytes really sent)
  reset-req    a valid request cut at a random byte by a TCP reset, at full speed
  reset-reply  a complete request (a real scan), reset before or during the reply
  outsider     from 127.0.0.2, outside ``allowed_clients``: 300 silent connections held,
               and valid requests at full speed
  random       random bytes at full speed on 16 connections

Meanwhile legitimate probes run open-loop, ``--rate`` a second, round-robin over nine
kinds: six scans (rspamc, spamc and HTTP, each with ham and GTUBE: correct is "no action"
and "reject" in the reply bytes, ``Spam: False``/``True`` for spamc), and three side
probes: a query (``forwarding``: yes, and no), a scrape (200 with the counters), a
quarantine delivery (250 held). A probe not answered within 30 s (Exim's ``tmo``) is
"no answer"; p50/p99 are over every scan sent, a missing answer counted at its time out.

The attacker runs in a process of its own (uvloop when installed; its open-files limit
raised to the hard limit for the 10,000 connections); the probes and a sampler of /proc
(VmRSS and open descriptors summed over the supervisor and its workers, every 0.2 s) run
in this one. After each attack, once its connections are gone: one probe of each kind
("after"), the descriptors again, leftover quarantine temp files, worker restarts, and
the daemon's WARNING/ERROR log lines written during the attack (counted and grouped).

Everything binds 127.0.0.1 (the outsider's source is 127.0.0.2, also loopback); every
process started is stopped on the way out, errors and Ctrl-C included. Run as root (Rspamd
runs as _rspamd)::

    .venv/bin/python bench/bench_hostile.py [--workers 1,2] [--duration 4]
        [--attacks slowloris,idle] [--targets spamd,http]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import math
import multiprocessing
import os
import random
import re
import resource
import signal
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exim_policy.config import ServerConfig  # noqa: E402
from exim_policy.lab import Lab, messages  # noqa: E402
from exim_policy.lab.shim import ShimLab  # noqa: E402
from exim_policy.metrics import MAX_SCRAPE_BODY, SCRAPERS  # noqa: E402
from exim_policy.protocol.mbox import exim_mbox_wrap  # noqa: E402
from exim_policy.quarantine.receiver import IDLE_TIMEOUT, MAX_SESSIONS  # noqa: E402
from exim_policy.transport.helper import READ_TIMEOUT as QUERY_TIMEOUT  # noqa: E402

LOOPBACK = "127.0.0.1"
#: a loopback source outside the default allowed_clients (127.0.0.1/32, ::1/128)
OUTSIDER = "127.0.0.2"
LOCAL, FORWARDER, SENDER = "bob@lab.test", "fwd@lab.test", "alice@example.org"
DEFAULTS = ServerConfig()
#: Exim's tmo= in the bundled spamd_address: a scan slower than this is a DEFER
LEGIT_TIMEOUT = 30.0
TARGETS = ("spamd", "http", "query", "metrics", "quarantine")
ATTACKS = ("slowloris", "idle", "absurd", "hog", "reset-req", "reset-reply", "outsider",
           "random")
#: attack -> the listeners it does not apply to (nothing there reserves a declared length)
NOT_APPLICABLE = {"hog": {"query", "quarantine"}}
HEAD_KEPT = 4096  # bytes of what the daemon sent that an attacking connection keeps
#: longest the idle attack takes to open its connections (then it holds them --duration)
IDLE_RAMP = 30.0


# ================================================================ legitimate requests ==
def scan_file(message: bytes) -> bytes:
    """The scan file Exim sends for ``message`` (mbox-wrapped, envelope headers)."""
    return exim_mbox_wrap(message, sender=SENDER, recipients=[LOCAL])


def rspamc_request(message: bytes) -> bytes:
    """Exim's ``variant=rspamd`` request, byte for byte (docs/wire-formats.md)."""
    body = scan_file(message)
    return (f"CHECK RSPAMC/1.3\r\nContent-length: {len(body)}\r\nQueue-Id: 1hstle-000000-00\r\n"
            f"From: <{SENDER}>\r\nRecipient-Number: 1\r\nRcpt: <{LOCAL}>\r\n"
            "Helo: client.test\r\nIP: 127.0.0.1\r\n\r\n").encode() + body


def spamc_request(message: bytes) -> bytes:
    """Exim's default (SpamAssassin) variant; the client half-closes after it."""
    body = scan_file(message)
    return f"REPORT SPAMC/1.2\r\nUser: nobody\r\nContent-length: {len(body)}\r\n\r\n".encode() \
        + body


def checkv2_request(message: bytes, *, close: bool = True) -> bytes:
    """A /checkv2 request as rspamc and Haraka send it (envelope in headers)."""
    return (f"POST /checkv2 HTTP/1.1\r\nHost: {LOOPBACK}\r\nContent-Length: {len(message)}\r\n"
            f"From: <{SENDER}>\r\nRcpt: <{LOCAL}>\r\nIP: 127.0.0.1\r\nHelo: client.test\r\n"
            "Queue-Id: 1hstle-000000-00\r\n" + ("Connection: close\r\n" if close else "")
            + "\r\n").encode() + message


METRICS_GET = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def smtp_commands(message: bytes, helo: str = "legit.test") -> list[bytes]:
    """The SMTP dialogue of one quarantine delivery, one command per entry (the message
    dot-stuffed, with its end marker)."""
    stuffed = re.sub(rb"(?m)^\.", b"..", message)
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return [f"EHLO {helo}\r\n".encode(), f"MAIL FROM:<{SENDER}>\r\n".encode(),
            b"RCPT TO:<carol@example.com>\r\n", b"DATA\r\n", stuffed + b".\r\n", b"QUIT\r\n"]


def unique_message(tag: str) -> bytes:
    """A small message with a fresh Message-ID (a quarantine delivery each its own entry)."""
    return (f"From: {SENDER}\r\nTo: carol@example.com\r\nSubject: held {tag}\r\n"
            f"Message-ID: <{messages.new_message_id()}>\r\n\r\nHeld for review.\r\n").encode()


# ============================================================ correctness of replies ==
def rspamc_action(reply: bytes) -> str | None:
    lines = reply.split(b"\r\n")
    if len(lines) < 3 or lines[0] != b"RSPAMD/1.3 0 EX_OK" or not lines[2].startswith(
            b"Action: "):
        return None
    return lines[2][len(b"Action: "):].decode("latin-1")


def spamc_spam(reply: bytes) -> bool | None:
    lines = reply.split(b"\r\n")
    if len(lines) < 2 or lines[0] != b"SPAMD/1.1 0 EX_OK":
        return None
    if lines[1].startswith(b"Spam: True ;"):
        return True
    return False if lines[1].startswith(b"Spam: False ;") else None


def http_action(reply: bytes) -> str | None:
    head, _, body = reply.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 "):
        return None
    try:
        return json.loads(body).get("action")
    except ValueError:
        return None


#: legit probe kind -> (listener, is a scan)
KINDS = {
    "rspamc ham": ("spamd", True), "rspamc gtube": ("spamd", True),
    "spamc ham": ("spamd", True), "spamc gtube": ("spamd", True),
    "http ham": ("http", True), "http gtube": ("http", True),
    "query": ("query", False), "metrics": ("metrics", False),
    "quarantine": ("quarantine", False),
}
SIDE = ("query", "metrics", "quarantine")
CORRECT = {
    "rspamc ham": lambda r: rspamc_action(r) == "no action",
    "rspamc gtube": lambda r: rspamc_action(r) == "reject",
    "spamc ham": lambda r: spamc_spam(r) is False,
    "spamc gtube": lambda r: spamc_spam(r) is True,
    "http ham": lambda r: http_action(r) == "no action",
    "http gtube": lambda r: http_action(r) == "reject",
    "metrics": lambda r: r.startswith(b"HTTP/1.1 200 ") and b"exim_policy_messages_total" in r,
}


class NoAnswer(Exception):
    """The daemon closed or reset without a complete answer."""


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    while chunk := await reader.read(65536):
        chunks.append(chunk)
    return b"".join(chunks)


async def exchange(port: int, payload: bytes, *, half_close: bool = False) -> bytes:
    """One request, the reply read to EOF (every listener here closes after it)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(payload)
        if half_close:
            writer.write_eof()
        await writer.drain()
        return await read_to_eof(reader)
    finally:
        writer.close()


async def smtp_reply(reader: asyncio.StreamReader) -> bytes:
    """One SMTP reply (all its lines); raises NoAnswer on EOF."""
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise NoAnswer("closed mid-dialogue")
        lines.append(line)
        if line[3:4] != b"-":
            return b"".join(lines)


async def smtp_deliver(port: int, message: bytes) -> tuple[bool, bytes]:
    """A quarantine delivery as Exim's smtp transport makes it: (held, the last reply)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        reply = await smtp_reply(reader)
        if not reply.startswith(b"220"):
            return False, reply
        commands = smtp_commands(message)  # the last, QUIT, is sent without waiting
        for command, code in zip(commands[:-1], (b"250", b"250", b"250", b"354", b"250"),
                                 strict=True):
            writer.write(command)
            reply = await smtp_reply(reader)
            if not reply.startswith(code):
                return False, reply
        writer.write(commands[-1])
        return reply.startswith(b"250 2.0.0 held as"), reply
    finally:
        writer.close()


class Legit:
    """The legitimate probes, their requests built once."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.ports = ports
        ham, gtube = messages.ham(to=LOCAL), messages.gtube(to=LOCAL)
        self.requests = {
            "rspamc ham": rspamc_request(ham), "rspamc gtube": rspamc_request(gtube),
            "spamc ham": spamc_request(ham), "spamc gtube": spamc_request(gtube),
            "http ham": checkv2_request(ham), "http gtube": checkv2_request(gtube),
            "metrics": METRICS_GET,
        }
        self.count = 0

    async def run(self, kind: str) -> tuple[bool, bytes]:
        """(correct, the reply's first bytes); raises on no answer."""
        self.count += 1
        port = self.ports[KINDS[kind][0]]
        if kind == "quarantine":
            return await smtp_deliver(port, unique_message(str(self.count)))
        if kind == "query":  # a forwarder (yes) and a plain mailbox (no), in turn
            address, expected = ((FORWARDER, b"yes"), (LOCAL, b"no"))[self.count % 2]
            reply = await exchange(port, f"forwarding {address}\n".encode(), half_close=True)
            return reply == expected, reply
        reply = await exchange(port, self.requests[kind], half_close=kind.startswith("spamc"))
        if not reply:
            raise NoAnswer("closed without a reply")
        return CORRECT[kind](reply), reply[:80]


@dataclass
class Outcome:
    kind: str
    latency: float
    #: "ok", "wrong: <reply>", "no answer: <why>"
    result: str

    @property
    def answered(self) -> bool:
        return not self.result.startswith("no answer")


async def timed_probe(legit: Legit, kind: str, out: list[Outcome],
                      timeout: float = LEGIT_TIMEOUT) -> None:
    started = time.monotonic()
    try:
        correct, reply = await asyncio.wait_for(legit.run(kind), timeout)
        result = "ok" if correct else f"wrong: {reply[:60]!r}"
    except asyncio.TimeoutError:
        result = f"no answer: nothing in {timeout:g}s"
    except (OSError, NoAnswer, asyncio.IncompleteReadError) as exc:
        result = f"no answer: {type(exc).__name__}"
    out.append(Outcome(kind, time.monotonic() - started, result))


async def legit_traffic(legit: Legit, over: Callable[[], bool], rate: float) -> list[Outcome]:
    """Probes open-loop (a stalled one does not slow the next), round-robin, until
    ``over()``; then waits for the ones in flight (each bounded by LEGIT_TIMEOUT)."""
    out: list[Outcome] = []
    tasks: set[asyncio.Task] = set()
    kinds = list(KINDS)
    next_at, i = time.monotonic(), 0
    while not over():
        task = asyncio.create_task(timed_probe(legit, kinds[i % len(kinds)], out))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
        next_at += 1 / rate
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    if tasks:
        await asyncio.wait(set(tasks))
    return out


async def after_check(legit: Legit) -> list[Outcome]:
    """One probe of each kind, one after the other: is the daemon still answering?"""
    out: list[Outcome] = []
    for kind in KINDS:  # (a shorter time out: a daemon that stopped answering shows anyway)
        await timed_probe(legit, kind, out, timeout=10.0)
    return out


# ========================================================= the daemon's footprint ==
def proc_status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class Sampler:
    """VmRSS and open descriptors of the daemon (supervisor + workers), summed."""

    def __init__(self, shim: ShimLab) -> None:
        self.shim = shim
        self.first_workers = set(shim.worker_pids())
        self.seen_workers = set(self.first_workers)

    def pids(self) -> list[int]:
        workers = self.shim.worker_pids()
        self.seen_workers.update(workers)
        return [self.shim.proc.pid, *workers] if self.shim.proc else workers

    def sample(self) -> tuple[int, int]:
        """(RSS in kB, open fds) now."""
        pids = self.pids()
        return (sum(proc_status_kb(p, "VmRSS") for p in pids), sum(open_fds(p) for p in pids))

    def hwm_kb(self) -> int:
        """Peak RSS since start (VmHWM), summed: an upper bound of the daemon's peak."""
        return sum(proc_status_kb(p, "VmHWM") for p in self.pids())

    @property
    def restarts(self) -> int:
        return len(self.seen_workers - self.first_workers)

    async def peaks(self, over: Callable[[], bool], interval: float = 0.2) -> tuple[int, int]:
        """Peak (RSS kB, fds) sampled until ``over()`` (blocking reads of /proc, ~ms)."""
        rss = fds = 0
        while True:
            now_rss, now_fds = self.sample()
            rss, fds = max(rss, now_rss), max(fds, now_fds)
            if over():
                return rss, fds
            await asyncio.sleep(interval)


# ======================================================================= attacker ==
async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event`` up to ``timeout`` s; whether it is set."""
    if not event.is_set() and timeout > 0:
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
    return event.is_set()


class Conn(asyncio.Protocol):
    """One attacking connection: what the daemon sent back, how and when it ended, and
    write flow control (so "full speed" is the daemon's reading speed, not our memory)."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.opened = time.monotonic()
        self.received = 0
        self.head = b""
        self.lost: asyncio.Future = loop.create_future()
        self.by_us = False
        self.writable = asyncio.Event()
        self.writable.set()
        self.got_data = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if len(self.head) < HEAD_KEPT:
            self.head += data[:HEAD_KEPT - len(self.head)]
        self.got_data.set()

    def eof_received(self) -> bool:
        return False  # the daemon closed: close our side too

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.writable.set()
        self.got_data.set()
        if not self.lost.done():
            self.lost.set_result(exc)

    @property
    def closed(self) -> bool:
        return self.lost.done()

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def wait_closed(self, timeout: float) -> bool:
        if timeout > 0 and not self.closed:
            await asyncio.wait([self.lost], timeout=timeout)
        return self.closed

    def reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0): what a crashed client or a middlebox does."""
        self.by_us = True
        if self.transport is None or self.closed:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def close(self) -> None:
        self.by_us = True
        if self.transport is not None and not self.closed:
            self.transport.abort()


def describe(conn: Conn) -> str:
    """How the daemon answered, in a few words: its first line (SMTP: the reply codes)."""
    head = conn.head
    if head[:3].isdigit():  # SMTP: the sequence of reply codes says what happened
        codes = [c.decode() for c in re.findall(rb"(?m)^(\d{3}) ", head)]
        runs = [f"{code}x{len(list(group))}" if len(codes) > 1 else code
                for code, group in itertools.groupby(codes)]
        last = head.rstrip(b"\r\n").rsplit(b"\n", 1)[-1][:48]
        text = f"SMTP {' '.join(runs)} ({last.decode('latin-1')})"
        text = re.sub(r"x1\b", "", text)
    elif head:
        text = head.split(b"\n", 1)[0].rstrip(b"\r")[:64].decode("latin-1")
        text = re.sub(r"\d{6,}", "<digits>", text)
    else:
        text = ""
    if conn.closed and not conn.by_us:
        how = "reset" if isinstance(conn.lost.result(), ConnectionResetError) else "closed"
        return f"{text} + {how}" if text else f"{how}, no reply"
    return text or "no reply (still open)"


class Attacker:
    """The attacking side of one attack: connection bookkeeping and counters."""

    def __init__(self, port: int, until: float, connects: int = 256) -> None:
        self.port = port
        self.until = until
        self.gate = asyncio.Semaphore(connects)  # connects in flight at once
        self.count: collections.Counter[str] = collections.Counter()
        self.replies: collections.Counter[str] = collections.Counter()
        self.open: set[Conn] = set()
        self.lifetimes: list[float] = []  # of connections the daemon ended

    def left(self) -> float:
        return self.until - time.monotonic()

    async def connect(self, source: str | None = None) -> Conn | None:
        """A new connection, or None (counted): the attack is over, or the connect failed."""
        loop = asyncio.get_running_loop()
        async with self.gate:
            if self.left() <= 0:  # (queued behind the gate past the end: give up)
                self.count["connects not tried: the attack was over"] += 1
                return None
            try:
                _, conn = await asyncio.wait_for(loop.create_connection(
                    Conn, LOOPBACK, self.port, local_addr=(source, 0) if source else None),
                    max(1.0, min(10.0, self.left() + 1.0)))
            except asyncio.TimeoutError:
                self.count["connect timed out"] += 1
                return None
            except OSError as exc:
                self.count[f"connect failed: {type(exc).__name__}"] += 1
                conn = None
        if conn is None:
            await asyncio.sleep(0.05)  # (outside the gate) not a busy loop of failures
            return None
        self.count["connections opened"] += 1
        self.open.add(conn)
        conn.lost.add_done_callback(lambda _: self._ended(conn))
        return conn

    def _ended(self, conn: Conn) -> None:
        self.open.discard(conn)
        if not conn.by_us:
            self.count["ended by the daemon"] += 1
            self.lifetimes.append(time.monotonic() - conn.opened)

    def answer(self, label: str, conn: Conn) -> None:
        self.replies[f"{label}: {describe(conn)}"] += 1

    def close_all(self) -> None:
        for conn in list(self.open):
            conn.close()

    def result(self) -> dict:
        out = dict(self.count)
        if self.lifetimes:
            out["daemon ended them after (s): p50/max"] = \
                f"{statistics.median(self.lifetimes):.1f}/{max(self.lifetimes):.1f}"
        return {"counts": out, "replies": dict(self.replies.most_common(12))}


@dataclass
class Target:
    """What the attacks send to one listener."""

    name: str
    port: int
    slow: bytes            # a valid request, for one byte a second
    valid: list[bytes]     # complete requests (a reset cuts them)
    reply_marker: bytes    # "the reply has begun" (reset-reply resets after it)
    absurd: list[tuple[str, bytes]] = field(default_factory=list)
    hog: bytes | None = None
    #: what reset-req cuts (default: ``valid``); never a request that is complete before
    #: the end of the bytes, else the "cut" would be a complete request, a real scan
    partial: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.partial = self.partial or self.valid


def rspamc_head(length: str) -> bytes:
    return f"CHECK RSPAMC/1.3\r\nContent-length: {length}\r\nFrom: <{SENDER}>\r\n" \
        f"Rcpt: <{LOCAL}>\r\nIP: 127.0.0.1\r\n\r\n".encode()


def http_head(length: str = "", *, target: str = "/checkv2", method: str = "POST",
              extra: str = "") -> bytes:
    cl = f"Content-Length: {length}\r\n" if length else ""
    return f"{method} {target} HTTP/1.1\r\nHost: {LOOPBACK}\r\n{cl}{extra}\r\n".encode()


def build_targets(ports: dict[str, int]) -> dict[str, Target]:
    max_size = DEFAULTS.max_message_size
    ham, gtube = messages.ham(to=LOCAL), messages.gtube(to=LOCAL)
    chunked = "Transfer-Encoding: chunked\r\n"
    spamd = Target(
        "spamd", ports["spamd"], slow=rspamc_request(ham),
        valid=[rspamc_request(gtube), rspamc_request(ham), spamc_request(gtube)],
        reply_marker=b"\n",
        absurd=[
            ("CL 20 digits", rspamc_head("9" * 20)),
            ("CL 40 digits", rspamc_head("1" + "0" * 39)),
            ("CL max+1", rspamc_head(str(max_size + 1))),
            ("CL -1", rspamc_head("-1")),
            ("CL 0x10", rspamc_head("0x10")),
            ("CL twice", b"CHECK RSPAMC/1.3\r\nContent-length: 5\r\nContent-length: 6\r\n\r\n"),
            ("spamc CL 10^12", b"REPORT SPAMC/1.2\r\nUser: nobody\r\n"
                               b"Content-length: 1000000000000\r\n\r\n"),
            ("300 headers", b"CHECK RSPAMC/1.3\r\n" + b"X-A: b\r\n" * 300 + b"\r\n"),
            ("70 KB header", b"CHECK RSPAMC/1.3\r\nX-A: " + b"a" * 70_000 + b"\r\n\r\n"),
            ("300 B request line", b"CHECK " + b"A" * 300 + b"\r\n"),
        ],
        hog=rspamc_head(str(max_size)))
    http = Target(
        "http", ports["http"], slow=checkv2_request(ham),
        valid=[checkv2_request(gtube), checkv2_request(ham, close=False)
               + checkv2_request(gtube)],  # keep-alive: a second request pipelined
        reply_marker=b"HTTP/1.1",
        absurd=[
            ("CL 20 digits", http_head("9" * 20)),
            ("CL max+1", http_head(str(max_size + 1))),
            ("CL -1", http_head("-1")),
            ("CL twice", http_head("5", extra="Content-Length: 6\r\n")),
            ("CL + chunked", http_head("5", extra=chunked)),
            ("chunk 2^80", http_head(extra=chunked) + b"f" * 20 + b"\r\n"),
            ("chunk 64 MiB, 64 KB sent", http_head(extra=chunked) + b"4000000\r\n"
             + b"x" * 65536),
            ("chunk ext 1 MB", http_head(extra=chunked) + b"1;" + b"e" * 1_000_000),
            ("70 KB header", http_head(extra="X-A: " + "a" * 70_000 + "\r\n")),
        ],
        hog=http_head(str(max_size)), partial=[checkv2_request(gtube), checkv2_request(ham)])
    query = Target(
        "query", ports["query"], slow=f"forwarding {LOCAL}\n".encode(),
        valid=[f"forwarding {FORWARDER}\n".encode(), b"ping\n"], reply_marker=b"",
        absurd=[
            ("2 KB line", b"forwarding " + b"a" * 2000 + b"@lab.test\n"),
            ("1 MB, no newline", b"x" * 1_000_000),
            ("NUL line", b"\0" * 500 + b"\n"),
            ("account 1 KB", b"account " + b"u" * 1000 + b"\n"),
        ])
    metrics = Target(
        "metrics", ports["metrics"], slow=METRICS_GET, valid=[METRICS_GET],
        reply_marker=b"HTTP/1.1",
        absurd=[
            ("POST CL 10^12", http_head("1000000000000", target="/metrics")),
            ("CL 20 digits", http_head("9" * 20, target="/metrics", method="GET")),
            ("chunk 2^80", http_head(target="/metrics", method="GET", extra=chunked)
             + b"f" * 20 + b"\r\n"),
            ("70 KB header", http_head(target="/metrics", method="GET",
                                       extra="X-A: " + "a" * 70_000 + "\r\n")),
        ],
        hog=http_head(str(MAX_SCRAPE_BODY), target="/metrics", method="GET"))
    commands = smtp_commands(unique_message("attack"), helo="attacker.test")
    delivery = b"".join(commands)
    up_to_the_end_marker = b"".join(commands[:4]) + commands[4][:-len(b".\r\n")]
    quarantine = Target(
        "quarantine", ports["quarantine"], slow=b"EHLO slowloris.test\r\n", valid=[delivery],
        reply_marker=b"354 ", partial=[up_to_the_end_marker],
        absurd=[
            ("SIZE=10^25", b"EHLO a.test\r\nMAIL FROM:<a@b.test> SIZE=" + b"1" + b"0" * 25
             + b"\r\n"),
            ("SIZE=-1", b"EHLO a.test\r\nMAIL FROM:<a@b.test> SIZE=-1\r\n"),
            ("BDAT 10^20", b"EHLO a.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n"
                           b"BDAT 100000000000000000000 LAST\r\n"),
            ("1 MB command", b"EHLO " + b"a" * 1_000_000 + b"\r\n"),
            ("1 MB address", b"EHLO a.test\r\nMAIL FROM:<" + b"a" * 1_000_000 + b"@b.test>\r\n"),
        ])
    return {t.name: t for t in (spamd, http, query, metrics, quarantine)}


# ----------------------------------------------------------------- the attacks --
async def slowloris(a: Attacker, t: Target, spec: dict) -> None:
    async def one() -> None:
        while a.left() > 0:
            conn = await a.connect()
            if conn is None:
                continue
            sent = 0
            while not conn.closed and a.left() > 0:
                conn.write(t.slow[sent % len(t.slow):][:1])
                sent += 1
                await conn.wait_closed(min(1.0, a.left()))
            if conn.closed and not conn.by_us:
                a.answer("slowloris", conn)
                await asyncio.sleep(0.2)  # then open it again
    await asyncio.gather(*(one() for _ in range(spec["slowloris"])))


async def idle(a: Attacker, t: Target, spec: dict) -> None:
    started = time.monotonic()
    a.until = started + IDLE_RAMP  # all of them open first (as fast as they are accepted)
    conns = await asyncio.gather(*(a.connect() for _ in range(spec["idle"])))
    a.count["seconds to open them all"] = round(time.monotonic() - started, 1)
    a.until = time.monotonic() + spec["duration"]  # then held, silent
    await asyncio.sleep(spec["duration"])
    live = [c for c in conns if c is not None]
    a.count["still open at the end"] = sum(not c.closed for c in live)
    for conn in live:
        if conn.closed and not conn.by_us:
            a.answer("idle", conn)


async def absurd(a: Attacker, t: Target, spec: dict) -> None:
    async def worker(w: int) -> None:
        i = w
        while a.left() > 0:
            label, payload = t.absurd[i % len(t.absurd)]
            i += 1
            conn = await a.connect()
            if conn is None:
                continue
            conn.write(payload)
            await conn.wait_closed(min(2.0, max(a.left(), 0.1)))
            a.answer(label, conn)
            conn.close()
    await asyncio.gather(*(worker(w) for w in range(spec["concurrency"])))


async def hog(a: Attacker, t: Target, spec: dict) -> None:
    assert t.hog is not None

    async def one() -> None:
        while a.left() > 0:
            conn = await a.connect()
            if conn is None:
                continue
            conn.write(t.hog)
            while not conn.closed and a.left() > 0:
                await conn.wait_closed(min(1.0, a.left()))
                conn.write(b"x")  # a body byte a second: never idle for read_timeout
            if conn.closed and not conn.by_us:
                a.answer("hog", conn)
    await asyncio.gather(*(one() for _ in range(spec["hog"])))


async def reset_request(a: Attacker, t: Target, spec: dict) -> None:
    rng = random.Random(7)

    async def worker() -> None:
        while a.left() > 0:
            conn = await a.connect()
            if conn is None:
                continue
            payload = rng.choice(t.partial)
            conn.write(payload[:rng.randrange(1, len(payload))])
            await asyncio.sleep(rng.choice((0.0, 0.002, 0.02)))  # let the daemon read some
            conn.reset()
            a.count["reset mid-request"] += 1
    await asyncio.gather(*(worker() for _ in range(spec["concurrency"])))


async def reset_reply(a: Attacker, t: Target, spec: dict) -> None:
    rng = random.Random(11)

    async def worker() -> None:
        while a.left() > 0:
            conn = await a.connect()
            if conn is None:
                continue
            conn.write(rng.choice(t.valid))
            if rng.random() < 0.5:  # while the daemon reads, scans or commits
                await asyncio.sleep(rng.choice((0.0, 0.001, 0.005)))
                a.count["reset before the reply"] += 1
            else:  # once the reply has begun
                while t.reply_marker not in conn.head and not conn.closed and a.left() > 0:
                    conn.got_data.clear()
                    await wait_event(conn.got_data, a.left())
                a.count["reset during the reply"] += 1
            conn.reset()
    # fewer than the other floods: each complete request is a real Rspamd scan
    await asyncio.gather(*(worker() for _ in range(max(1, spec["concurrency"] // 2))))


async def outsider(a: Attacker, t: Target, spec: dict) -> None:
    async def hold() -> None:
        conn = await a.connect(OUTSIDER)
        if conn is not None:
            await conn.wait_closed(a.left())
            if conn.closed and not conn.by_us:
                a.answer("held outsider", conn)
            else:
                a.count["outsiders still held at the end"] += 1

    async def flood() -> None:
        while a.left() > 0:
            conn = await a.connect(OUTSIDER)
            if conn is None:
                continue
            conn.write(t.valid[0])
            await conn.wait_closed(min(2.0, max(a.left(), 0.1)))
            a.answer("outsider request", conn)
            conn.close()
    await asyncio.gather(*(hold() for _ in range(spec["outsider_hold"])),
                         *(flood() for _ in range(spec["concurrency"])))


async def random_bytes(a: Attacker, t: Target, spec: dict) -> None:
    blob = os.urandom(1 << 20)

    async def worker(w: int) -> None:
        offset = w * 65536
        while a.left() > 0:
            conn = await a.connect()
            if conn is None:
                continue
            while not conn.closed and a.left() > 0:
                if not await wait_event(conn.writable, a.left()):
                    break
                conn.write(blob[offset:offset + 65536])
                offset = (offset + 65536) % len(blob)
                a.count["MB sent"] += 1 / 16  # (rounded when printed)
                await asyncio.sleep(0)
            if conn.closed and not conn.by_us:
                a.answer("random", conn)
    await asyncio.gather(*(worker(w) for w in range(spec["concurrency"])))


ATTACK_FUNCTIONS = {"slowloris": slowloris, "idle": idle, "absurd": absurd, "hog": hog,
                    "reset-req": reset_request, "reset-reply": reset_reply,
                    "outsider": outsider, "random": random_bytes}


async def run_attack(spec: dict, pipe) -> dict:
    target = build_targets(spec["ports"])[spec["target"]]
    attacker = Attacker(target.port, time.monotonic() + spec["duration"])
    pipe.send(("go", attacker.until))
    try:
        # the attack's own loops stop at attacker.until; this bounds a stuck connect or wait
        await asyncio.wait_for(ATTACK_FUNCTIONS[spec["attack"]](attacker, target, spec),
                               spec["duration"] + IDLE_RAMP + 15)
    except asyncio.TimeoutError:
        attacker.count["attack overran its time (stopped)"] += 1
    except Exception as exc:  # a bug in the attack: report it, keep the run going
        attacker.count[f"attack failed: {exc!r}"[:120]] += 1
    finally:
        attacker.close_all()
    result = attacker.result()
    if "MB sent" in result["counts"]:
        result["counts"]["MB sent"] = round(result["counts"]["MB sent"])
    return result


def raise_open_files() -> int:
    """Soft open-files limit to the hard one (10,000 connections need it); the new limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def attacker_process(pipe) -> None:
    """The attacker's process: runs each attack spec it is sent, until it gets None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it (Ctrl-C is the parent's)
    raise_open_files()
    try:
        import uvloop
        run = uvloop.run
    except (ImportError, AttributeError):
        run = asyncio.run
    while (spec := pipe.recv()) is not None:
        pipe.send(("done", run(run_attack(spec, pipe))))


# ======================================================================= the phases ==
@dataclass
class Row:
    attack: str
    target: str
    outcomes: list[Outcome]
    peak_rss_kb: int = 0
    peak_fds: int = 0
    fds_after: int = 0
    after: list[Outcome] = field(default_factory=list)
    attacker: dict = field(default_factory=dict)
    log_lines: int = 0
    log_groups: list[tuple[str, int]] = field(default_factory=list)
    leftovers: int = 0
    restarts: int = 0


class Bench:
    """One daemon (one workers setting) and its phases."""

    def __init__(self, shim: ShimLab, pipe, args: argparse.Namespace) -> None:
        self.shim = shim
        self.pipe = pipe
        self.args = args
        self.ports = {"spamd": shim.port, "http": shim.http_port, "query": shim.query_port,
                      "metrics": shim.metrics_port, "quarantine": shim.quarantine_port}
        self.legit = Legit(self.ports)
        self.sampler = Sampler(shim)

    def baseline(self) -> Row:
        return self.phase("baseline", "-", None)

    def attack(self, attack: str, target: str) -> Row:
        spec = {"attack": attack, "target": target, "ports": self.ports,
                "duration": self.args.duration, "slowloris": self.args.slowloris,
                "idle": self.args.idle, "hog": self.args.hog,
                "concurrency": self.args.concurrency, "outsider_hold": self.args.outsider_hold}
        return self.phase(attack, target, spec)

    def phase(self, attack: str, target: str, spec: dict | None) -> Row:
        log_offset = self.shim.log_path.stat().st_size
        if spec is None:
            until = time.monotonic() + self.args.baseline
            over: Callable[[], bool] = lambda: time.monotonic() >= until  # noqa: E731
        else:
            self.pipe.send(spec)
            if not self.pipe.poll(60):
                raise RuntimeError(f"the attacker did not start {attack}/{target}")
            tag, _ = self.pipe.recv()
            assert tag == "go", tag
            over = self.pipe.poll  # the attacker's result is there: it is over
        outcomes, (rss, fds) = asyncio.run(self.measure(over))
        row = Row(attack, target, outcomes, rss, fds)
        if spec is not None:
            if not self.pipe.poll(spec["duration"] + IDLE_RAMP + 30):
                raise RuntimeError(f"the attacker did not finish {attack}/{target}")
            tag, row.attacker = self.pipe.recv()
        time.sleep(self.args.settle)  # the daemon sees the attackers' closes
        row.after = asyncio.run(after_check(self.legit))
        row.fds_after = self.sampler.sample()[1]
        row.log_lines, row.log_groups = log_summary(self.shim.log_path, log_offset)
        row.leftovers = len(os.listdir(self.shim.quarantine_path / "tmp"))
        row.restarts = self.sampler.restarts
        return row

    async def measure(self, over: Callable[[], bool]) -> tuple[list[Outcome], tuple[int, int]]:
        traffic = asyncio.create_task(legit_traffic(self.legit, over, self.args.rate))
        peaks = await self.sampler.peaks(over)
        outcomes = await traffic
        # a probe still running after `until` (a slow answer) can raise the peak: sample
        # once more
        rss, fds = self.sampler.sample()
        return outcomes, (max(peaks[0], rss), max(peaks[1], fds))


_LOG_NUMBERS = re.compile(r"\d+(\.\d+)?")


def log_summary(path: Path, offset: int) -> tuple[int, list[tuple[str, int]]]:
    """WARNING/ERROR/CRITICAL lines written since ``offset``: how many, and grouped by
    their text with the numbers taken out (most frequent first)."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        text = fh.read().decode("utf-8", "replace")
    groups: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        parts = line.split(" ", 3)  # date time LEVEL rest
        if len(parts) < 4 or parts[2] not in ("WARNING", "ERROR", "CRITICAL"):
            continue
        rest = re.sub(r"\('127\.0\.0\.\d+', \d+\)|127\.0\.0\.\d+", "ADDR", parts[3])
        groups[parts[2] + " " + _LOG_NUMBERS.sub("N", rest)[:150]] += 1
    return sum(groups.values()), groups.most_common(4)


# ========================================================================= printing ==
def pct(values: list[float], q: float) -> float:
    """The ``q``th percentile in ms, nearest rank (of 100 values, p99 is the 99th)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] * 1000


def side(outcomes: list[Outcome], kind: str) -> str:
    mine = [o for o in outcomes if o.kind == kind]
    return f"{sum(o.result == 'ok' for o in mine)}/{len(mine)}"


def scan_columns(outcomes: list[Outcome]) -> tuple[str, float, float]:
    scans = [o for o in outcomes if KINDS[o.kind][1]]
    answered = sum(o.answered for o in scans)
    correct = sum(o.result == "ok" for o in scans)
    latencies = [o.latency for o in scans]
    return f"{answered}/{correct}/{len(scans)}", pct(latencies, 50), pct(latencies, 99)


HEADER = (f"{'attack':<12}{'target':<11}{'scans ans/ok/sent':>18}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'x base':>7}{'query':>8}{'metrics':>8}{'quar':>8}{'RSS MB':>8}{'fds':>7}"
          f"{'fds aft':>8}{'after':>7}{'warn+':>7}")


def format_row(row: Row, base_p99: float) -> str:
    counts, p50, p99 = scan_columns(row.outcomes)
    after_ok = sum(o.result == "ok" for o in row.after)
    ratio = p99 / base_p99 if base_p99 == base_p99 and base_p99 > 0 else float("nan")
    return (f"{row.attack:<12}{row.target:<11}{counts:>18}{p50:>9.1f}{p99:>9.1f}"
            f"{ratio:>7.1f}{side(row.outcomes, 'query'):>8}{side(row.outcomes, 'metrics'):>8}"
            f"{side(row.outcomes, 'quarantine'):>8}{row.peak_rss_kb / 1024:>8.0f}"
            f"{row.peak_fds:>7}{row.fds_after:>8}{f'{after_ok}/{len(row.after)}':>7}"
            f"{row.log_lines:>7}")


def format_details(row: Row) -> list[str]:
    """What the attacker saw, what went wrong for the probes, what the daemon logged."""
    lines = [f"  {row.attack}/{row.target}:"]
    if row.attacker:
        counts = ", ".join(f"{k} {v}" for k, v in row.attacker["counts"].items())
        lines.append(f"    attacker: {counts}")
        for reply, n in row.attacker["replies"].items():
            lines.append(f"      {n:>6} x {reply}")
    lines.append("    p99 ms by kind: " + ", ".join(
        f"{kind} {pct([o.latency for o in row.outcomes if o.kind == kind], 99):.0f}"
        for kind in KINDS))
    bad = collections.Counter(f"{o.kind}: {o.result}" for o in row.outcomes + row.after
                              if o.result != "ok")
    for text, n in bad.most_common(6):
        lines.append(f"    probe not ok {n} x {text}")
    for text, n in row.log_groups:
        lines.append(f"    log {n:>6} x {text}")
    if row.leftovers:
        lines.append(f"    quarantine tmp/: {row.leftovers} file(s) left behind")
    if row.restarts:
        lines.append(f"    worker restarts so far: {row.restarts}")
    return lines


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ============================================================================= main ==
def daemon(workdir: str, rspamd_url: str, workers: int) -> ShimLab:
    """``exim-policy serve`` with every listener and the production limits (the lab's
    shorter read_timeout undone)."""
    shim = ShimLab(os.path.join(workdir, f"workers{workers}"), rspamd_url=rspamd_url,
                   forwarding=[FORWARDER], rspamd_timeout=8.0, quarantine={}, metrics={},
                   workers=workers, server={"read_timeout": DEFAULTS.read_timeout})
    shim.start(timeout=60)
    return shim


def selected(value: str, known: tuple[str, ...]) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()] if value else list(known)
    unknown = set(names) - set(known)
    if unknown:
        raise SystemExit(f"unknown: {', '.join(sorted(unknown))} (known: {', '.join(known)})")
    return names


def run_setting(workdir: str, rspamd_url: str, workers: int, pipe,
                args: argparse.Namespace) -> list[Row]:
    shim = daemon(workdir, rspamd_url, workers)
    rows = []
    try:
        bench = Bench(shim, pipe, args)
        asyncio.run(after_check(bench.legit))  # warm-up: first scans are slower
        rows.append(bench.baseline())
        print(f"workers={workers}: baseline done, load {loadavg()}", flush=True)
        for attack in selected(args.attacks, ATTACKS):
            for target in selected(args.targets, TARGETS):
                if target in NOT_APPLICABLE.get(attack, ()):
                    continue
                rows.append(bench.attack(attack, target))
                print(f"  {attack}/{target}: scans ans/ok/sent "
                      f"{scan_columns(rows[-1].outcomes)[0]}", flush=True)
        rows.append(bench.baseline())
        rows[-1].attack = "baseline2"
        hwm = bench.sampler.hwm_kb()
        print(f"workers={workers}: VmHWM summed over the daemon's processes at the end: "
              f"{hwm / 1024:.0f} MB", flush=True)
        rows[-1].attacker = {"counts": {"VmHWM sum MB": round(hwm / 1024)}, "replies": {}}
    finally:
        shim.stop()
    return rows


def print_results(workers: int, rows: list[Row], load: tuple[str, str]) -> None:
    base_p99 = scan_columns(rows[0].outcomes)[2]
    print(f"\n=== workers = {workers}   load average before {load[0]}, after {load[1]} "
          f"({os.cpu_count()} cores) ===")
    print(HEADER)
    for row in rows:
        print(format_row(row, base_p99))
    print("details:")
    for row in rows:
        for line in format_details(row):
            print(line)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2", help="server.workers settings, in turn")
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per attack")
    ap.add_argument("--baseline", type=float, default=6.0, help="seconds of quiet baseline")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds after an attack before the after-check")
    ap.add_argument("--rate", type=float, default=40.0, help="legitimate probes per second")
    ap.add_argument("--attacks", default="", help=f"comma list (default all: {','.join(ATTACKS)})")
    ap.add_argument("--targets", default="", help=f"comma list (default all: {','.join(TARGETS)})")
    ap.add_argument("--slowloris", type=int, default=1000, help="slowloris connections")
    ap.add_argument("--idle", type=int, default=10000, help="idle connections")
    ap.add_argument("--hog", type=int, default=16, help="connections declaring the largest body")
    ap.add_argument("--concurrency", type=int, default=16, help="connections of each flood")
    ap.add_argument("--outsider-hold", type=int, default=300,
                    help="silent connections held from outside allowed_clients")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    workers_settings = [int(n) for n in args.workers.split(",") if n.strip()]
    selected(args.attacks, ATTACKS)
    selected(args.targets, TARGETS)
    limit = raise_open_files()  # the daemon inherits it (and raises its soft limit itself)
    print(f"limits: server.max_connections {DEFAULTS.max_connections} per worker, "
          f"read_timeout {DEFAULTS.read_timeout:g}s, request_timeout "
          f"{DEFAULTS.request_timeout:g}s, max_bytes_in_flight "
          f"{DEFAULTS.max_bytes_in_flight >> 20} MiB, max_message_size "
          f"{DEFAULTS.max_message_size >> 20} MiB; query helper {QUERY_TIMEOUT:g}s; metrics "
          f"{SCRAPERS} connections; quarantine {MAX_SESSIONS} sessions, idle "
          f"{IDLE_TIMEOUT:g}s; RLIMIT_NOFILE {limit}", flush=True)
    parent, child = multiprocessing.get_context("spawn").Pipe()
    attacker = multiprocessing.get_context("spawn").Process(
        target=attacker_process, args=(child,), name="bench-hostile-attacker")
    results = []
    with tempfile.TemporaryDirectory(prefix="exim-policy-hostile-") as workdir:
        try:
            attacker.start()
            with Lab(workdir) as lab:
                for workers in workers_settings:
                    before = loadavg()
                    rows = run_setting(workdir, lab.rspamd.url, workers, parent, args)
                    results.append((workers, rows, (before, loadavg())))
        finally:
            if attacker.is_alive():
                parent.send(None)
                attacker.join(10)
            if attacker.is_alive():
                attacker.kill()
                attacker.join(5)
    for workers, rows, load in results:
        print_results(workers, rows, load)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanups on SIGTERM too
    sys.exit(main())
