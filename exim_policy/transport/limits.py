"""Limits every listener of one daemon shares: open connections, and bytes held in bodies.

Plain bookkeeping for the event loop's thread (no locks, no awaits): transports call it
from their protocol callbacks.

- :class:`ConnectionTable` bounds the open connections. A connection still sending its
  request holds no scan slot; when the table is full, the one that has been sending
  longest (the slowest, or an idle one) is shed to make room, so a few hundred slow or
  silent clients cannot shut out the MTA's scans. Only when every open connection is past
  reading (complete requests, being answered) is a new one refused.
- :class:`ByteBudget` bounds the body bytes the daemon holds at once (a request's declared
  ``Content-length`` from the end of its headers until its connection closes). A request
  that does not fit waits its turn (first come, first served, so a large message is not
  starved by small ones) and is refused with a temporary error after the queue timeout:
  never an out-of-memory.
"""
from __future__ import annotations

import collections
from typing import Protocol
from collections.abc import Callable


class Sheddable(Protocol):
    def shed(self) -> None:
        """Close at once: the table needs the slot (the table has already forgotten it)."""


class ConnectionTable:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: set[Sheddable] = set()
        #: connections still receiving their request, oldest first (dicts keep order)
        self._reading: dict[Sheddable, None] = {}
        self.shed_total = 0
        self.refused_total = 0

    def __len__(self) -> int:
        return len(self._open)

    @property
    def answering(self) -> int:
        """Connections past reading: a complete request being answered (the readers are
        always among the open ones)."""
        return len(self._open) - len(self._reading)

    def admit(self, conn: Sheddable) -> bool:
        """Take ``conn`` in (shedding the oldest reader when full), or False: no room."""
        if len(self._open) >= self.limit:
            if not self._reading:
                self.refused_total += 1
                return False
            oldest = next(iter(self._reading))
            self.forget(oldest)
            self.shed_total += 1
            oldest.shed()
        self._open.add(conn)
        self._reading[conn] = None
        return True

    def read_done(self, conn: Sheddable) -> None:
        """``conn`` has its whole request: it can no longer be shed."""
        self._reading.pop(conn, None)

    def reading_again(self, conn: Sheddable) -> None:
        """``conn`` (keep-alive) waits for its next request: it may be shed again (it
        joins the readers as the newest)."""
        if conn in self._open:
            self._reading[conn] = None

    def forget(self, conn: Sheddable) -> None:
        """``conn`` is closed (idempotent)."""
        self._open.discard(conn)
        self._reading.pop(conn, None)


class BudgetWait:
    """A place in the :class:`ByteBudget` queue; ``cancel()`` gives it up."""

    __slots__ = ("amount", "granted", "active")

    def __init__(self, amount: int, granted: Callable[[], None]) -> None:
        self.amount = amount
        self.granted = granted
        self.active = True

    def cancel(self) -> None:
        self.active = False


class ByteBudget:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._queue: collections.deque[BudgetWait] = collections.deque()

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._queue if w.active)

    def take(self, amount: int) -> bool:
        """Reserve ``amount`` bytes now if they fit and nobody waits before us."""
        self._drop_cancelled()
        if self._queue or self.used + amount > self.capacity:
            return False
        self.used += amount
        return True

    def wait(self, amount: int, granted: Callable[[], None]) -> BudgetWait:
        """Queue for ``amount`` bytes; ``granted()`` is called once they are reserved."""
        if amount > self.capacity:  # config validation keeps max_message_size below it
            raise ValueError(f"{amount} bytes can never fit a budget of {self.capacity}")
        waiter = BudgetWait(amount, granted)
        self._queue.append(waiter)
        return waiter

    def give_back(self, amount: int) -> None:
        self.used -= amount
        self.grant()

    def grant(self) -> None:
        """Hand freed bytes to the waiters at the head of the queue (call after a cancel too)."""
        self._drop_cancelled()
        while self._queue and self.used + self._queue[0].amount <= self.capacity:
            waiter = self._queue.popleft()
            self.used += waiter.amount
            waiter.active = False
            waiter.granted()
            self._drop_cancelled()

    def _drop_cancelled(self) -> None:
        while self._queue and not self._queue[0].active:
            self._queue.popleft()


class Limits:
    """What one daemon's listeners share."""

    def __init__(self, max_connections: int, max_bytes_in_flight: int) -> None:
        self.connections = ConnectionTable(max_connections)
        self.budget = ByteBudget(max_bytes_in_flight)
