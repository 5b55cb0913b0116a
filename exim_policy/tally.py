"""Log a recurring event at most ``burst`` times per period, with how often it happened."""
from __future__ import annotations

import logging


class Tally:
    """Counts one kind of event and logs it at most ``burst`` times per ``every`` seconds.

    A flood of hostile connections must not become a flood of log lines: the first
    ``burst`` events of a period are logged at once, later ones are summed into the next
    line (``... (N times in the last 10s)``).  A burst above one keeps the details of a
    few distinct events (which client, which error) when they come close together.
    """

    def __init__(self, logger: logging.Logger, level: int, every: float = 10.0,
                 burst: int = 1) -> None:
        self.logger = logger
        self.level = level
        self.every = every
        self.burst = burst
        self._next = 0.0
        self._logged = 0  # lines in the current period
        self._count = 0  # events since the last line

    def hit(self, now: float, message: str, *args: object) -> None:
        self._count += 1
        if now >= self._next:
            self._next, self._logged = now + self.every, 0
        elif self._logged >= self.burst:
            return
        suffix = f" ({self._count} times in the last {self.every:g}s)" if self._count > 1 else ""
        self.logger.log(self.level, message + suffix, *args)
        self._count = 0
        self._logged += 1
