"""fewer_collections: raised while any stage is inside, restored by the last one out."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from syncpoint.core.gc_pace import YOUNGEST_EVERY, fewer_collections


@pytest.fixture(autouse=True)
def default_threshold() -> Iterator[None]:
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield
    gc.set_threshold(*before)


def test_raised_inside_and_restored_after() -> None:
    with fewer_collections():
        assert gc.get_threshold() == (YOUNGEST_EVERY, 10, 10)
    assert gc.get_threshold() == (700, 10, 10)


def test_restored_when_the_stage_raises() -> None:
    with pytest.raises(RuntimeError), fewer_collections():
        raise RuntimeError("store failed")
    assert gc.get_threshold() == (700, 10, 10)


def test_two_stages_in_threads_restore_only_when_both_have_left() -> None:
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[tuple[int, ...]] = []

    def first() -> None:
        with fewer_collections():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second() -> None:
        first_in.wait(5)
        with fewer_collections():
            second_in.set()
            first_out.wait(5)
            seen.append(gc.get_threshold())  # the first stage has left; this one has not

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == [(YOUNGEST_EVERY, 10, 10)]
    assert gc.get_threshold() == (700, 10, 10)


def test_a_tuned_or_disabled_collector_is_left_alone() -> None:
    gc.set_threshold(0)
    with fewer_collections():
        assert gc.get_threshold()[0] == 0
    gc.set_threshold(500_000, 10, 10)
    with fewer_collections():
        assert gc.get_threshold()[0] == 500_000
    assert gc.get_threshold()[0] == 500_000
