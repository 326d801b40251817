"""RequestSlots across threads, each with its own event loop, as Prefect runs async tasks."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from syncpoint.core.request_slots import RequestSlots


def in_thread(body: Callable[[], Coroutine[Any, Any, Any]]) -> threading.Thread:
    """Run `body` on a fresh event loop in a new thread (what a Prefect worker thread does)."""
    thread = threading.Thread(target=lambda: asyncio.run(body()), daemon=True)
    thread.start()
    return thread


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll for a state another thread reaches; the 10 s cap only turns a hang into a failure."""
    for _ in range(1000):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def test_the_bound_holds_across_loops_and_is_reached() -> None:
    slots = RequestSlots(3)
    lock = threading.Lock()
    now, most = [0], [0]

    async def worker() -> None:
        async with slots:
            with lock:
                now[0] += 1
                most[0] = max(most[0], now[0])
            await asyncio.sleep(0.02)
            with lock:
                now[0] -= 1

    async def batch() -> None:
        await asyncio.gather(*(worker() for _ in range(10)))

    threads = [in_thread(batch) for _ in range(2)]
    for thread in threads:
        thread.join(10)
    assert most[0] == 3
    assert slots.most_held == 3
    assert slots.held == 0


def test_slots_are_granted_first_come_first_served_across_loops() -> None:
    slots = RequestSlots(1)
    order: list[str] = []
    release_first = threading.Event()

    async def first() -> None:
        async with slots:
            await asyncio.to_thread(release_first.wait, 10)

    def batch(name: str) -> Callable[[], Coroutine[Any, Any, None]]:
        async def run() -> None:
            async def one(i: int) -> None:
                async with slots:
                    order.append(f"{name}{i}")
                    await asyncio.sleep(0)

            await asyncio.gather(*(one(i) for i in range(3)))

        return run

    holder = in_thread(first)
    wait_until(lambda: slots.held == 1, "the first holder has its slot")
    current = in_thread(batch("a"))
    wait_until(lambda: slots.waiting == 3, "batch a queues")
    following = in_thread(batch("b"))
    wait_until(lambda: slots.waiting == 6, "batch b queues behind it")
    release_first.set()
    for thread in (holder, current, following):
        thread.join(10)
    # The next batch only gets the slots the current one no longer needs.
    assert order == ["a0", "a1", "a2", "b0", "b1", "b2"]
    assert slots.held == 0


def test_a_cancelled_waiter_gives_its_place_up() -> None:
    async def scenario() -> None:
        slots = RequestSlots(1)
        await slots.acquire()
        waiter = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0)
        assert slots.waiting == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert slots.waiting == 0
        slots.release()
        assert slots.held == 0
        await asyncio.wait_for(slots.acquire(), 1)  # nothing leaked: the slot is free
        slots.release()

    asyncio.run(scenario())


def test_a_slot_handed_to_a_cancelled_waiter_is_passed_on() -> None:
    async def scenario() -> None:
        slots = RequestSlots(1)
        await slots.acquire()
        doomed = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0)
        after = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0)
        slots.release()  # hands the slot to `doomed`, scheduled on this loop...
        doomed.cancel()  # ...which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await doomed
        await asyncio.wait_for(after, 1)  # the slot reached the next waiter
        assert slots.held == 1
        slots.release()
        assert slots.held == 0

    asyncio.run(scenario())


def test_close_keeps_the_first_reason() -> None:
    slots = RequestSlots(2)
    assert slots.closed is None
    slots.close("the API rejected the key (401)")
    slots.close("the API rejected the key (403)")
    assert slots.closed == "the API rejected the key (401)"


def test_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RequestSlots(0)
