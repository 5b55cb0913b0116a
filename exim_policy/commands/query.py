"""exim-policy query: the policy helper as a command, for Exim's ``${run}``.

Called once per recipient, so start-up time matters: this module imports nothing heavy,
asks the running daemon's query socket when one is configured, and otherwise scans the
built map file line by line (no set is built for one answer).
"""
from __future__ import annotations

import argparse

NAME = "query"
HELP = "answer a policy question for Exim's ${run}: prints yes/no, exit 0/1 (2 on error)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", choices=["forwarding"],
                        help="forwarding: does ADDRESS forward to an external mailbox")
    parser.add_argument("address")
    parser.add_argument("--config", default=None,
                        help="TOML configuration (default /etc/exim-policy/config.toml)")


def run(args: argparse.Namespace) -> int:
    import sys

    from ..config import DEFAULT_CONFIG_PATH, load

    config = load(args.config or DEFAULT_CONFIG_PATH)
    # the bytes Exim passed; the daemon and the map compare addresses as latin-1 views of them
    raw = args.address.encode("utf-8", "surrogateescape")
    answer = _ask_daemon(config, raw)
    if answer is None:
        try:
            answer = "yes" if _map_file_has(config.forwarding.map, raw.decode("latin-1")) else "no"
        except OSError as exc:
            print(f"exim-policy: cannot read {config.forwarding.map}: {exc.strerror}",
                  file=sys.stderr)
            return 2
    print(answer)
    return 0 if answer == "yes" else 1


def _ask_daemon(config, address: bytes) -> str | None:
    """The daemon's answer, or None when no query socket answers (then read the file)."""
    import socket

    for where in config.server.query_listen:
        try:
            if where.is_unix:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                target = where.path
            else:
                sock = socket.socket(socket.AF_INET6 if ":" in where.host else socket.AF_INET)
                target = (where.host, where.port)
            with sock:
                sock.settimeout(2.0)
                sock.connect(target)
                sock.sendall(b"forwarding " + address + b"\n")
                sock.shutdown(socket.SHUT_WR)
                reply = sock.recv(64).decode("latin-1").strip()
        except OSError:
            continue
        if reply in ("yes", "no"):
            return reply
    return None


def _map_file_has(path: str, address: str) -> bool:
    """The built map file's answer (mapfile.has_entry: no set is built for one answer)."""
    from ..forwarding.mapfile import has_entry

    return has_entry(path, address)
