"""``exim-policy test [FILE|DIR|-]... [--mbox FILE]...``: what Exim would do with a message.

Each message goes through :meth:`exim_policy.pipeline.PolicyService.evaluate`, the daemon's
own path (same Rspamd request, same ``decide()``), with an :class:`RspamdScanner` built
from ``[rspamd]`` and the forwarding map ``[forwarding] map`` loaded once (a missing or
unreadable map is an empty map, as for a daemon starting without one; a note says so).
Nothing is counted or written.

The envelope is derived from the message (see :mod:`.envelope_guess`: From: -> sender,
To:/Cc: -> recipients, or Exim's X-Envelope-* pseudo-headers) unless given with
``--from``/``--rcpt``; ``--user``, ``--ip`` and ``--helo`` have no default (unauthenticated,
no client IP: Rspamd then runs no IP checks, like a locally submitted message; pass ``--ip``
to test as a real SMTP client). ``--exim-mbox`` wraps each message the way Exim does before
scanning, so the scan matches what the daemon sees behind Exim.

Output: a rich panel per message (``--brief``: none), a summary table for several, a
progress bar when a terminal is attached; ``--json``: one JSON object per line per message.

Exit status: 0 when every message would be accepted as is (no action, add header, rewrite
subject, greylist, ...); 1 when any would be rejected, redirected to the quarantine or
tempfailed; 2 for usage and input errors (unreadable file, empty directory or mbox) and when
Rspamd gives no verdict (unreachable, timeout, HTTP error) -- that stops the run at once and
is never shown as a policy outcome.

The package: :mod:`.inputs` (the messages to test and the envelope options),
:mod:`.engine` (the daemon's evaluation, in order, a few at a time), :mod:`.render` (panels,
tables or JSON lines; rich is imported there only), :mod:`.envelope_guess` (an envelope for
a stored message) and :mod:`.exim_outcome` (what the bundled Exim configuration does with a
decision).
"""
from __future__ import annotations

import argparse

NAME = "test"
HELP = "show what Exim would do with messages, and why (the daemon's code path, no side effects)"

QUARANTINE_TEXT = "the quarantine address (EXIM_POLICY_QUARANTINE)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ...config import DEFAULT_CONFIG_PATH

    parser.add_argument("files", nargs="*", metavar="FILE",
                        help="message file, directory (every file inside, sorted, "
                             "recursively) or - for standard input")
    parser.add_argument("--config", metavar="PATH", default=DEFAULT_CONFIG_PATH,
                        help=f"TOML configuration (default {DEFAULT_CONFIG_PATH})")
    parser.add_argument("--mbox", metavar="FILE", action="append", default=[],
                        help="test every message of an mbox file (repeatable)")
    parser.add_argument("--exim-mbox", action="store_true",
                        help="wrap each message as Exim does before scanning (From_ line, "
                             "X-Envelope-From/To, LF line ends)")
    envelope = parser.add_argument_group(
        "envelope", "default: sender from From:, recipients from To: and Cc: (or Exim's "
                    "X-Envelope-* pseudo-headers), unauthenticated, no client IP or HELO")
    envelope.add_argument("--from", dest="sender", metavar="ADDR",
                          help="envelope sender (<> for a bounce)")
    envelope.add_argument("--rcpt", action="append", default=[], metavar="ADDR",
                          help="envelope recipient (repeatable)")
    envelope.add_argument("--user", metavar="ID",
                          help="authenticated id (makes the message outbound)")
    envelope.add_argument("--ip", metavar="ADDR",
                          help="client IP address (default: none, as for a message "
                               "submitted locally; use 127.0.0.1 to mimic a loopback client)")
    envelope.add_argument("--helo", metavar="NAME", help="client HELO name")
    parser.add_argument("--quarantine", metavar="ADDR", default=None,
                        help=f"quarantine address to name in the outcome (default: "
                             f"\"{QUARANTINE_TEXT}\")")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per line per message, for scripts")
    parser.add_argument("--brief", action="store_true",
                        help="no panel per message, only the summary table")


def run(args: argparse.Namespace) -> int:
    import sys

    from .engine import main
    from .inputs import UsageError

    try:
        return main(args, quarantine=args.quarantine or QUARANTINE_TEXT)
    except UsageError as exc:
        print(f"exim-policy: test: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (``... | head``): stop quietly; point stdout at /dev/null so
        # that the interpreter's final flush does not complain again
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 2
