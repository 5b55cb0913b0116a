"""Run a command so that nothing it starts can reach past loopback, and report every try.

``python -m exim_policy.lab.netguard [--log FILE] [--keep-log] -- CMD [ARGS...]``

1. CMD runs in a network namespace of its own that has only ``lo`` (``unshare --net``),
   so a packet to any other address cannot leave the machine: it fails at once with
   ENETUNREACH.
2. The whole process tree runs under ``strace -f`` (seccomp-filtered, so only the traced
   calls stop), recording every ``connect``/``sendto``/``sendmsg``/``sendmmsg`` with its
   address, and every ``execve`` and fork so that each call can be named by the command
   that made it.
3. When CMD ends, the trace is read: any IPv4/IPv6 address other than 127.0.0.0/8, ``::1``
   and the unspecified ``0.0.0.0``/``::`` (getaddrinfo's connect probes, which send nothing
   and on Linux mean "this host") is an offence. Each offence is printed with the command,
   the call and the address, and the exit status is 3 unless CMD itself failed.

A failed try counts as much as a successful one: the namespace stops the packet, the
guard makes the test run fail, so a name lookup that would go to the system resolver on a
user's machine (Exim asking DNS for its own host name, say) is caught here, where it could
not go anywhere.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

NETWORK_CALLS = ("connect", "sendto", "sendmsg", "sendmmsg")
_TRACED = ",".join((*NETWORK_CALLS, "execve", "clone", "clone3", "fork", "vfork"))
#: exit status when CMD succeeded but something tried to leave loopback
EXIT_OFFENCE = 3

_LINE = re.compile(r"^(?P<pid>\d+) +(?P<rest>.*)$")
_CALL = re.compile(r"^(?P<name>[a-z_0-9]+)\((?P<args>.*)$")
_RESUMED = re.compile(r"^<\.\.\. (?P<name>[a-z_0-9]+) resumed>(?P<args>.*)$")
_RESULT = re.compile(r"\) += (?P<ret>-?\d+)")
_INET = re.compile(r'sa_family=AF_INET, sin_port=htons\((?P<port>\d+)\), '
                   r'sin_addr=inet_addr\("(?P<addr>[^"]*)"\)')
_INET6 = re.compile(r'sa_family=AF_INET6, sin6_port=htons\((?P<port>\d+)\),.*?'
                    r'inet_pton\(AF_INET6, "(?P<addr>[^"]*)"')
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Offence:
    pid: int
    command: str
    call: str
    address: str
    port: int
    line: str

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"pid {self.pid} ({self.command}): {self.call} to {host}:{self.port}"


def allowed(address: str) -> bool:
    """Loopback, or the unspecified address (which Linux routes to this host)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False  # an address strace could not print is not known to be local
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified


def _argv_text(args: str) -> str:
    """The command line of an ``execve(path, [argv...], envp)`` call, shortened."""
    bracket = args.find("[")
    argv = [bytes(s, "latin-1").decode("unicode_escape", "replace")
            for s in _QUOTED.findall(args[bracket:args.find("]", bracket)])] if bracket >= 0 else []
    if not argv:
        found = _QUOTED.search(args)
        argv = [found.group(1)] if found else ["?"]
    text = shlex.join(a.replace("\n", " ") for a in argv[:6])
    return text if len(text) <= 160 else text[:157] + "..."


def scan(lines: Iterable[str]) -> list[Offence]:
    """The offences in an ``strace -f`` log (lines as ``strace -o`` writes them)."""
    commands: dict[int, str] = {}     # pid -> command line after its last execve
    parents: dict[int, int] = {}      # child pid -> the pid that forked it
    pending: dict[int, tuple[str, str]] = {}  # pid -> (call, args) of an unfinished call
    found: list[tuple[int, str | None, str, str, int, str]] = []

    def name_of(pid: int) -> str:
        seen = set()
        while pid not in commands and pid in parents and pid not in seen:
            seen.add(pid)
            pid = parents[pid]
        return commands.get(pid, "?")

    for raw in lines:
        line = raw.rstrip("\n")
        match = _LINE.match(line)
        if not match:
            continue
        pid, rest = int(match.group("pid")), match.group("rest")
        call = _CALL.match(rest)
        if call:
            name, args = call.group("name"), call.group("args")
            if args.endswith("<unfinished ...>"):
                pending[pid] = (name, args)
            if name in NETWORK_CALLS:  # the address is in the first half of a split call
                for pattern in (_INET, _INET6):
                    for hit in pattern.finditer(args):
                        if not allowed(hit.group("addr")):
                            # a child's parent may be logged later: name it at the end
                            found.append((pid, commands.get(pid), name, hit.group("addr"),
                                          int(hit.group("port")), line))
                continue
        else:
            resumed = _RESUMED.match(rest)
            if not resumed:
                continue  # signals, exits
            name, before = pending.pop(pid, (resumed.group("name"), ""))
            args = before + resumed.group("args")
        result = _RESULT.search(args)
        if result is None:
            continue  # an unfinished execve or fork: its result comes with "resumed"
        elif name == "execve" and result.group("ret") == "0":
            commands[pid] = _argv_text(args)
        elif name in ("clone", "clone3", "fork", "vfork") and int(result.group("ret")) > 0:
            parents.setdefault(int(result.group("ret")), pid)
    return [Offence(pid, command or name_of(pid), call, address, port, line)
            for pid, command, call, address, port, line in found]


