"""How ``exim-policy test`` shows its results: rich panels and tables, or JSON lines.

:func:`make_output` picks one; both take the same calls: ``note``/``error`` (stderr, one
line each), ``input_failed`` (a message that could not be read), ``result`` (one tested
message, in input order) and ``finish`` (after the last one). rich is imported only here,
and this module only by the command, so the daemon never loads it.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from .envelope_guess import display_text
from .exim_outcome import ACCEPTED, EXIM_MAX_SCAN_SIZE, MARKED, REDIRECTED, REJECTED, TEMPFAIL

if TYPE_CHECKING:  # pragma: no cover
    from .engine import InputFailed, Tested

PREFIX = "exim-policy: test: "

#: colour per Exim outcome
STYLES = {REJECTED: "red", REDIRECTED: "magenta", TEMPFAIL: "yellow", MARKED: "dark_orange",
          ACCEPTED: "green"}

#: longest options text shown per symbol in the table (Rspamd lists every URL, ...)
MAX_OPTIONS_CHARS = 120


def make_output(args: argparse.Namespace, *, total: int) -> JsonOutput | RichOutput:
    if args.json:
        return JsonOutput()
    return RichOutput(total=total, panels=not args.brief)


# -------------------------------------------------------------------------- plain data --
def envelope_dict(result: Tested) -> dict:
    env = result.guess.envelope

    def show(value: str | None) -> str | None:
        return display_text(value) if value is not None else None

    return {
        "sender": show(env.sender),
        "sender_source": result.guess.sender_source,
        "recipients": [display_text(r) for r in env.recipients],
        "recipients_source": result.guess.recipients_source,
        "user": show(env.user),
        "ip": env.ip,
        "helo": show(env.helo),
    }


def result_dict(result: Tested) -> dict:
    """One message as a JSON-ready dict (the ``--json`` line)."""
    decision = result.decision
    scan = decision.scan
    data = {
        "file": result.source.path,
        **({"mbox_index": result.source.mbox_index}
           if result.source.mbox_index is not None else {}),
        "size": result.size,
        "scanned_size": result.scanned_size,
        "envelope": envelope_dict(result),
        "direction": decision.traffic.value,
        "direction_reason": decision.traffic_reason,
        "forwarding": [display_text(r) for r in decision.forwarding],
        # None: not scanned (an account over its limit is refused whatever Rspamd says)
        "scanner": None if scan is None else {
            "action": scan.action,
            "score": scan.score,
            "required_score": scan.required_score,
            "symbols": [{"name": s.name, "score": s.score, "options": list(s.options),
                         "description": s.description} for s in scan.symbols],
            "messages": dict(scan.messages),
            "subject": scan.subject,
            "message_id": scan.message_id,
        },
        "account": account_dict(decision.account),
        "context_symbols": [{"name": s.name, "score": s.score, "options": list(s.options)}
                            for s in decision.symbols],
        "action": decision.action,
        "reason": decision.reason,
        "exim": {"outcome": result.outcome.outcome, "smtp_code": result.outcome.smtp_code,
                 "message": result.outcome.message},
    }
    if result.chains is not None:
        data["forwarding_chains"] = [
            {"address": ex.address, "forwarding": ex.forwarding, "reason": ex.reason,
             "chains": [[{"address": h.address, "source": h.source, "key": h.key}
                         for h in chain] for chain in ex.chains]}
            for ex in result.chains]
    return data


def account_dict(outcome) -> dict | None:
    """The account part: its state now, and what this message would record (nothing is)."""
    if outcome is None:
        return None
    event = outcome.event
    return {
        "account": outcome.account,
        "status": outcome.status.value,
        "limit": outcome.limit,
        "shadow": outcome.shadow,
        "store_failed": outcome.store_failed,
        "would_record": None if event is None else {
            "counted": event.counted, "spam_verdict": event.spam,
            "recipients": len(event.recipients)},
        "would_transition": [{"kind": t.kind.value, "to": t.to.value, "mode": t.mode,
                              "reason": t.reason} for t in outcome.transitions],
    }


def account_text(outcome) -> str:
    """One line for the panel: the account's state and what this message would add."""
    if outcome.store_failed:
        return f"{outcome.account}: the account store is unreachable (nothing counted)"
    event = outcome.event
    adds = (f"would count 1 message, {len(event.recipients)} recipient(s)" if event.counted
            else f"would not count (over its limit: {outcome.limit})")
    if event.spam:
        adds += " and 1 spam verdict"
    steps = "".join(f"; would open an incident ({t.mode}): {t.reason}"
                    if t.kind.value == "opened" else f"; would lock the account: {t.reason}"
                    for t in outcome.transitions)
    shadow = " [shadow mode]" if outcome.shadow else ""
    return f"{outcome.account}: {outcome.status.value}{shadow}; {adds}{steps}"


