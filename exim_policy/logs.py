"""The daemon's log output: text or JSON lines, to stderr or syslog, written off the
event loop's thread (:class:`LogWriter`), in batches.

A record may carry structured fields in ``record.fields``: a dict, or a function returning
one, called only when the format needs it (the decision line does that:
``log.info(text, *args, extra={"fields": lambda: {...}})``); the JSON format writes them
as keys of their own, the text format only the message.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import os
import stat
import sys
import threading
import time

from .config import ConfigError, LoggingConfig

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: syslog adds the time and host itself
SYSLOG_TEXT_FORMAT = "exim-policy[%(process)d]: %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601 with ms), level, logger, message,
    the record's ``fields``, and the traceback of an exception."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": _iso_time(record.created), "level": record.levelname.lower(),
               "logger": record.name, "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if callable(fields):
            fields = fields()
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return self.prefix + json.dumps(doc, ensure_ascii=False, default=str)


def _iso_time(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + \
        f".{int(created % 1 * 1000):03d}Z"


def handler_for(config: LoggingConfig) -> logging.Handler:
    """The handler that writes (stderr or syslog) with the configured format."""
    if config.target == "syslog":
        writer: logging.Handler = _syslog(config)
        prefix = f"exim-policy[{os.getpid()}]: "
        writer.setFormatter(JsonFormatter(prefix) if config.format == "json"
                            else logging.Formatter(SYSLOG_TEXT_FORMAT))
        return writer
    writer = logging.StreamHandler(sys.stderr)
    writer.setFormatter(JsonFormatter() if config.format == "json"
                        else logging.Formatter(TEXT_FORMAT))
    return writer


def _syslog(config: LoggingConfig) -> logging.handlers.SysLogHandler:
    address: str | tuple[str, int] = config.syslog_address
    host, sep, port = config.syslog_address.rpartition(":")
    if sep and port.isdigit() and not config.syslog_address.startswith("/"):
        address = (host.strip("[]"), int(port))
    facility = logging.handlers.SysLogHandler.facility_names[config.syslog_facility]
    try:
        if isinstance(address, str) and not stat.S_ISSOCK(os.stat(address).st_mode):
            raise OSError(f"{address} is not a socket")
        # (a unix socket that is missing would only be noticed, silently, at each record)
        return logging.handlers.SysLogHandler(address=address, facility=facility)
    except OSError as exc:
        raise ConfigError(f"logging.syslog_address: cannot open {config.syslog_address}: "
                          f"{exc.strerror or exc}") from None


class LogWriter(logging.Handler):
    """The root handler: hands records to a writer thread in batches, so that a slow
    target (a full pipe to journald, a syslog socket that blocks) never stalls request
    handling, and a busy daemon wakes that thread once per batch, not once per line.

    A stream target's line is formatted where the record is made, once, and a batch goes
    out in one write; a syslog target gets each record (one datagram each, its handler
    formats it). Lines wait at most :data:`BATCH_DELAY`; at most :data:`MAX_PENDING` wait
    while the target is stuck -- beyond that, and on a failed write, lines are dropped and
    the next line written says how many. ``stop()`` writes what is still waiting.
    """

    def __init__(self, writer: logging.Handler) -> None:
        super().__init__()
        self.writer = writer
        self._pending: list = []
        self._lost = 0
        self._wake = threading.Event()
        #: held while a batch is written: a switch of writer waits for it
        self._writing = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="exim-policy-log", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        # (under the handler's lock: handle() takes it)
        writer = self.writer
        if isinstance(writer, logging.StreamHandler):
            try:
                item: object = writer.format(record) + writer.terminator
            except Exception:
                self.handleError(record)
                return
        else:
            item = record
        if self._stopping:  # (the thread is gone, or going: write it now)
            self._write(writer, [item], 0)
            return
        if len(self._pending) >= MAX_PENDING:
            self._lost += 1
            return
        self._pending.append(item)
        if len(self._pending) == 1:
            self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait()
            time.sleep(BATCH_DELAY)  # (let the batch grow: one wake-up, one write)
            self._write_pending()
        self._write_pending()

    def _write_pending(self) -> None:
        with self._writing:
            with self.lock:  # type: ignore[union-attr]
                batch, self._pending = self._pending, []
                lost, self._lost = self._lost, 0
                self._wake.clear()
            if batch or lost:
                self._write(self.writer, batch, lost)

    def _write(self, writer: logging.Handler, batch: list, lost: int) -> None:
        if lost:
            note = f"exim-policy: {lost} log line(s) lost (the log target did not keep up)"
            batch.insert(0, note + "\n" if isinstance(writer, logging.StreamHandler)
                         else logging.makeLogRecord({"name": "exim_policy.logs", "msg": note,
                                                     "levelno": logging.ERROR,
                                                     "levelname": "ERROR"}))
        if not isinstance(writer, logging.StreamHandler):
            for record in batch:
                writer.handle(record)
            return
        try:
            writer.stream.write("".join(batch))
            writer.stream.flush()
        except (OSError, ValueError):  # (ValueError: the stream was closed)
            with self.lock:  # type: ignore[union-attr]
                self._lost += len(batch)

    def switch(self, writer: logging.Handler) -> None:
        """Write with ``writer`` from now on; what waits goes to the old one first, which
        is then closed. Blocks while a batch is written: call it off the event loop."""
        with self._writing:
            with self.lock:  # type: ignore[union-attr]
                old, self.writer = self.writer, writer
                batch, self._pending = self._pending, []
                lost, self._lost = self._lost, 0
            self._write(old, batch, lost)
        old.close()

    def stop(self) -> None:
        """Write what waits and end the thread; records made later are written at once,
        by the thread that makes them."""
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self.writer.flush()


#: how long a line may wait for the lines after it (one write for all of them)
BATCH_DELAY = 0.01
#: lines that may wait while the target does not take them (tens of MB at most)
MAX_PENDING = 100_000


def start_logging(config: LoggingConfig) -> LogWriter:
    """Send every record through a :class:`LogWriter` to the configured writer; returns it
    (``stop()`` it last: that writes what is still waiting)."""
    root = logging.getLogger()
    root.setLevel(config.level.upper())
    # no format shows them: not looked up for every record
    logging.logThreads = False
    logging.logMultiprocessing = False
    writer = LogWriter(handler_for(config))
    root.addHandler(writer)
    return writer


def reconfigure_logging(writer: LogWriter, config: LoggingConfig,
                        handler: logging.Handler) -> None:
    """Switch to ``config`` and its ``handler`` (:func:`handler_for`; a reload): the level at
    once, the handler once the old one has written what waits. Blocks until then: call it
    off the event loop."""
    logging.getLogger().setLevel(config.level.upper())
    writer.switch(handler)
