"""One request pace for the whole process, shared by every batch, task and event loop.

Prefect runs async tasks on their own event loops in worker threads, so an asyncio lock
would not be shared: a threading.Lock reserves the next slot, the wait happens outside it.
A 429 pushes the shared next slot back, so every request slows down, not only the refused
one. Whatever the API asks for, a pause is capped (`max_wait`), and the default sleep ends
as soon as a stop is requested (syncpoint.core.interrupts).

A Prefect global concurrency limit (one budget for every worker and process) is drawn in
chunks: each draw is a round trip to the Prefect API, made one at a time per process, so
one slot per request delivered well under the budget (22% of a 50-a-second limit,
measured with Prefect 3.8.8 on two cores). Chunks of half a second's budget, two draws in
flight, delivered 99% of it. The slots of a chunk are spent one per request; what is left
when a run ends (two chunks at most) is never used and decays: the limit's own cap still
bounds what all workers together can take.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Awaitable, Callable

from syncpoint.core.errors import ConfigError, RetriableApiError
from syncpoint.core.interrupts import interruptible, interruptible_sleep

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# The one cap on any single wait an API can impose (Retry-After, a limiter pause, a retry's
# backoff): long enough to honour a real API's "come back in a minute or two", short
# enough that one hostile answer cannot stall a nightly run.
DEFAULT_MAX_WAIT = 120.0

# A draw from a global limit takes this many seconds of its budget (its slot decay), at
# most half its slots (so that two workers can each hold a chunk) and at least one.
CHUNK_SECONDS = 0.5
# How often a request looks again while other requests of this process are drawing.
DRAW_POLL_SECONDS = 0.005
# Draws in flight at once per process: while one waits out the limit's retry delay, the
# next is already asking, so the slots are taken about as soon as they decay.
DRAWS_IN_FLIGHT = 2


def global_chunk(limit: int, decay_per_second: float) -> int:
    """Slots to take from a global limit per draw (see CHUNK_SECONDS)."""
    return max(1, min(limit // 2, math.ceil(decay_per_second * CHUNK_SECONDS)))


def bounded_wait(seconds: float, cap: float) -> float:
    """`seconds` clamped to [0, cap]; infinity and NaN (nonsense from upstream) count as cap."""
    if math.isnan(seconds):
        return cap
    return min(max(0.0, seconds), cap)


def check_max_wait(cap: float) -> float:
    """A usable cap: finite and positive, or ValueError."""
    if not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"the wait cap must be a positive number of seconds, not {cap!r}")
    return float(cap)


class RateLimiter:
    """Evenly spaced slots: at most `per_minute` requests in any minute, no bursts."""

    def __init__(
        self,
        per_minute: float | None,
        *,
        global_limit: str | None = None,
        max_wait: float = DEFAULT_MAX_WAIT,
        clock: Clock = time.monotonic,
        sleep: Sleep = interruptible_sleep,
    ) -> None:
        if per_minute is not None and per_minute <= 0:
            raise ValueError("per_minute must be positive or None (unlimited)")
        self.per_minute = per_minute
        self.max_wait = check_max_wait(max_wait)
        # A Prefect global concurrency limit with slot decay: one budget for every worker.
        self.global_limit = global_limit
        self._interval = 60.0 / per_minute if per_minute else 0.0
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next = 0.0  # the earliest time the next request may go out
        self.sent = 0
        self.waited = 0.0
        # Global-limit slots drawn and not yet spent; draws under way; the chunk size (read
        # from the limit on the first draw); draws made.
        self._bank = 0
        self._drawing = 0
        self._chunk: int | None = None
        self.draws = 0

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
            await interruptible(self._global_token(self.global_limit), self.max_wait)

    async def _global_token(self, name: str) -> None:
        """One slot of the global limit: from the chunks in hand, else from a new draw (at
        most DRAWS_IN_FLIGHT requests of the process draw; the others wait for their
        chunks)."""
        while True:
            with self._lock:
                if self._bank:
                    self._bank -= 1
                    return
                draw = self._drawing < DRAWS_IN_FLIGHT
                self._drawing += draw
            if not draw:
                await interruptible_sleep(DRAW_POLL_SECONDS)
                continue
            try:
                if self._chunk is None:
                    self._chunk = await _chunk_of(name)
                await _global_slot(name, self.max_wait, self._chunk)
                with self._lock:
                    self._bank += self._chunk
                    self.draws += 1
            finally:
                with self._lock:
                    self._drawing -= 1

    def pause(self, seconds: float) -> None:
        """The API asked everyone to back off: no slot before now + seconds (at most max_wait).

        The cap matters most here: an uncapped pause (`Retry-After: 999999`) would hold back
        every request of the process, not only the one that was refused.
        """
        wait = bounded_wait(seconds, self.max_wait)
        with self._lock:
            self._next = max(self._next, self._clock() + wait)


async def _chunk_of(name: str) -> int:
    """The chunk size for the limit `name`, from its slots and decay; one slot at a time if
    it cannot be read (a missing limit is reported by the draw itself)."""
    from prefect.client.orchestration import get_client

    try:
        async with get_client() as client:
            limit = await client.read_global_concurrency_limit_by_name(name)
    except Exception:  # any failure here only costs the chunking
        return 1
    return global_chunk(limit.limit, limit.slot_decay_per_second or 0.0)


async def _global_slot(name: str, max_wait: float, slots: int = 1) -> None:
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError, rate_limit

    try:
        # Bounded like every other wait: a limit whose slots never free up (decay set to
        # nearly nothing, another worker hogging it) makes this request transient, not stuck.
        await rate_limit(name, occupy=slots, strict=True, timeout_seconds=max_wait)
    except TimeoutError:
        raise RetriableApiError(
            f"no slot from Prefect global concurrency limit {name!r} within {max_wait:.0f}s"
        ) from None
    except ConcurrencySlotAcquisitionError:
        raise ConfigError(
            f"Prefect global concurrency limit {name!r} does not exist (or has no slot decay); "
            f"create it with: prefect gcl create {name} --limit 10 --slot-decay-per-second 1.5"
        ) from None


_shared: dict[tuple[str, str | None], RateLimiter] = {}
_shared_lock = threading.Lock()


def shared_limiter(
    key: str,
    per_minute: float | None,
    global_limit: str | None = None,
    max_wait: float = DEFAULT_MAX_WAIT,
) -> RateLimiter:
    """The process-wide limiter for `key` (a base URL); created on first use."""
    with _shared_lock:
        limiter = _shared.get((key, global_limit))
        if limiter is None or limiter.per_minute != per_minute:
            limiter = _shared[(key, global_limit)] = RateLimiter(
                per_minute, global_limit=global_limit, max_wait=max_wait
            )
        # The latest setting wins without resetting the pace: one API, one cap.
        limiter.max_wait = check_max_wait(max_wait)
        return limiter


def drop_limiter(key: str, global_limit: str | None = None) -> None:
    """Forget a shared limiter (tests and the end of a run)."""
    with _shared_lock:
        _shared.pop((key, global_limit), None)
