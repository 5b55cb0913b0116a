"""The daemon's log output: text or JSON lines, to stderr or syslog, written off the
event loop's thread.

Records are queued where they are made and written by a listener thread, so a slow
target (a full pipe to journald, a syslog socket that blocks) never stalls request
handling. A record may carry structured fields in ``record.fields``: a dict, or a
function returning one, called by the writer's thread only when the format needs it (the
decision line does that: ``log.info(text, *args, extra={"fields": lambda: {...}})``); the
JSON format writes them as keys of their own, the text format only the message.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import os
import queue
import stat
import sys
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


class _UnformattedQueueHandler(logging.handlers.QueueHandler):
    """Queues the record as it is: the writer's thread formats it. (The standard handler
    formats on the thread that logs, the event loop's, and copies the record: the larger
    part of a decision line's cost. The records stay in this process, so the arguments and
    a traceback need not be flattened for pickling; the daemon logs values, not objects
    that change later.)"""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


def start_logging(config: LoggingConfig) -> logging.handlers.QueueListener:
    """Send every record through a queue to the configured writer; returns the listener
    (``stop()`` it last: that flushes what is still queued)."""
    writer = handler_for(config)
    records: queue.SimpleQueue = queue.SimpleQueue()
    root = logging.getLogger()
    root.setLevel(config.level.upper())
    # no format shows them: not looked up for every record
    logging.logThreads = False
    logging.logMultiprocessing = False
    root.addHandler(_UnformattedQueueHandler(records))
    listener = logging.handlers.QueueListener(records, writer)
    listener.start()
    return listener


def reconfigure_logging(listener: logging.handlers.QueueListener, config: LoggingConfig,
                        writer: logging.Handler) -> None:
    """Switch to ``config`` and its ``writer`` (:func:`handler_for`; a reload): the level at
    once, the writer once the old one has written what is queued. Blocks until then: call
    it off the event loop. Records made meanwhile wait in the queue for the new writer."""
    logging.getLogger().setLevel(config.level.upper())
    listener.stop()
    old = listener.handlers
    listener.handlers = (writer,)
    listener.start()
    for handler in old:
        handler.close()
