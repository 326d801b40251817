"""Requests in flight for one stage, shared by every fetch task of that stage.

The batch engine fetches the next batch while the current one drains (see
syncpoint/engine/batch_map.py). Prefect runs each async task on its own event loop in a
worker thread, so an asyncio.Semaphore cannot be shared between them; this gate is
guarded by a threading.Lock and wakes a waiter on the waiter's own loop.

Slots are granted first come, first served: the next batch's items queue behind the
current batch's, so it only takes the slots the current batch's tail frees and
`concurrency` stays exact across both.

A refused key closes the gate: every item still waiting, in this batch or the next,
ends "not attempted" instead of sending a request the API will refuse too.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from types import TracebackType


class RequestSlots:
    """At most `size` holders at once, across threads and event loops, granted in order.

    Use `async with slots:` around one item's requests (its retries included).
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.size = size
        self._lock = threading.Lock()
        self._free = size
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()
        self._closed: str | None = None
        self.most_held = 0  # the high-water mark, so a test can see the bound was reached

    @property
    def closed(self) -> str | None:
        """Why the gate was closed, or None while it is open."""
        return self._closed

    def close(self, reason: str) -> None:
        """No more requests: holders that check `closed` give their item up (first reason
        wins). Waiters still get their slots, so each can settle its item."""
        with self._lock:
            if self._closed is None:
                self._closed = reason

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                self.most_held = max(self.most_held, self.held)
                return
            granted: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, granted))
        try:
            await granted
        except asyncio.CancelledError:
            with self._lock:
                if (loop, granted) in self._waiters:
                    self._waiters.remove((loop, granted))
                    raise
            # The slot was handed over as the cancel landed: pass it on. (A grant still
            # scheduled on this loop sees the cancelled future and passes it on itself.)
            if granted.done() and not granted.cancelled():
                self.release()
            raise

    def release(self) -> None:
        with self._lock:
            while self._waiters:
                loop, granted = self._waiters.popleft()
                # The slot goes straight to the next waiter, so no newcomer can overtake it.
                try:
                    loop.call_soon_threadsafe(self._grant, granted)
                except RuntimeError:  # that loop is closed: its waiter is gone
                    continue
                return
            self._free += 1

    @property
    def held(self) -> int:
        """Slots taken now (a slot on its way to a waiter counts as taken)."""
        return self.size - self._free

    @property
    def waiting(self) -> int:
        """Acquirers queued for a slot."""
        return len(self._waiters)

    def _grant(self, granted: asyncio.Future[None]) -> None:
        if granted.cancelled():
            self.release()
        else:
            granted.set_result(None)

    async def __aenter__(self) -> RequestSlots:
        await self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
