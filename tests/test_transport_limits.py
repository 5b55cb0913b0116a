"""The shared limits' bookkeeping: connection table, byte budget, log tally."""
from __future__ import annotations

import logging

import pytest

from exim_policy.tally import Tally
from exim_policy.transport.limits import ByteBudget, ConnectionTable


class Conn:
    def __init__(self, name: str) -> None:
        self.name = name
        self.was_shed = False

    def shed(self) -> None:
        self.was_shed = True

    def __repr__(self) -> str:
        return self.name


def test_a_full_table_sheds_readers_oldest_first_and_never_a_request_being_answered():
    table = ConnectionTable(3)
    a, b, c, d, e = (Conn(n) for n in "abcde")
    assert table.admit(a) and table.admit(b) and table.admit(c)
    table.read_done(a)            # a is being answered: it cannot be shed
    assert table.admit(d)         # full: b, the oldest reader, goes
    assert (a.was_shed, b.was_shed, c.was_shed) == (False, True, False)
    assert len(table) == 3 and table.shed_total == 1
    table.forget(b)               # its close comes later: nothing counted twice
    assert len(table) == 3
    table.read_done(c)
    table.read_done(d)
    assert not table.admit(e)     # every open connection is past reading
    assert table.refused_total == 1 and len(table) == 3
    table.forget(a)
    assert table.admit(e)


def test_the_budget_serves_waiters_first_come_first_served():
    budget = ByteBudget(100)
    granted: list[str] = []
    assert budget.take(60)
    big = budget.wait(80, lambda: granted.append("big"))
    assert not budget.take(10)    # someone waits: no overtaking, even if it would fit
    small = budget.wait(10, lambda: granted.append("small"))
    budget.give_back(60)
    assert granted == ["big", "small"] and budget.used == 90
    assert not big.active and not small.active


def test_a_cancelled_waiter_lets_the_next_one_in():
    budget = ByteBudget(100)
    granted: list[str] = []
    assert budget.take(50)
    first = budget.wait(80, lambda: granted.append("first"))
    budget.wait(40, lambda: granted.append("second"))
    first.cancel()
    budget.grant()
    assert granted == ["second"] and budget.used == 90 and budget.waiting == 0


def test_a_request_larger_than_the_budget_is_a_configuration_bug():
    with pytest.raises(ValueError):
        ByteBudget(10).wait(11, lambda: None)


def test_tally_logs_the_first_event_then_one_line_per_period(caplog):
    tally = Tally(logging.getLogger("t"), logging.WARNING, every=10.0)
    with caplog.at_level(logging.WARNING, logger="t"):
        for now in (0.0, 1.0, 2.0, 3.0, 11.0, 12.0):
            tally.hit(now, "shed a connection from %s", "x")
    assert [r.getMessage() for r in caplog.records] == [
        "shed a connection from x",
        "shed a connection from x (4 times in the last 10s)"]


def test_tally_with_a_burst_logs_that_many_events_per_period(caplog):
    tally = Tally(logging.getLogger("t"), logging.WARNING, every=10.0, burst=2)
    with caplog.at_level(logging.WARNING, logger="t"):
        for now, peer in ((0.0, "a"), (1.0, "b"), (2.0, "c"), (3.0, "d"), (11.0, "e"),
                          (12.0, "f"), (13.0, "g")):
            tally.hit(now, "protocol error from %s", peer)
    assert [r.getMessage() for r in caplog.records] == [
        "protocol error from a", "protocol error from b",
        "protocol error from e (3 times in the last 10s)", "protocol error from f"]
