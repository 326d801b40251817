"""The shared pace: evenly spaced slots, shared across threads, pushed back by a 429."""

from __future__ import annotations

import asyncio
import threading

import pytest

from syncpoint.core.rate_limit import RateLimiter, drop_limiter, shared_limiter


class FakeTime:
    """A clock that stands still: each wait is recorded, so the slots are exact."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def make(per_minute: float | None) -> tuple[RateLimiter, FakeTime]:
    t = FakeTime()
    return RateLimiter(per_minute, clock=t.clock, sleep=t.sleep), t


def test_slots_are_evenly_spaced() -> None:
    limiter, t = make(120)  # one every 0.5 s

    async def burst() -> None:
        await asyncio.gather(*(limiter.acquire() for _ in range(5)))

    asyncio.run(burst())
    assert sorted(t.slept) == [0.5, 1.0, 1.5, 2.0]
    assert limiter.sent == 5


def test_unlimited_never_waits() -> None:
    limiter, t = make(None)

    async def burst() -> None:
        await asyncio.gather(*(limiter.acquire() for _ in range(100)))

    asyncio.run(burst())
    assert t.slept == []


def test_pause_delays_everyone() -> None:
    limiter, t = make(None)
    limiter.pause(3.0)

    async def two() -> None:
        await asyncio.gather(limiter.acquire(), limiter.acquire())

    asyncio.run(two())
    assert t.slept == [3.0, 3.0]


def test_slots_are_shared_across_threads_and_loops() -> None:
    limiter, t = make(600)  # one every 0.1 s

    async def ten() -> None:
        await asyncio.gather(*(limiter.acquire() for _ in range(10)))

    def worker() -> None:
        asyncio.run(ten())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    # 40 requests, 39 of them waited for a distinct slot: nobody shared one.
    assert sorted(round(s, 6) for s in t.slept) == [round(0.1 * n, 6) for n in range(1, 40)]


def test_shared_limiter_is_one_per_key() -> None:
    try:
        a = shared_limiter("http://x", 60)
        assert shared_limiter("http://x", 60) is a
        assert shared_limiter("http://y", 60) is not a
    finally:
        drop_limiter("http://x")
        drop_limiter("http://y")


def test_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="positive"):
        RateLimiter(0)
