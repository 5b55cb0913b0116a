"""Log a recurring event at most once per period, with how often it happened."""
from __future__ import annotations

import logging


class Tally:
    """Counts one kind of event and logs it at most once per ``every`` seconds.

    A flood of hostile connections must not become a flood of log lines: the first event
    is logged at once, later ones are summed into the next line (``... (N times in the
    last 10s)``).
    """

    def __init__(self, logger: logging.Logger, level: int, every: float = 10.0) -> None:
        self.logger = logger
        self.level = level
        self.every = every
        self._next = 0.0
        self._count = 0

    def hit(self, now: float, message: str, *args: object) -> None:
        self._count += 1
        if now < self._next:
            return
        suffix = f" ({self._count} times in the last {self.every:g}s)" if self._count > 1 else ""
        self.logger.log(self.level, message + suffix, *args)
        self._count = 0
        self._next = now + self.every
