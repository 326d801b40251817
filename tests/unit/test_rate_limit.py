"""The shared pace: evenly spaced slots, shared across threads, pushed back by a 429 (never
for longer than the cap), and every wait ended by a stop request."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from syncpoint.core.interrupts import (
    StopFlag,
    WaitInterrupted,
    clear_stop_request,
    interruptible,
    interruptible_sleep,
    stop_requested,
)
from syncpoint.core.rate_limit import (
    Cover,
    RateLimiter,
    draw_wait,
    drop_limiter,
    global_chunk,
    shared_limiter,
    slots_still_counted,
)


@pytest.fixture(autouse=True)
def no_stop_requested() -> Iterator[None]:
    """The stop event is process-wide: no test starts or leaves one behind."""
    clear_stop_request()
    yield
    clear_stop_request()


class FakeTime:
    """A clock that stands still: each wait is recorded, so the slots are exact."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def make(per_minute: float | None, max_wait: float = 120.0) -> tuple[RateLimiter, FakeTime]:
    t = FakeTime()
    return RateLimiter(per_minute, max_wait=max_wait, clock=t.clock, sleep=t.sleep), t


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
    for cap in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="wait cap"):
            RateLimiter(None, max_wait=cap)


@pytest.mark.parametrize(
    ("asked", "waited"),
    [
        pytest.param(7.0, 7.0, id="honoured"),
        pytest.param(999999.0, 60.0, id="huge"),
        pytest.param(float("inf"), 60.0, id="inf"),
        pytest.param(float("nan"), 60.0, id="nan"),
        pytest.param(-3.0, None, id="negative"),
    ],
)
def test_a_pause_never_exceeds_the_cap(asked: float, waited: float | None) -> None:
    limiter, t = make(None, max_wait=60.0)
    limiter.pause(asked)
    asyncio.run(limiter.acquire())
    assert t.slept == ([] if waited is None else [waited])


def test_the_shared_limiter_takes_the_latest_cap_without_losing_its_pace() -> None:
    try:
        a = shared_limiter("http://capped", 60, max_wait=30.0)
        assert a.max_wait == 30.0
        assert shared_limiter("http://capped", 60, max_wait=90.0) is a
        assert a.max_wait == 90.0
    finally:
        drop_limiter("http://capped")


# --- stop requests cut waits short ---------------------------------------------------------


def request_stop_after(seconds: float) -> threading.Thread:
    flag = StopFlag()

    def later() -> None:
        time.sleep(seconds)
        flag.request("test stop")

    thread = threading.Thread(target=later, daemon=True)
    thread.start()
    return thread


def test_a_stop_ends_a_100_second_pause_in_another_threads_event_loop() -> None:
    # As in Prefect: the wait runs on a task's own loop in a worker thread, the stop comes
    # from elsewhere (a signal handler in the main thread).
    limiter = RateLimiter(None)  # the real clock and the default, interruptible sleep
    limiter.pause(100.0)
    outcome: list[BaseException | None] = []

    def worker() -> None:
        try:
            asyncio.run(limiter.acquire())
            outcome.append(None)
        except WaitInterrupted as exc:
            outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=worker)
    thread.start()
    request_stop_after(0.2).join(2)
    thread.join(2)
    elapsed = time.monotonic() - started
    assert not thread.is_alive()
    assert 0.2 <= elapsed < 1.5
    (stopped,) = outcome
    assert isinstance(stopped, WaitInterrupted)
    assert stopped.seconds == pytest.approx(100.0, abs=0.5)


def test_a_new_run_waits_again_after_an_earlier_runs_stop() -> None:
    StopFlag().request("the earlier run")
    assert stop_requested()
    with pytest.raises(WaitInterrupted):
        asyncio.run(interruptible_sleep(0.01))  # raises at once, before any sleep
    StopFlag()  # a new run's flag: the earlier stop is not this run's
    assert not stop_requested()
    started = time.monotonic()
    asyncio.run(interruptible_sleep(0.05))
    assert time.monotonic() - started >= 0.05


