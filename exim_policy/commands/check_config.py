"""exim-policy check-config: the same validation the daemon runs at start."""
from __future__ import annotations

import argparse

NAME = "check-config"
HELP = "validate a configuration file and print the effective settings"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config import DEFAULT_CONFIG_PATH

    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH,
                        help=f"TOML configuration (default {DEFAULT_CONFIG_PATH})")
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing when valid")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from .. import config as config_mod

    config = config_mod.load(args.config)  # ConfigError -> "config: key: why", exit 2
    if not args.quiet:
        print(f"{args.config}: OK")
        for section in dataclasses.fields(config):
            value = getattr(config, section.name)
            for item in dataclasses.fields(value):
                print(f"  {section.name}.{item.name} = {_show(getattr(value, item.name))}")
    return 0


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if hasattr(value, "value"):  # enums
        return str(value.value)
    return repr(value) if isinstance(value, str) else str(value)
