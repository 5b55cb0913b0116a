"""``exim-policy forwardings build|explain``: the forwarding map from the alias sources.

``build``        reads ``[forwarding]`` sources, writes the map when it changed; exit 0, or 2 on
                 bad input (one line ``file:line: ...`` on stderr, the old map untouched).
``build --check`` writes nothing; exit 0 when the map on disk is current, 1 when it is stale
                 or missing (for cron and monitoring), 2 on bad input.
``explain ADDR`` prints the chain(s) from ADDR to each external target with ``file:line``
                 per hop, or why ADDR does not forward; exit 0 forwarding, 1 not, 2 error.
                 ``--json`` prints one object {"address", "forwarding", "chains", "reason"}.
Warnings (ignored keys, over-matching ``@domain`` lines, ...) go to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys

NAME = "forwardings"
HELP = "build the map of local addresses that forward to external mailboxes, or explain one"

#: warnings printed at most; the rest are counted
MAX_SHOWN_WARNINGS = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config import DEFAULT_CONFIG_PATH

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=DEFAULT_CONFIG_PATH,
                        help=f"configuration file (default {DEFAULT_CONFIG_PATH})")
    sub = parser.add_subparsers(dest="forwardings_command", metavar="ACTION")
    sub.required = True
    build = sub.add_parser("build", parents=[common], help="build the map (only writes changes)",
                           description="Build the forwarding map; rewrite it only when its "
                           "entries changed.")
    build.add_argument("--check", action="store_true",
                       help="write nothing; exit 1 when the map is stale or missing, 0 when "
                       "current")
    build.add_argument("-q", "--quiet", action="store_true",
                       help="no summary line (warnings and errors still go to stderr)")
    explain = sub.add_parser("explain", parents=[common],
                             help="show why an address forwards (or why not)",
                             description="Print the alias chains from ADDR to each external "
                             "target, or why ADDR does not forward.")
    explain.add_argument("address", metavar="ADDR")
    explain.add_argument("--json", action="store_true", help="print one JSON object")


def _warnings(shown: tuple[str, ...], count: int) -> None:
    for line in shown[:MAX_SHOWN_WARNINGS]:
        print(f"exim-policy: warning: {line}", file=sys.stderr)
    if count > MAX_SHOWN_WARNINGS:
        print(f"exim-policy: ... and {count - MAX_SHOWN_WARNINGS} more warnings",
              file=sys.stderr)


def _chain_text(chain) -> str:
    """``a@x -> b@x -> c@gmail.example  (/etc/exim4/virtual:3, :7)``."""
    arrows = " -> ".join(hop.address for hop in chain)
    origins = []
    last_file = None
    for hop in chain:
        if hop.source is None:
            continue
        file, _, line = hop.source.rpartition(":")
        text = f":{line}" if file == last_file else hop.source
        if hop.key is not None and hop.key != hop.address:
            text += f" via {hop.key}"
        origins.append(text)
        last_file = file
    return f"{arrows}  ({', '.join(origins)})"


def run(args: argparse.Namespace) -> int:
    from .. import config as config_mod
    from ..forwarding import build as fbuild

    cfg = config_mod.load(args.config).forwarding
    try:
        if args.forwardings_command == "explain":
            result = fbuild.explain(cfg, args.address)
            if args.json:
                print(json.dumps({
                    "address": result.address,
                    "forwarding": result.forwarding,
                    "chains": [[{"address": hop.address, "source": hop.source,
                                 "key": hop.key} for hop in chain] for chain in result.chains],
                    "reason": result.reason,
                }))
            elif result.forwarding:
                print(f"{result.address}: forwarding ({result.reason})")
                for chain in result.chains:
                    print(f"  {_chain_text(chain)}")
            else:
                print(f"{result.address}: not forwarding: {result.reason}")
            return 0 if result.forwarding else 1
        if args.check:
            check = fbuild.check_map(cfg)
            _warnings(check.warnings, check.warning_count)
            if check.current:
                if not args.quiet:
                    print(f"forwarding map {cfg.map}: current ({check.entries} entries)")
                return 0
            for line in check.stale:
                print(line)
            return 1
        result = fbuild.build_map(cfg)
    except fbuild.ForwardingError as exc:
        print(f"exim-policy: forwardings: {exc}", file=sys.stderr)
        return 2
    _warnings(result.warnings, result.warning_count)
    if not args.quiet:
        state = "written" if result.changed else "unchanged"
        print(f"forwarding map {result.map_path}: {result.entries} entries, {state} "
              f"({result.aliases} aliases, {result.targets} targets, {result.sources} sources, "
              f"{result.seconds:.2f} s)")
    return 0