def strace_argv(log: str, command: list[str]) -> list[str]:
    """The strace command line that follows ``command`` and its whole tree into ``log``."""
    return ["strace", "-f", "-qq", "--seccomp-bpf", "-e", f"trace={_TRACED}",
            "-e", "signal=none", "-s", "200", "-o", log, "--", *command]


def isolated_argv(command: list[str]) -> list[str]:
    """``command`` in a new network namespace whose only interface, lo, is up."""
    return ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"',
            "netguard", *command]


def check_tools() -> str | None:
    for tool, package in (("strace", "strace"), ("unshare", "util-linux"),
                          ("ip", "iproute2")):
        if shutil.which(tool) is None:
            return f"{tool} not found: install the Debian package {package!r}"
    if os.geteuid() != 0:
        return "must run as root (a network namespace needs CAP_SYS_ADMIN)"
    return None


def _read(path: str) -> Iterator[str]:
    with open(path, encoding="latin-1") as fh:
        yield from fh


def run(command: list[str], log: str | None = None, keep_log: bool = False) -> int:
    problem = check_tools()
    if problem:
        print(f"netguard: {problem}", file=sys.stderr)
        return 2
    own_log = log is None
    if own_log:
        fd, log = tempfile.mkstemp(prefix="netguard-", suffix=".strace")
        os.close(fd)
    try:
        status = subprocess.call(strace_argv(log, isolated_argv(command)))
        offences = scan(_read(log))
    except KeyboardInterrupt:
        return 130
    if offences:
        print(f"netguard: {len(offences)} call(s) tried to reach an address off loopback "
              f"(the namespace stopped them; the trace is {log}):", file=sys.stderr)
        for offence in offences[:50]:
            print(f"  {offence}", file=sys.stderr)
        if len(offences) > 50:
            print(f"  ... and {len(offences) - 50} more", file=sys.stderr)
        return status or EXIT_OFFENCE
    print("netguard: nothing tried to reach past loopback", file=sys.stderr)
    if own_log and not keep_log:
        os.unlink(log)
    return status


#: the self-test's probe: one UDP datagram and one TCP connect to documentation addresses
#: (RFC 5737, RFC 3849); in the namespace both fail with ENETUNREACH, so nothing is sent
_PROBE = """
import socket
for family, kind, address in ((socket.AF_INET, socket.SOCK_DGRAM, ("192.0.2.1", 53)),
                              (socket.AF_INET6, socket.SOCK_STREAM, ("2001:db8::1", 25))):
    with socket.socket(family, kind) as sock:
        try:
            sock.sendto(b"x", address) if kind == socket.SOCK_DGRAM else sock.connect(address)
        except OSError as exc:
            print("probe:", address[0], exc)
"""


def self_test() -> int:
    """Run a probe that tries two addresses off loopback: the guard must name both."""
    problem = check_tools()
    if problem:
        print(f"netguard: {problem}", file=sys.stderr)
        return 2
    fd, log = tempfile.mkstemp(prefix="netguard-selftest-", suffix=".strace")
    os.close(fd)
    try:
        subprocess.run(strace_argv(log, isolated_argv([sys.executable, "-c", _PROBE])),
                       stdout=subprocess.DEVNULL, check=False)
        found = {(o.address, o.port) for o in scan(_read(log))}
    finally:
        os.unlink(log)
    want = {("192.0.2.1", 53), ("2001:db8::1", 25)}
    if found != want:
        print(f"netguard: self-test FAILED: the probe's tries were {sorted(want)}, the guard "
              f"saw {sorted(found)}", file=sys.stderr)
        return 1
    print("netguard: self-test ok (a probe's UDP send and TCP connect off loopback were "
          "caught and stopped)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exim_policy.lab.netguard",
        description="Run CMD in a loopback-only network namespace under strace and fail "
                    "if any process it starts tries to reach another address.")
    parser.add_argument("--log", help="write the strace log here (kept)")
    parser.add_argument("--keep-log", action="store_true",
                        help="keep the temporary strace log even when nothing was found")
    parser.add_argument("--self-test", action="store_true",
                        help="check that the guard catches a probe's tries, then exit")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    args = parser.parse_args(argv)
    if args.self_test:
        return self_test()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    return run(command, args.log, args.keep_log)


if __name__ == "__main__":
    sys.exit(main())