def test_interruptible_sleep_refuses_forever() -> None:
    with pytest.raises(ValueError, match="forever"):
        asyncio.run(interruptible_sleep(float("inf")))


def test_a_stop_cancels_a_wait_that_is_not_ours_to_slice() -> None:
    # A Prefect global concurrency slot is awaited, not slept: it is raced against the stop.
    cancelled: list[bool] = []

    async def never() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    request_stop_after(0.1)
    started = time.monotonic()
    with pytest.raises(WaitInterrupted):
        asyncio.run(interruptible(never(), 120.0))
    assert time.monotonic() - started < 1.5
    assert cancelled == [True]


def test_interruptible_returns_what_it_waited_for() -> None:
    async def answer() -> int:
        await asyncio.sleep(0.01)
        return 42

    assert asyncio.run(interruptible(answer(), 1.0)) == 42


@pytest.mark.parametrize(
    ("limit", "decay", "chunk"),
    [
        (100, 100.0, 50),  # half a second of the budget
        (20, 100.0, 10),  # at most half the slots, so two workers each hold a chunk
        (5, 8.0, 2),
        (1, 0.5, 1),  # at least one
        (10, 0.0, 1),  # no decay read: one at a time
    ],
)
def test_global_chunk(limit: int, decay: float, chunk: int) -> None:
    assert global_chunk(limit, decay) == chunk


@pytest.mark.parametrize(
    ("active", "wait"),
    [
        pytest.param(0, 0.0, id="empty"),
        pytest.param(50, 0.0, id="room-for-exactly-one-chunk"),
        pytest.param(70, 0.2, id="twenty-slots-short"),
        pytest.param(100, 0.5, id="full"),
    ],
)
def test_draw_wait(active: int, wait: float) -> None:
    # Limit 100 decaying at 100 a second, chunks of 50: the wait is the time the excess
    # takes to decay.
    assert draw_wait(100, active, 50, 100.0) == pytest.approx(wait)


def test_cover_decays_at_the_limits_rate_and_never_below_zero() -> None:
    cover = Cover(10.0)
    cover.credit(5, drawn_at=1.0)
    assert cover.level(1.0) == 5
    assert cover.level(1.2) == pytest.approx(3)
    assert cover.level(9.0) == 0
    cover.credit(5, drawn_at=9.0)
    assert cover.level(9.0) == 5  # nothing of the first draw is carried over


def test_cover_adds_draws_like_the_limit_does() -> None:
    cover = Cover(10.0)
    cover.credit(5, drawn_at=0.0)
    cover.credit(5, drawn_at=0.3)
    assert cover.level(0.3) == pytest.approx(7)
    assert cover.level(0.5) == pytest.approx(5)


def test_cover_counts_a_late_reported_draw_from_when_it_was_drawn() -> None:
    # A draw whose request left before the last one counted is decayed from when it left:
    # counted from later, it would outlive what the limit still counts of it.
    cover = Cover(10.0)
    cover.credit(5, drawn_at=1.0)
    cover.credit(5, drawn_at=0.8)
    assert cover.level(1.0) == pytest.approx(5 + 3)


@pytest.mark.parametrize(
    ("bank", "cover", "kept"),
    [
        (12, 12.0, 12),
        # A chunk that arrives after a 40 ms round trip at 25/s, the cover at zero before
        # it: the limit still counts 11 slots of it and part of the twelfth.
        (12, 11.0, 11),
        (12, 11.001, 12),
        (12, 8.5, 9),  # held: what the limit has forgotten is dropped
        (12, 0.0, 0),
        (3, 11.5, 3),  # more cover than slots: the bank is kept as it is
    ],
)
def test_slots_still_counted_keeps_a_slot_the_limit_counts_in_part(
    bank: int, cover: float, kept: int
) -> None:
    assert slots_still_counted(bank, cover) == kept
