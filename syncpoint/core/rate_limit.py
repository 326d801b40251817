"""One request pace for the whole process, shared by every batch, task and event loop.

Prefect runs async tasks on their own event loops in worker threads, so an asyncio lock
would not be shared: a threading.Lock reserves the next slot, the wait happens outside it.
A 429 pushes the shared next slot back, so every request slows down, not only the refused
one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable

from syncpoint.core.errors import ConfigError

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class RateLimiter:
    """Evenly spaced slots: at most `per_minute` requests in any minute, no bursts."""

    def __init__(
        self,
        per_minute: float | None,
        *,
        global_limit: str | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if per_minute is not None and per_minute <= 0:
            raise ValueError("per_minute must be positive or None (unlimited)")
        self.per_minute = per_minute
        # A Prefect global concurrency limit with slot decay: one budget for every worker.
        self.global_limit = global_limit
        self._interval = 60.0 / per_minute if per_minute else 0.0
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next = 0.0  # the earliest time the next request may go out
        self.sent = 0
        self.waited = 0.0

    def _reserve(self) -> float:
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self._interval
            self.sent += 1
            return slot - now

    async def acquire(self) -> None:
        """Wait for this request's slot."""
        delay = self._reserve()
        if delay > 0:
            self.waited += delay
            await self._sleep(delay)
        if self.global_limit:
            await _global_slot(self.global_limit)

    def pause(self, seconds: float) -> None:
        """The API asked everyone to back off: no slot before now + seconds."""
        with self._lock:
            self._next = max(self._next, self._clock() + max(0.0, seconds))


async def _global_slot(name: str) -> None:
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError, rate_limit

    try:
        await rate_limit(name, occupy=1, strict=True)
    except ConcurrencySlotAcquisitionError:
        raise ConfigError(
            f"Prefect global concurrency limit {name!r} does not exist (or has no slot decay); "
            f"create it with: prefect gcl create {name} --limit 10 --slot-decay-per-second 1.5"
        ) from None


_shared: dict[tuple[str, str | None], RateLimiter] = {}
_shared_lock = threading.Lock()


def shared_limiter(
    key: str, per_minute: float | None, global_limit: str | None = None
) -> RateLimiter:
    """The process-wide limiter for `key` (a base URL); created on first use."""
    with _shared_lock:
        limiter = _shared.get((key, global_limit))
        if limiter is None or limiter.per_minute != per_minute:
            limiter = _shared[(key, global_limit)] = RateLimiter(
                per_minute, global_limit=global_limit
            )
        return limiter


def drop_limiter(key: str, global_limit: str | None = None) -> None:
    """Forget a shared limiter (tests and the end of a run)."""
    with _shared_lock:
        _shared.pop((key, global_limit), None)
