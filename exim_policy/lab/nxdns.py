"""A loopback DNS responder that answers every query with NXDOMAIN at once.

It is Rspamd's only name server in the lab, so no DNS query leaves the machine and every
DNS-based check finishes immediately and deterministically (an unanswered query would
time out instead).  UDP only: Rspamd also tries TCP, is refused at once, which is harmless.

- ``build_reply(query)`` is the sans-IO part: query bytes in, reply bytes out (question
  echoed, QR and RA set, RD copied, RCODE 3), None for packets that get no answer.
- ``python -m exim_policy.lab.nxdns --host 127.0.0.1 --port N [--log FILE]`` serves it
  (asyncio UDP; SIGTERM/SIGINT stop it); ``--log`` appends "qname type=N" per query.
- ``NxDns(workdir)`` starts that command as a managed process on a free port and waits
  until it answers a probe; ``query()`` is the probe (and a tiny client for tests).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .errors import LabError
from .ports import LOOPBACK, free_port
from .process import ManagedProcess

NXDOMAIN = 3
FORMERR = 1
NOTIMP = 4
_HEADER = struct.Struct("!HHHHHH")


def _question_end(packet: bytes, pos: int) -> int | None:
    """Offset just past the first question (QNAME, QTYPE, QCLASS), None if malformed."""
    while pos < len(packet):
        length = packet[pos]
        if length == 0:
            end = pos + 1 + 4
            return end if end <= len(packet) else None
        if length & 0xC0:  # compression pointers do not belong in a query's question
            return None
        pos += 1 + length
    return None


def build_reply(query: bytes, rcode: int = NXDOMAIN) -> bytes | None:
    """Reply bytes for one DNS query packet, or None if the packet gets no answer.

    Responses (QR set) and packets shorter than a header are ignored, so two responders can
    never ping-pong.  Opcodes other than QUERY get NOTIMP; an unparsable question FORMERR.
    """
    if len(query) < _HEADER.size:
        return None
    qid, flags, qdcount, _an, _ns, _ar = _HEADER.unpack_from(query)
    if flags & 0x8000:
        return None
    opcode = (flags >> 11) & 0xF
    rd = flags & 0x0100
    question = b""
    if opcode != 0:
        rcode = NOTIMP
    elif qdcount >= 1:
        end = _question_end(query, _HEADER.size)
        if end is None:
            rcode = FORMERR
        else:
            question = query[_HEADER.size:end]
    else:
        rcode = FORMERR
    # QR=1, opcode copied, AA=0, TC=0, RD copied, RA=1
    rflags = 0x8000 | (opcode << 11) | rd | 0x0080 | (rcode & 0xF)
    return _HEADER.pack(qid, rflags, 1 if question else 0, 0, 0, 0) + question


def describe_query(query: bytes) -> str:
    """"name type=N" for the log; best effort on malformed packets."""
    labels, pos = [], _HEADER.size
    try:
        while query[pos]:
            length = query[pos]
            labels.append(query[pos + 1:pos + 1 + length].decode("ascii", "replace"))
            pos += 1 + length
        qtype = int.from_bytes(query[pos + 1:pos + 3], "big")
    except IndexError:
        qtype = -1
    return f"{'.'.join(labels) or '.'} type={qtype}"


def encode_query(name: str, qtype: int = 1, qid: int | None = None) -> bytes:
    """A minimal recursive query (RD set) for ``name``."""
    qid = random.randrange(0x10000) if qid is None else qid
    qname = b"".join(bytes([len(p)]) + p.encode("ascii") for p in name.strip(".").split(".") if p)
    return _HEADER.pack(qid, 0x0100, 1, 0, 0, 0) + qname + b"\x00" + struct.pack("!HH", qtype, 1)


@dataclass(frozen=True)
class DnsReply:
    """The parts of a reply the lab looks at."""

    qid: int
    flags: int
    qdcount: int
    question: bytes

    @property
    def rcode(self) -> int:
        return self.flags & 0xF

    @property
    def recursion_available(self) -> bool:
        return bool(self.flags & 0x0080)


def query(host: str, port: int, name: str, qtype: int = 1, timeout: float = 2.0) -> DnsReply:
    """Send one UDP query and return the parsed reply; raises ``TimeoutError``/``OSError``."""
    packet = encode_query(name, qtype)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, (host, port))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            raise TimeoutError(f"no DNS reply from {host}:{port} within {timeout}s") from None
    qid, flags, qdcount, *_ = _HEADER.unpack_from(data)
    return DnsReply(qid, flags, qdcount, data[_HEADER.size:])


# ------------------------------------------------------------------------ server --
class _Responder(asyncio.DatagramProtocol):
    def __init__(self, log: IO[str] | None) -> None:
        self.log = log
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        # log first: whoever got the answer may read the log at once
        if self.log is not None:
            self.log.write(describe_query(data) + "\n")
        reply = build_reply(data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


async def serve(host: str, port: int, log_path: str | None = None) -> None:
    """Answer queries on ``host:port`` until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    # the log is opened once, before anything is served (a few lines, line-buffered)
    log = (open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: ASYNC230
           if log_path else None)
    try:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Responder(log), local_addr=(host, port))
        stop = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        try:
            await stop
        finally:
            transport.close()
    finally:
        if log is not None:
            log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exim_policy.lab.nxdns",
                                     description="answer every DNS query with NXDOMAIN")
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", default=None, help="append one line per query to this file")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.host, args.port, args.log))
    except OSError as exc:  # typically "address already in use"
        print(f"nxdns: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------- lab component --
class NxDns:
    """The responder as a managed process in ``workdir`` (logs and queries.log live there)."""

    def __init__(self, workdir: str | os.PathLike[str], *, host: str = LOOPBACK,
                 port: int | None = None, python: str = sys.executable) -> None:
        self.workdir = Path(workdir)
        self.host = host
        self.port = port or 0
        self._fixed_port = port is not None
        self.python = python
        self.log_path = self.workdir / "queries.log"
        self.process: ManagedProcess | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Start and wait until it answers; on a port collision retry with another port."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self._fixed_port else 3
        for _attempt in range(attempts):
            if not self._fixed_port:
                self.port = free_port(self.host, udp=True)
            self.process = ManagedProcess(
                [self.python, "-m", "exim_policy.lab.nxdns", "--host", self.host,
                 "--port", str(self.port), "--log", str(self.log_path)],
                name="nxdns", logdir=self.workdir, env=_child_env())
            self.process.start()
            if self._wait_ready(timeout):
                return
            self.process.stop(2.0)
        assert self.process is not None
        raise LabError(f"nxdns did not answer on udp {self.host}:{self.port}\n"
                       f"{self.process.tail()}")

    def _wait_ready(self, timeout: float) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.alive():
                return False
            try:
                reply = query(self.host, self.port, "ready.probe.invalid", timeout=0.2)
            except (TimeoutError, OSError):  # not bound yet: ICMP refused or no answer
                time.sleep(0.05)
                continue
            return reply.rcode == NXDOMAIN
        return False

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def stop(self, timeout: float = 5.0) -> None:
        if self.process is not None:
            self.process.stop(timeout)


def _child_env() -> dict[str, str]:
    """Environment for ``python -m exim_policy...``: make this package importable."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


if __name__ == "__main__":
    sys.exit(main())
