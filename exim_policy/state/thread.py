"""One thread that runs a store's blocking calls, for the event loop that waits on them.

Why not ``loop.run_in_executor``: each call there costs a ThreadPoolExecutor work item,
a lock, and one ``call_soon_threadsafe`` wake-up of the loop per result; at a few calls
per message that was most of what the SQLite store cost. Here the loop side only puts a
tuple on a lock-free queue, and the thread hands back every result it has finished with
one wake-up of the loop, however many there are: under load, calls share wake-ups.
"""
from __future__ import annotations

import asyncio
import collections
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
#: a call's future, its result and its exception (one of the two is None)
_Outcome = tuple["asyncio.Future[Any]", Any, "BaseException | None"]


class StoreThread:
    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[
            tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[..., Any],
                  tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._done: collections.deque[tuple[asyncio.AbstractEventLoop, _Outcome]] = \
            collections.deque()
        self._lock = threading.Lock()
        self._wake_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``fn(*args)`` on the thread; the future has its result (or its exception)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop  # (the CLI and tests run one loop after another)
        future = loop.create_future()
        self._calls.put((loop, future, fn, args))
        return future

    def stop(self) -> None:
        """Finish the calls queued so far, then end the thread."""
        self._calls.put(None)
        self._thread.join()

    def _work(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            loop, future, fn, args = item
            outcome: _Outcome
            try:
                outcome = (future, fn(*args), None)
            except BaseException as exc:  # handed to the caller, raised there
                outcome = (future, None, exc)
            with self._lock:
                self._done.append((loop, outcome))
                wake = not self._wake_scheduled
                self._wake_scheduled = True
            if wake:
                try:
                    loop.call_soon_threadsafe(self._deliver)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    with self._lock:
                        self._done.clear()
                        self._wake_scheduled = False

    def _deliver(self) -> None:
        with self._lock:
            finished = list(self._done)
            self._done.clear()
            self._wake_scheduled = False
        for loop, (future, result, exc) in finished:
            if future.cancelled():
                continue
            if loop is asyncio.get_running_loop():
                future.set_exception(exc) if exc is not None else future.set_result(result)
            else:  # a result for another loop (never in practice): hand it over there
                loop.call_soon_threadsafe(_settle, future, result, exc)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if not future.cancelled():
        future.set_exception(exc) if exc is not None else future.set_result(result)
