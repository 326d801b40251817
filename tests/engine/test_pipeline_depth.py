"""How many batches a stage fetches at once, and the crash bound that follows from it."""

from __future__ import annotations

import pytest

from syncpoint.engine.batch_map import (
    WINDOW_ITEMS,
    batches_per_window,
    fetches_in_flight,
    unmarked_batches_at_most,
)


@pytest.mark.parametrize(
    ("concurrency", "batch_size", "depth"),
    [
        pytest.param(16, 5, 5, id="fill-cache-default: 4 batches hold 16 items, 1 queued"),
        pytest.param(16, 50, 2, id="daily-default: never fewer than two"),
        pytest.param(32, 50, 2, id="batch-larger-than-slots"),
        pytest.param(32, 10, 5, id="batch-10-concurrency-32"),
        pytest.param(2, 10, 2, id="tiny-concurrency"),
        pytest.param(16, 1, 17, id="one-item-batches"),
        pytest.param(16, 16, 2, id="batch-equals-concurrency"),
    ],
)
def test_depth_fills_the_slots(concurrency: int, batch_size: int, depth: int) -> None:
    assert fetches_in_flight(concurrency, batch_size) == depth
    # Items queued across the batches in flight cover every slot, with a batch to spare:
    # the slot a finished request frees finds the next item waiting.
    assert (depth - 1) * batch_size >= concurrency or depth == 2


@pytest.mark.parametrize(("concurrency", "batch_size"), [(16, 5), (32, 50), (2, 10), (16, 1)])
def test_a_crash_loses_the_fetches_in_flight_and_the_batch_storing(
    concurrency: int, batch_size: int
) -> None:
    depth = fetches_in_flight(concurrency, batch_size)
    assert unmarked_batches_at_most(concurrency, batch_size) == depth + 1


@pytest.mark.parametrize(("concurrency", "batch_size"), [(0, 5), (16, 0)])
def test_nonsense_is_refused(concurrency: int, batch_size: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        fetches_in_flight(concurrency, batch_size)


@pytest.mark.parametrize(
    ("batch_size", "per_window"),
    [
        pytest.param(5, 50, id="fill-cache-default: fifty batches a task run"),
        pytest.param(50, 5, id="daily-default: five"),
        pytest.param(100, 3, id="rounded-up-to-the-window"),
        pytest.param(250, 1, id="one-batch-a-task-run-from-the-window-up"),
        pytest.param(1000, 1, id="larger-than-the-window"),
    ],
)
def test_a_fetch_task_run_takes_a_window_of_at_least_250_items(
    batch_size: int, per_window: int
) -> None:
    assert batches_per_window(batch_size) == per_window
    assert per_window * batch_size >= WINDOW_ITEMS == 250
    # Never a batch more than the window needs.
    assert (per_window - 1) * batch_size < WINDOW_ITEMS
