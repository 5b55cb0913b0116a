"""exim-policy serve: the spamd-protocol shim in front of Rspamd."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config
    from ..workers import WorkerRole

NAME = "serve"
HELP = "run the spamd-compatible shim that Exim's spamd_address points at"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config import DEFAULT_CONFIG_PATH

    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH,
                        help=f"TOML configuration (default {DEFAULT_CONFIG_PATH})")


def loop_factory(choice: str):
    """The event loop constructor for ``server.event_loop`` ("auto", "asyncio", "uvloop")."""
    import asyncio

    if choice == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            from ..config import ConfigError

            raise ConfigError("server.event_loop: uvloop is not installed "
                              "(pip install uvloop into exim-policy's venv)") from None
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(args: argparse.Namespace) -> int:
    import sys

    from .. import config as config_mod

    config = config_mod.load(args.config)
    if config.server.workers == 1:
        return serve(config, args.config)
    from ..workers import Supervisor

    try:
        return Supervisor(config, args.config).run()
    except OSError as exc:  # e.g. the listen address is taken
        print(f"exim-policy: cannot serve: {exc}", file=sys.stderr)
        return 2


def serve(config: Config, config_path: str | Path | None,
          worker: WorkerRole | None = None) -> int:
    """One daemon process: the only one, or ``worker`` (a
    :class:`~exim_policy.workers.WorkerRole`) of several; the exit status."""
    import asyncio
    import sys

    from .. import daemon
    from ..logs import start_logging

    log_output = start_logging(config.logging)
    if worker is not None:
        from ..workers import WorkerFormatter

        writer = log_output.writer
        writer.setFormatter(WorkerFormatter(writer.formatter, worker.index))
    new_loop = loop_factory(config.server.event_loop)
    loop = new_loop()
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(daemon.run(config, config_path=config_path,
                                           log_output=log_output, worker=worker))
    except OSError as exc:  # e.g. the listen address is taken
        print(f"exim-policy: cannot serve: {exc}", file=sys.stderr)
        return 2
    finally:
        asyncio.set_event_loop(None)
        loop.close()
        log_output.stop()  # writes what is still waiting
    return 0
