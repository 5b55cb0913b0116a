"""exim-policy serve: the spamd-protocol shim in front of Rspamd."""
from __future__ import annotations

import argparse

NAME = "serve"
HELP = "run the spamd-compatible shim that Exim's spamd_address points at"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config import DEFAULT_CONFIG_PATH

    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH,
                        help=f"TOML configuration (default {DEFAULT_CONFIG_PATH})")


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import sys

    from .. import config as config_mod
    from .. import daemon

    config = config_mod.load(args.config)
    logging.basicConfig(
        level=config.logging.level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(daemon.run(config))
    except OSError as exc:  # e.g. the listen address is taken
        print(f"exim-policy: cannot serve: {exc}", file=sys.stderr)
        return 2
    return 0
