"""An SMTP sink on 127.0.0.1 that keeps every message it is given (aiosmtpd, in a thread).

Exim in the lab relays non-local domains here.  Each message is kept twice:
- in memory, as ``SinkMessage(mail_from, rcpt_tos, data)`` (``data`` is the DATA bytes as
  received, line endings included), readable from any thread through ``messages``;
- on disk, as ``<directory>/NNNNNN.eml`` with ``X-Sink-Mail-From:`` and ``X-Sink-Rcpt-To:``
  headers in front, for humans looking at a failed run.

aiosmtpd is imported lazily (``start()``), so importing the lab needs only the stdlib;
it comes with the ``test`` and ``lab`` extras.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

from .errors import LabError, LabUnavailable
from .ports import LOOPBACK, free_port


class SinkMessage(NamedTuple):
    """One accepted message; a tuple so ``mail_from, rcpts, data = msg`` works.

    ``mail_from`` is the address without angle brackets, "" for the null sender ``<>``.
    """

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes


class _Handler:
    """aiosmtpd handler: accept everything, hand it to the sink."""

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data = envelope.original_content or envelope.content or b""
        if isinstance(data, str):  # only with decode_data=True, which we do not use
            data = data.encode("utf-8", "surrogateescape")
        # aiosmtpd reports the null sender of a bounce as "<>"; keep it as "" like model.Envelope
        mail_from = envelope.mail_from or ""
        if mail_from == "<>":
            mail_from = ""
        number = self.sink._store(mail_from, tuple(envelope.rcpt_tos), data)
        return f"250 OK queued as sink-{number}"


class SmtpSink:
    """See the module docstring.  ``start()``/``stop()`` are idempotent."""

    def __init__(self, directory: str | os.PathLike[str], *, host: str = LOOPBACK,
                 port: int | None = None, keep_messages: bool = True) -> None:
        """``keep_messages=False``: the files only, nothing in :attr:`messages` (a long
        benchmark's hundred thousand messages would stay in memory)."""
        self.directory = Path(directory)
        self.keep_messages = keep_messages
        self.host = host
        self.port = port or 0
        self._fixed_port = port is not None
        self._controller: Any = None
        self._messages: list[SinkMessage] = []
        self._cond = threading.Condition()
        self._counter = itertools.count(1)

    # -------------------------------------------------------------- lifecycle --
    def start(self) -> None:
        """Listen on ``host:port`` (a free port unless one was given); returns when ready."""
        if self._controller is not None:
            return
        try:
            from aiosmtpd.controller import Controller
        except ImportError:
            raise LabUnavailable("aiosmtpd missing: pip install -e . "
                                 "(or the Debian package python3-aiosmtpd)") from None
        self.directory.mkdir(parents=True, exist_ok=True)
        last: Exception | None = None
        for _attempt in range(1 if self._fixed_port else 3):
            if not self._fixed_port:
                self.port = free_port(self.host)
            controller = Controller(_Handler(self), hostname=self.host, port=self.port,
                                    ready_timeout=10.0, enable_SMTPUTF8=True,
                                    server_hostname="sink.lab.test")
            try:
                controller.start()
            except Exception as exc:  # aiosmtpd re-raises the bind error of its thread
                last = exc
                continue
            self._controller = controller
            return
        raise LabError(f"SMTP sink could not listen on {self.host}:{self.port}: {last}")

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpSink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --------------------------------------------------------------- messages --
    def _store(self, mail_from: str, rcpt_tos: tuple[str, ...], data: bytes) -> int:
        """Called from the server thread; writes the file first, then publishes the message."""
        number = next(self._counter)
        path = self.directory / f"{number:06d}.eml"
        tmp = self.directory / f".{number:06d}.eml.tmp"
        head = (f"X-Sink-Mail-From: <{mail_from}>\r\n"
                f"X-Sink-Rcpt-To: {', '.join(f'<{r}>' for r in rcpt_tos)}\r\n")
        with open(tmp, "wb") as fh:
            fh.write(head.encode("utf-8", "surrogateescape") + data)
        os.replace(tmp, path)
        if not self.keep_messages:
            return number
        with self._cond:
            self._messages.append(SinkMessage(mail_from, rcpt_tos, data))
            self._cond.notify_all()
        return number

    @property
    def messages(self) -> list[SinkMessage]:
        """A copy of the messages received since the last ``clear()``, oldest first."""
        with self._cond:
            return list(self._messages)

    def clear(self) -> None:
        """Forget the in-memory messages (the .eml files stay, numbering continues)."""
        with self._cond:
            self._messages.clear()

    def wait_for(self, count: int, timeout: float) -> list[SinkMessage]:
        """Wait until at least ``count`` messages are held; returns them all.

        Raises ``TimeoutError`` (saying how many arrived) when ``timeout`` seconds pass first.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"SMTP sink {self.host}:{self.port}: {len(self._messages)} "
                                       f"message(s) after {timeout}s, expected {count}")
                self._cond.wait(remaining)
            return list(self._messages)

    def __repr__(self) -> str:
        return f"<SmtpSink {self.host}:{self.port} messages={len(self.messages)}>"
