"""The page walker: reads ahead of the checkpoints, never more than its budget.

Over real HTTP to the DIP simulator on loopback, with syncpoint's own API client. The
walker runs on its own thread; these tests hold back the commits and look at how far it
got, which is what bounds the records a crash can cost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import date

import pytest

from syncpoint.blocks.dip_api import DipApi
from syncpoint.core.errors import ItemError
from syncpoint.core.interrupts import StopFlag
from syncpoint.simulator import FaultKind, MarketSimulator, SimulatorConfig
from syncpoint.sources.documents import Window
from syncpoint.tasks.segments import LoopGuard, PageReader, PageWalker

ENTITY = "vorgang"
RECORDS, PAGE = 1000, 100
WINDOW = Window(None, "2030-01-01T00:00:00+00:00")
LOG = logging.getLogger("test-page-walker")


@pytest.fixture
def sim() -> Iterator[MarketSimulator]:
    config = SimulatorConfig(
        dip_records_per_entity=RECORDS, dip_page_size=PAGE, as_of=date(2025, 6, 30)
    )
    with MarketSimulator(config) as running:
        yield running


@pytest.fixture
def reader(sim: MarketSimulator) -> Iterator[PageReader]:
    with PageReader(DipApi(base_url=sim.base_url)) as open_reader:
        yield open_reader


def requests(sim: MarketSimulator) -> int:
    return sim.requests_for(ENTITY, f"dip/{ENTITY}")


def settle(sim: MarketSimulator, walk: PageWalker) -> int:
    """The request count once the walker is held back by its budget (it then sends
    nothing until records are committed)."""
    deadline = time.monotonic() + 30
    while not walk.waiting:
        assert time.monotonic() < deadline, "the walker never reached its budget"
        time.sleep(0.01)
    return requests(sim)


def walker(reader: PageReader, budget: int, stop: StopFlag | None = None) -> PageWalker:
    return PageWalker(
        reader, ENTITY, WINDOW, None, LoopGuard(), stop or StopFlag(), budget=budget, log=LOG
    )


def test_the_walker_stops_at_its_budget_until_records_are_committed(
    sim: MarketSimulator, reader: PageReader
) -> None:
    with walker(reader, budget=300) as walk:
        first = walk.segment(200, max_seconds=30)
        # Nothing committed yet: 300 records read, and not one request more.
        assert settle(sim, walk) == 3
        assert first is not None
        assert (first.delivered, first.pages) == (200, 2)

        walk.committed(first)
        assert settle(sim, walk) == 5  # room for two more pages, no more

        rest = []
        while (segment := walk.segment(200, max_seconds=30)) is not None:
            rest.append(segment)
            walk.committed(segment)

    ids = [r["id"] for s in [first, *rest] for r in s.rows]
    assert len(ids) == len(set(ids)) == RECORDS
    assert rest[-1].done
    assert requests(sim) == RECORDS // PAGE + 1  # every page once, and the end


def test_segments_carry_the_cursor_after_their_last_page(
    sim: MarketSimulator, reader: PageReader
) -> None:
    with walker(reader, budget=1000) as walk:
        first = walk.segment(200, max_seconds=30)
        assert first is not None
        walk.committed(first)
        second = walk.segment(200, max_seconds=30)

    assert second is not None
    # Resuming from the first segment's cursor reads exactly the second segment.
    resumed = PageWalker(
        reader, ENTITY, WINDOW, first.cursor, LoopGuard(first.cursor), StopFlag(), 1000, LOG
    )
    with resumed as walk:
        replay = walk.segment(200, max_seconds=30)
    assert replay is not None
    assert [r["id"] for r in replay.rows] == [r["id"] for r in second.rows]


def test_a_stop_hands_out_what_was_read_then_ends(sim: MarketSimulator, reader: PageReader) -> None:
    stop = StopFlag()
    with walker(reader, budget=400, stop=stop) as walk:
        assert settle(sim, walk) == 4
        stop.request("test")
        read = walk.segment(10_000, max_seconds=30)
        assert read is not None
        walk.committed(read)
        after = walk.segment(10_000, max_seconds=30)

    assert read.delivered == 400  # nothing read is dropped: it is stored, not fetched again
    assert not read.done
    assert after is None
    assert requests(sim) == 4


def test_an_error_comes_after_the_pages_read_before_it(
    sim: MarketSimulator, reader: PageReader
) -> None:
    sim.dip_plan(ENTITY, 2, lambda: sim.set_fault(ENTITY, FaultKind.NOT_FOUND))
    with walker(reader, budget=1000) as walk:
        before = walk.segment(10_000, max_seconds=30)
        assert before is not None
        walk.committed(before)
        after = walk.segment(10_000, max_seconds=30)

    assert before.delivered == 200  # the two pages before the 404 are handed out first
    assert after is None
    assert isinstance(walk.error, ItemError)  # and then why the walk ended
    assert walk.finished


def test_a_segment_is_handed_out_again_until_it_is_committed(
    sim: MarketSimulator, reader: PageReader
) -> None:
    with walker(reader, budget=1000) as walk:
        first = walk.segment(200, max_seconds=30)
        again = walk.segment(200, max_seconds=30)  # a store that failed, retried
        assert first is not None
        walk.committed(first)
        second = walk.segment(200, max_seconds=30)

    assert again is first
    assert second is not None
    assert second.rows[0]["id"] != first.rows[0]["id"]


def test_a_time_limit_cuts_a_segment(sim: MarketSimulator, reader: PageReader) -> None:
    sim.config.latency_ms = 100
    with walker(reader, budget=1000) as walk:
        started = time.monotonic()
        segment = walk.segment(10_000, max_seconds=0.35)
        took = time.monotonic() - started

    assert segment is not None
    assert 1 <= segment.pages < RECORDS // PAGE
    assert took < 2
