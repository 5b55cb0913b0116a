"""The engine of ``exim-policy test``: sources -> the daemon's evaluation -> results, in order.

Each message is read (:mod:`.inputs`) in a worker thread, so the event loop never blocks on
a disk; at most :data:`WINDOW` messages are in flight; results come back in input order.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ...config import Config, load
from ...forwarding.graph import Explanation
from ...forwarding.mapfile import ForwardingMap
from ...model import Decision
from ...pipeline import Evaluation, PolicyService
from ...protocol.mbox import strip_mbox_from_line
from ...scanner.rspamd import RspamdScanner
from ...state import open_store
from ...state.tracker import AccountTracker
from .envelope_guess import EnvelopeGuess, as_exim_sends, guess_envelope
from .exim_outcome import EXIM_MAX_SCAN_SIZE, EximOutcome, exim_outcome
from .inputs import Overrides, Source, UsageError, collect_sources, overrides_from

#: messages scanned at once: enough to overlap file reads and Rspamd round trips, few
#: enough that large messages do not pile up in memory
WINDOW = 4


@dataclass(frozen=True)
class Tested:
    source: Source
    size: int
    #: bytes Rspamd got (after --exim-mbox wrapping and the From_ line strip)
    scanned_size: int
    guess: EnvelopeGuess
    evaluation: Evaluation
    outcome: EximOutcome
    #: alias chains of the forwarding recipients; None when no sources are configured or
    #: they could not be read (then ``exim-policy forwardings explain`` is the way)
    chains: tuple[Explanation, ...] | None = None

    @property
    def decision(self) -> Decision:
        return self.evaluation.decision


@dataclass(frozen=True)
class InputFailed:
    """The message could not be read; the run goes on and ends with exit 2."""

    source: Source
    error: str



def forwarding_map(path: str) -> tuple[ForwardingMap, str | None]:
    """The map and, when it is empty for lack of a file, a note saying so."""
    try:
        return ForwardingMap.load(path), None
    except FileNotFoundError:
        why = "does not exist"
    except OSError as exc:
        why = f"cannot be read ({exc.strerror or exc})"
    return ForwardingMap(), (f"forwarding map {path} {why}: no recipient counts as forwarding "
                             "externally (a daemon starting now would use an empty map too)")


def _prepare(raw: bytes, overrides: Overrides, exim_mbox: bool) -> tuple[EnvelopeGuess, bytes]:
    guess = guess_envelope(raw, sender=overrides.sender, recipients=overrides.recipients,
                           user=overrides.user, ip=overrides.ip, helo=overrides.helo)
    body = as_exim_sends(raw, guess.envelope) if exim_mbox else raw
    return guess, body


class ChainExplainer:
    """Alias chains from the ``[forwarding]`` sources, as ``exim-policy forwardings explain``
    shows them. The sources are read once, in a thread, on first use (only a message with
    forwarding recipients needs them); with no sources, or sources that cannot be read,
    :meth:`explain` returns None and :attr:`note` says why once."""

    def __init__(self, config: Config) -> None:
        self.config = config.forwarding
        self.note: str | None = None
        self._graph = None
        self._loaded = False
        self._lock = asyncio.Lock()

    def _load(self):
        from ...forwarding import build

        try:
            return build.load_graph(self.config, detail=True)
        except (build.ForwardingError, OSError) as exc:
            self.note = (f"forwarding chains unavailable ({exc}); "
                         "see exim-policy forwardings explain ADDR")
            return None

    async def explain(self, addresses: tuple[str, ...]) -> tuple[Explanation, ...] | None:
        if not addresses or not self.config.sources:
            return None
        async with self._lock:
            if not self._loaded:
                self._graph = await asyncio.to_thread(self._load)
                self._loaded = True
        if self._graph is None:
            return None
        return tuple(self._graph.explain(a) for a in addresses)


class Runner:
    def __init__(self, config: Config, service: PolicyService, overrides: Overrides,
                 *, exim_mbox: bool, quarantine: str) -> None:
        self.config = config
        self.service = service
        self.overrides = overrides
        self.exim_mbox = exim_mbox
        self.quarantine = quarantine
        self.chains = ChainExplainer(config)

    async def one(self, source: Source) -> Tested | InputFailed:
        try:
            raw = await asyncio.to_thread(source.load)
        except OSError as exc:
            return InputFailed(source, f"cannot read: {exc.strerror or exc}")
        # header parsing and the CRLF->LF copy cost milliseconds on a 20 MB message
        guess, body = await asyncio.to_thread(_prepare, raw, self.overrides, self.exim_mbox)
        evaluation = await self.service.evaluate(guess.envelope, body)
        size, scanned_size = len(raw), len(strip_mbox_from_line(body))
        del raw, body  # a large message need not stay in memory while the chains load
        decision = evaluation.decision
        chains = await self.chains.explain(decision.forwarding) if decision.failure is None \
            else None
        return Tested(source, size, scanned_size, guess, evaluation,
                      exim_outcome(decision, quarantine=self.quarantine), chains)

    async def results(self, sources: list[Source]) -> AsyncIterator[Tested | InputFailed]:
        """Results in input order, at most :data:`WINDOW` in flight. Closing the iterator
        early (scanner failure) cancels whatever is still running."""
        queue = iter(sources)
        pending: collections.deque[asyncio.Task] = collections.deque()
        try:
            for source in queue:
                pending.append(asyncio.ensure_future(self.one(source)))
                if len(pending) >= WINDOW:
                    break
            while pending:
                result = await pending.popleft()
                following = next(queue, None)
                if following is not None:
                    pending.append(asyncio.ensure_future(self.one(following)))
                yield result
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


def main(args: argparse.Namespace, *, quarantine: str) -> int:
    """Run the command; returns the exit status (see the command's docstring)."""
    overrides = overrides_from(args)
    if not args.files and not args.mbox:
        raise UsageError("no message given (FILE, directory, --mbox FILE, or - for "
                         "standard input)")
    config = load(args.config)
    opened: list = []
    try:
        sources, errors = collect_sources(args.files, args.mbox, opened)
        return _run(args, config, overrides, quarantine, sources, errors)
    finally:
        for box in opened:
            box.close()


def _run(args: argparse.Namespace, config, overrides, quarantine: str,
         sources: list[Source], errors: list[str]) -> int:
    from . import render

    fmap, map_note = forwarding_map(config.forwarding.map)
    out = render.make_output(args, total=len(sources))
    if map_note:
        out.note(map_note)
    for error in errors:
        out.error(error)
    status = asyncio.run(_drive_all(args, config, fmap, overrides, quarantine, sources, out))
    out.finish()
    return 2 if errors else status


async def _drive_all(args: argparse.Namespace, config, fmap, overrides, quarantine: str,
                     sources: list[Source], out) -> int:
    """With accounts on, each message is shown with its account's state; nothing is
    recorded (the store is only read)."""
    accounts = AccountTracker(config, open_store(config.accounts)) \
        if config.accounts.enabled else None
    service = PolicyService(config, RspamdScanner.for_config(config.rspamd),
                            fmap.forwards, accounts, record=False)
    runner = Runner(config, service, overrides, exim_mbox=args.exim_mbox,
                    quarantine=quarantine)
    try:
        return await _drive(runner, sources, out)
    finally:
        if accounts is not None:
            await accounts.store.close()


async def _drive(runner: Runner, sources: list[Source], out) -> int:
    """Feed results to ``out`` in order; the exit status (a scanner failure stops at once)."""
    status = 0
    results = runner.results(sources)
    try:
        async for result in results:
            if isinstance(result, InputFailed):
                out.input_failed(result)
                status = 2
                continue
            failure = result.decision.failure
            if failure is not None:
                # no verdict is no policy outcome: stop, say why, exit 2
                hint = (" (Exim does not scan messages of 50M or more)"
                        if result.size >= EXIM_MAX_SCAN_SIZE else "")
                out.error(f"{result.source.label}: Rspamd gave no verdict: {failure.reason}"
                          f" (rspamd.url = {runner.config.rspamd.url}){hint}")
                return 2
            if runner.chains.note is not None:
                out.note(runner.chains.note)
                runner.chains.note = None  # once
            out.result(result)
            if status == 0 and not result.outcome.accepted_as_is:
                status = 1
    finally:
        await results.aclose()
    return status
