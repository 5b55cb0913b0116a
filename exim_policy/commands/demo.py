"""exim-policy demo: the whole chain on loopback, and what happens to each kind of mail.

Starts, in a fresh temp dir, everything the production setup has: an NXDOMAIN-only DNS
responder (so nothing leaves the machine), Rspamd 3.4, the shim (``exim-policy serve``),
Exim 4.96 running the bundled exim/exim.conf, and an SMTP sink standing in for the
Internet.  Then it sends one message per scenario through Exim with smtplib, looks where
each ended up (a Maildir, the quarantine, the sink, nowhere) and prints a table.  The
stack and the scenarios are the lab's (:mod:`exim_policy.lab.scenarios`); this module
checks the prerequisites, runs them and shows the results.

Exit status: 0 if every scenario matched its expectation, 1 if one did not, 2 if the
demo cannot run here (not root, a package missing, a component failed to start), 130 on
Ctrl-C.  Whatever it started is stopped on every path out (normal end, error, Ctrl-C,
SIGTERM).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import smtplib
import sys
import tempfile
import threading
from pathlib import Path

NAME = "demo"
HELP = "run Rspamd, the shim, Exim and an SMTP sink on loopback and show the outcomes"
#: set by SIGINT/SIGTERM (see run())
INTERRUPTED = threading.Event()

#: binary -> Debian package that provides it
REQUIRED_BINARIES = {
    "rspamd": "rspamd",
    "exim": "exim4-daemon-heavy",
    "openssl": "openssl",
    "setpriv": "util-linux",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep", action="store_true",
                        help="keep the temp dir (configs, logs, Maildirs) after the run")


def missing_prerequisites() -> list[str]:
    """Human-readable problems that stop the demo; empty when it can run."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root: it starts Rspamd and Exim as their service users "
                        f"(try: sudo {sys.executable} -m exim_policy demo)")
    missing = sorted({pkg for binary, pkg in REQUIRED_BINARIES.items()
                      if shutil.which(binary) is None})
    if missing:
        problems.append(f"missing Debian package(s): {' '.join(missing)} (apt-get install "
                        f"{' '.join(missing)} as root, or in a checkout: bash contrib/setup.sh)")
    if importlib.util.find_spec("aiosmtpd") is None:  # the SMTP sink
        problems.append("missing Python package aiosmtpd: pip install -e .")
    from ..lab.errors import LabUnavailable
    from ..lab.exim import find_exim_dir

    try:
        find_exim_dir()  # the demo runs the shipped exim/ configuration
    except LabUnavailable as exc:
        problems.append(str(exc))
    return problems


def run(args: argparse.Namespace) -> int:
    problems = missing_prerequisites()
    if problems:
        for problem in problems:
            print(f"exim-policy demo: {problem}", file=sys.stderr)
        return 2

    # SIGTERM must unwind like Ctrl-C, so that the finally blocks stop the daemons. Both
    # are remembered too: the KeyboardInterrupt can be lost on the way (smtplib's
    # "with" block says QUIT, reads the reply the interrupted DATA left unread and raises
    # that instead), so the scenario loop asks INTERRUPTED as well
    def _interrupt(_signum: int, _frame: object) -> None:
        INTERRUPTED.set()
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _main(keep=args.keep)
    except KeyboardInterrupt:
        print("exim-policy demo: interrupted; everything it started was stopped",
              file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------- main --
def _main(keep: bool) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from ..lab import LabError, LabUnavailable
    from ..lab.scenarios import Result, Scenario, Stack, scenarios

    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="exim-policy-demo-"))
    workdir.chmod(0o755)  # the service users (_rspamd, Debian-exim) must get in
    stack = Stack(workdir)
    results: list[tuple[Scenario, Result | None, bool, str]] = []
    try:
        with console.status("starting") as status:
            try:
                stack.start(lambda text: status.update(text))
            except (LabUnavailable, LabError, RuntimeError) as exc:
                console.print(f"[red]exim-policy demo: a component did not start:[/] {exc}")
                return 2
            exim = stack.exim
            console.print(f"Rspamd {stack.lab.rspamd.url} | shim 127.0.0.1:{stack.shim.port} "
                          f"| Exim 127.0.0.1 + [::1]:{exim.port} | sink 127.0.0.1:"
                          f"{stack.lab.sink.port} | work dir {workdir}")
            for number, scenario in enumerate(scenarios(), 1):
                status.update(f"scenario {number}: {scenario.title}")
                try:
                    outcome = scenario.action(stack)
                except (OSError, smtplib.SMTPException, TimeoutError, LabError,
                        RuntimeError) as exc:
                    if INTERRUPTED.is_set():  # the interrupt, hidden by another exception
                        raise KeyboardInterrupt from exc
                    results.append((scenario, None, False, f"error: {exc}"))
                    continue
                ok = outcome.code == scenario.code and (
                    sorted(outcome.places) == sorted(scenario.places))
                results.append((scenario, outcome, ok, ""))
    finally:
        stack.stop()
        if keep:
            console.print(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    table = Table(title="exim-policy demo: Exim 4.96 -> shim -> Rspamd 3.4, on loopback",
                  show_lines=True)
    for column in ("#", "scenario", "expected", "SMTP reply", "ended up in", "result"):
        table.add_column(column, overflow="fold")
    for number, (scenario, outcome, ok, error) in enumerate(results, 1):
        table.add_row(str(number), escape(scenario.title), escape(scenario.expected),
                      escape(outcome.reply if outcome else error),
                      escape("\n".join(outcome.places)) if outcome and outcome.places
                      else "nowhere",
                      "[green]PASS[/]" if ok else "[red]FAIL[/]")
    console.print(table)
    for error in stack.errors:
        console.print(f"[yellow]while stopping: {error}[/]")
    passed = sum(1 for _, _, ok, _ in results if ok)
    console.print(f"{passed} of {len(results)} scenarios as expected")
    return 0 if passed == len(results) == len(scenarios()) else 1
