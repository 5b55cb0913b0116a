"""``exim-policy`` command line: argparse subcommands, each in exim_policy/commands/.

``main(argv)`` returns the exit status. Expected failures (bad config, unreachable
Rspamd, unreadable input) print one clear line on stderr and exit 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .commands import MODULES


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only`` (a subcommand name), import just that command's module:
    ``exim-policy query`` runs once per recipient from Exim's ${run}, and importing every
    command (the demo pulls in smtplib and email) would slow each call down."""
    parser = argparse.ArgumentParser(
        prog="exim-policy",
        description="Outbound- and forwarding-spam policy layer for Exim + Rspamd.")
    parser.add_argument("--version", action="version", version=f"exim-policy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in MODULES:
        if only is not None and command_name(name) != only:
            continue
        module = importlib.import_module(f".commands.{name}", __package__)
        cmd = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(handler=module.run)
    return parser


def command_name(module: str) -> str:
    """Module ``check_config`` is the subcommand ``check-config``."""
    return module.replace("_", "-")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    known = {command_name(m) for m in MODULES}
    parser = build_parser(argv[0] if argv and argv[0] in known else None)
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return 2
    from .config import ConfigError

    try:
        return args.handler(args)
    except ConfigError as exc:
        for error in exc.errors or (str(exc),):
            print(f"exim-policy: config: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
