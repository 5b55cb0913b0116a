"""exim-policy check-config: the same validation the daemon runs at start, every error at
once; then the effective configuration as TOML (every key, defaults included: it reads
back to the same settings), and warnings for files the configuration names that are not
there (the daemon starts without them, but protects less)."""
from __future__ import annotations

import argparse
import os
import sys

NAME = "check-config"
HELP = "validate a configuration file and print the effective settings as TOML"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config import DEFAULT_CONFIG_PATH

    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH,
                        help=f"TOML configuration (default {DEFAULT_CONFIG_PATH})")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="print nothing when valid (warnings still go to stderr)")


def run(args: argparse.Namespace) -> int:
    from .. import config as config_mod

    config = config_mod.load(args.config)  # ConfigError -> one line per error, exit 2
    for warning in warnings(config):
        print(f"exim-policy: warning: {warning}", file=sys.stderr)
    if not args.quiet:
        print(f"# {args.config}: OK; the effective configuration, every key:")
        sys.stdout.write(config_mod.to_toml(config))
    return 0


def warnings(config) -> list[str]:
    """Files the configuration names that do not exist (not errors: the daemon starts and
    picks them up when they appear, or a builder creates them)."""
    out = []
    forwarding = config.forwarding
    if not os.path.exists(forwarding.map):
        out.append(f"forwarding.map: {forwarding.map} does not exist: no recipient counts as "
                   "forwarding until it does (exim-policy forwardings build writes it)")
    for i, source in enumerate(forwarding.sources):
        if not os.path.exists(source.path):
            out.append(f"forwarding.sources[{i}].path: {source.path} does not exist")
    if forwarding.local_domains_file and not os.path.exists(forwarding.local_domains_file):
        out.append(f"forwarding.local_domains_file: {forwarding.local_domains_file} does not "
                   "exist")
    return out