class JsonOutput:
    """One JSON object per line per message on stdout; notes and errors on stderr."""

    def note(self, text: str) -> None:
        print(f"{PREFIX}note: {text}", file=sys.stderr)

    def error(self, text: str) -> None:
        print(f"{PREFIX}{text}", file=sys.stderr)

    def input_failed(self, failed: InputFailed) -> None:
        self.error(f"{failed.source.label}: {failed.error}")

    def result(self, result: Tested) -> None:
        print(json.dumps(result_dict(result)), flush=True)

    def finish(self) -> None:
        pass


# --------------------------------------------------------------------------------- rich --
def _sorted_symbols(symbols):
    return sorted(symbols, key=lambda s: (-abs(s.score), s.name))


def _options_text(options: tuple[str, ...]) -> str:
    text = ", ".join(options)
    return text if len(text) <= MAX_OPTIONS_CHARS else text[:MAX_OPTIONS_CHARS - 1] + "…"


class RichOutput:
    """Panels (unless ``panels`` is false), then a summary table when there were several
    messages. A progress bar runs while several messages are tested and a terminal shows
    it: on stdout's console when stdout is a terminal, else on stderr's."""

    def __init__(self, *, total: int, panels: bool) -> None:
        from rich.console import Console

        self.total = total
        self.panels = panels
        self.console = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)
        self.rows: list[tuple] = []
        self.progress = None
        self.task = None
        if total > 1 and (self.console.is_terminal or self.err.is_terminal):
            self._start_progress()

    def _start_progress(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        on_stdout = self.console.is_terminal
        self.progress = Progress(TextColumn("testing"), BarColumn(), MofNCompleteColumn(),
                                 console=self.console if on_stdout else self.err,
                                 transient=True, redirect_stdout=False, redirect_stderr=False)
        self.task = self.progress.add_task("test", total=self.total)
        self.progress.start()

    def _advance(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)

    def note(self, text: str) -> None:
        self.err.print(f"{PREFIX}note: {text}", style="yellow", markup=False,
                       soft_wrap=True)

    def error(self, text: str) -> None:
        self.err.print(f"{PREFIX}{text}", style="bold red", markup=False,
                       soft_wrap=True)

    def input_failed(self, failed: InputFailed) -> None:
        self.error(f"{failed.source.label}: {failed.error}")
        self.rows.append((failed.source.label, "-", "-", "-", "-", "unreadable", "red"))
        self._advance()

    def result(self, result: Tested) -> None:
        decision, scan, outcome = result.decision, result.decision.scan, result.outcome
        style = STYLES.get(outcome.outcome, "white")
        self.rows.append((result.source.label, decision.traffic.value,
                          scan.action if scan else "(not asked)",
                          f"{scan.score:.2f}/{scan.required_score:.2f}" if scan else "-",
                          decision.action, outcome.outcome, style))
        if self.panels:
            self.console.print(self._panel(result, style))
        self._advance()

    def _panel(self, result: Tested, style: str):
        from rich import box
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        decision, scan, outcome = result.decision, result.decision.scan, result.outcome
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        grid.add_row("Message", Text(result.source.label, overflow="fold"))
        grid.add_row("Envelope", Text(self._envelope_text(result)))
        grid.add_row("Direction", Text.assemble((decision.traffic.value, "bold"), "  ",
                                                decision.traffic_reason))
        grid.add_row("Forwarding", Text(self._forwarding_text(result)))
        rspamd = Text()
        if scan is None:
            rspamd.append("not asked: the account is over a limit, the answer is 451 anyway")
        else:
            rspamd.append(scan.action, style="bold")
            rspamd.append(f", score {scan.score:.2f} / {scan.required_score:.2f}")
            if scan.is_skipped:
                rspamd.append(" (is_skipped: a pre-result, the other rules did not run)")
            for key, text in scan.messages:
                rspamd.append(f"\n{key + ': ' if key else ''}{text}")
        grid.add_row("Rspamd", rspamd)
        if decision.account is not None:
            grid.add_row("Account", Text(account_text(decision.account)))
        final = Text()
        final.append(decision.action, style=f"bold {style}")
        final.append(f": {decision.reason}")
        grid.add_row("Decision", final)
        grid.add_row("Exim", Text(outcome.message, style=f"bold {style}"))
        if result.size >= EXIM_MAX_SCAN_SIZE:
            grid.add_row("Note", Text("the bundled Exim config does not scan messages of 50M "
                                      "or more (EXIM_POLICY_MAX_SCAN_SIZE): accepted unscanned"))

        symbols = Table(box=box.SIMPLE_HEAD, expand=False, show_edge=False, pad_edge=False)
        symbols.add_column("Symbol", no_wrap=True)
        symbols.add_column("Score", justify="right", no_wrap=True)
        symbols.add_column("Options")
        for sym in _sorted_symbols(scan.symbols if scan else ()):
            score_style = "red" if sym.score > 0 else "green" if sym.score < 0 else "dim"
            symbols.add_row(Text(sym.name), Text(f"{sym.score:.2f}", style=score_style),
                            Text(_options_text(sym.options)))
        for sym in decision.symbols:  # the shim's context symbols, sent to Exim as well
            symbols.add_row(Text(sym.name, style="cyan"), Text(f"{sym.score:.2f}", style="dim"),
                            Text(_options_text(tuple(display_text(o) for o in sym.options))))
        title = Text(outcome.outcome.upper(), style=f"bold {style}")
        return Panel(Group(grid, Text(""), symbols), title=title, title_align="left",
                     border_style=style)

    @staticmethod
    def _envelope_text(result: Tested) -> str:
        env, guess = result.guess.envelope, result.guess
        if env.sender is None:
            sender = "no sender"
        else:
            sender = f"from <{display_text(env.sender)}>"
        lines = [f"{sender} ({guess.sender_source})"]
        rcpts = ", ".join(display_text(r) for r in env.recipients) or "no recipients"
        lines.append(f"to {rcpts} ({guess.recipients_source})")
        who = (f"authenticated as {display_text(env.user)}" if env.user is not None
               else "unauthenticated")
        lines.append(f"{who}, IP {env.ip or 'none'}, "
                     f"HELO {display_text(env.helo) if env.helo else 'none'}")
        return "\n".join(lines)

    @staticmethod
    def _forwarding_text(result: Tested) -> str:
        forwarding = result.decision.forwarding
        if not forwarding:
            return "no recipient forwards externally"
        lines = [f"{display_text(r)} forwards externally (forwarding map)" for r in forwarding]
        if result.chains is None:
            lines.append("alias chains: exim-policy forwardings explain ADDR")
        else:
            for ex in result.chains:
                if not ex.chains:
                    lines.append(f"{ex.address}: sources say: {ex.reason}")
                for chain in ex.chains:
                    hops = " -> ".join(h.address for h in chain)
                    origins = ", ".join(h.source for h in chain if h.source)
                    lines.append(f"{hops}  ({origins})" if origins else hops)
        return "\n".join(lines)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if len(self.rows) > 1:
            self._summary()

    def _summary(self) -> None:
        from rich.table import Table
        from rich.text import Text

        table = Table(title="Summary", title_justify="left")
        for name, justify in (("#", "right"), ("Message", "left"), ("Direction", "left"),
                              ("Rspamd", "left"), ("Score", "right"), ("Action", "left"),
                              ("Exim", "left")):
            table.add_column(name, justify=justify, overflow="fold", no_wrap=name != "Message")
        counts: dict[str, int] = {}
        for i, (label, direction, rspamd, score, action, outcome, style) in \
                enumerate(self.rows, 1):
            counts[outcome] = counts.get(outcome, 0) + 1
            table.add_row(str(i), Text(label), direction, rspamd, score, action,
                          Text(outcome, style=f"bold {style}"))
        self.console.print(table)
        order = (ACCEPTED, MARKED, REJECTED, REDIRECTED, TEMPFAIL, "unreadable")
        parts = [f"{counts[k]} {k}" for k in order if counts.get(k)]
        self.console.print(f"{len(self.rows)} messages: " + ", ".join(parts), markup=False)
