"""The inputs of ``exim-policy test``: the messages to test and the envelope options.

Inputs are collected first (paths checked, directories walked, mbox files indexed) and read
later, one by one: each :class:`Source` carries a ``load`` that the engine calls in a worker
thread, so a large directory is never held in memory at once. Problems are one line each
(no traceback): :class:`UsageError` for options, a list of input errors for files.
"""
from __future__ import annotations

import argparse
import mailbox
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...protocol.text import valid_ip
from .envelope_guess import wire_text


class UsageError(Exception):
    """Bad options or no input at all: one line, exit 2."""


@dataclass(frozen=True)
class Source:
    """One message to test. ``load`` reads it (blocking; raises OSError)."""

    label: str              # for people: the path, "path (message 3)" or "-"
    path: str
    mbox_index: int | None  # 1-based position in an mbox file
    load: Callable[[], bytes]



@dataclass(frozen=True)
class Overrides:
    """Envelope parts given on the command line, in wire form."""

    sender: str | None = None
    recipients: tuple[str, ...] = ()
    user: str | None = None
    ip: str | None = None
    helo: str | None = None


def overrides_from(args: argparse.Namespace) -> Overrides:
    ip = None
    if args.ip is not None:
        ip = valid_ip(args.ip)
        if ip is None:
            raise UsageError(f"--ip: {args.ip!r} is not an IP address")
    if args.user is not None and not args.user.strip():
        raise UsageError("--user: empty (leave it out for an unauthenticated message)")
    for name, value in (("--from", args.sender), ("--user", args.user), ("--helo", args.helo),
                        *(("--rcpt", r) for r in args.rcpt)):
        if value is not None and any(c in value for c in "\r\n\0"):
            raise UsageError(f"{name}: control characters are not allowed")
    return Overrides(
        sender=wire_text(args.sender) if args.sender is not None else None,
        recipients=tuple(wire_text(r) for r in args.rcpt if r.strip()),
        user=wire_text(args.user.strip()) if args.user is not None else None,
        ip=ip,
        helo=wire_text(args.helo) if args.helo else None,
    )



def _read_file(path: str) -> Callable[[], bytes]:
    def load() -> bytes:
        with open(path, "rb") as fh:
            return fh.read()
    return load


def _read_stdin() -> bytes:
    return sys.stdin.buffer.read()


def _walk(directory: str, errors: list[str]) -> list[Source]:
    """Every file under ``directory``, sorted by path components (so ``a/z`` before ``b``)."""
    found: list[tuple[tuple[str, ...], str]] = []
    errors_before = len(errors)

    def onerror(exc: OSError) -> None:
        errors.append(f"{exc.filename}: cannot list: {exc.strerror or exc}")

    for root, dirs, files in os.walk(directory, onerror=onerror):
        dirs.sort()
        for name in files:
            path = os.path.join(root, name)
            if os.path.isfile(path):  # skips sockets, FIFOs and dangling links
                found.append((Path(os.path.relpath(path, directory)).parts, path))
    found.sort()
    if not found and len(errors) == errors_before:
        errors.append(f"{directory}: no files in this directory")
    return [Source(path, path, None, _read_file(path)) for _, path in found]


def _mbox_sources(path: str, errors: list[str], opened: list) -> list[Source]:
    """The messages of an mbox file, each with its ``From `` line (which the evaluation
    strips, as the daemon strips Exim's). The open mailbox is appended to ``opened``: the
    caller closes it after the run (messages are read lazily, from worker threads)."""
    if os.path.isdir(path):
        errors.append(f"{path}: is a directory, not an mbox file")
        return []
    try:
        box = mailbox.mbox(path, create=False)
        keys = box.keys()  # indexes the file: finds every "From " line
    except mailbox.NoSuchMailboxError:
        errors.append(f"{path}: no such file")
        return []
    except OSError as exc:
        errors.append(f"{path}: cannot read: {exc.strerror or exc}")
        return []
    opened.append(box)
    if not keys:
        errors.append(f"{path}: no messages in this mbox file")
        return []
    lock = threading.Lock()  # one file object, read from worker threads

    def loader(key: int) -> Callable[[], bytes]:
        def load() -> bytes:
            with lock:
                return box.get_bytes(key, from_=True)
        return load

    return [Source(f"{path} (message {i})", path, i, loader(key))
            for i, key in enumerate(keys, 1)]


def collect_sources(files: list[str], mboxes: list[str],
                    opened: list) -> tuple[list[Source], list[str]]:
    """Sources in command-line order, and input errors (each one line, no traceback).
    Mailboxes opened for ``--mbox`` are appended to ``opened`` (close them when done)."""
    sources: list[Source] = []
    errors: list[str] = []
    stdin_used = False
    for name in files:
        if name == "-":
            if stdin_used:
                raise UsageError("- (standard input) given more than once")
            stdin_used = True
            sources.append(Source("-", "-", None, _read_stdin))
        elif os.path.isdir(name):
            sources.extend(_walk(name, errors))
        elif os.path.exists(name):
            sources.append(Source(name, name, None, _read_file(name)))
        else:
            errors.append(f"{name}: no such file or directory")
    for name in mboxes:
        sources.extend(_mbox_sources(name, errors, opened))
    return sources, errors
