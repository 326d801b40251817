"""The ledger at scale: planning reads pending items in pages as batches need them,
registration goes in chunks, and nothing a batch does reads the whole run.

Counts, not timings: the timings live in bench/ledger_scale.py and BENCHMARKS.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from syncpoint.core.ledger import ErrorKind, ItemOutcome, Ledger, PendingItem
from syncpoint.engine.batch_map import iter_batches, plan_batches, planned_items
from tests.engine.ledger_helpers import mark, open_run

STAGE = "prices"


def names(n: int) -> list[str]:
    return [f"S{i:05d}" for i in range(n)]


class Pages:
    """Pending pages as a planner consumes them: how many were read so far."""

    def __init__(self, pages: Iterator[list[PendingItem]]) -> None:
        self._pages = pages
        self.read = 0

    def __iter__(self) -> Iterator[list[PendingItem]]:
        for page in self._pages:
            self.read += 1
            yield page


def test_pages_cover_the_pending_items_once_in_order(
    ledger: Ledger, make_owner: Callable[[], str]
) -> None:
    run = open_run(ledger, make_owner())
    items = names(1003)
    assert ledger.add_items(run.run_id, STAGE, items) == 1003
    mark(ledger, run.run_id, STAGE, [ItemOutcome.done(i) for i in items[::2]])
    pages = list(ledger.pending_pages(run.run_id, STAGE, page_size=100))
    assert [len(p) for p in pages] == [100] * 5 + [1]
    assert [p.item for page in pages for p in page] == items[1::2]
    assert ledger.count_pending(run.run_id, STAGE) == 501
    assert ledger.pending(run.run_id, STAGE) == [p for page in pages for p in page]


def test_items_marked_while_paging_neither_shift_a_page_nor_come_back(
    ledger: Ledger, make_owner: Callable[[], str]
) -> None:
    run = open_run(ledger, make_owner())
    items = names(300)
    ledger.add_items(run.run_id, STAGE, items)
    seen: list[str] = []
    for page in ledger.pending_pages(run.run_id, STAGE, page_size=50):
        seen += [p.item for p in page]
        # The batches planned from this page are fetched and marked before the next page
        # is read; a transient failure stays pending, but behind the pages already read.
        mark(
            ledger,
            run.run_id,
            STAGE,
            [ItemOutcome.failed(p.item, ErrorKind.TRANSIENT, "503") for p in page],
        )
    assert seen == items


def test_planning_reads_a_page_only_when_a_batch_needs_it(
    ledger: Ledger, make_owner: Callable[[], str]
) -> None:
    run = open_run(ledger, make_owner())
    ledger.add_items(run.run_id, STAGE, names(10_000))
    pages = Pages(ledger.pending_pages(run.run_id, STAGE, page_size=1000))
    batches = iter_batches(pages, run_id=run.run_id, stage=STAGE, batch_size=50, first_number=1)
    first = [next(batches) for _ in range(20)]  # 1,000 items: exactly one page
    assert pages.read == 1
    assert [b.number for b in first] == list(range(1, 21))
    next(batches)
    assert pages.read == 2
    assert sum(len(b.items) for b in batches) == 10_000 - 21 * 50
    assert pages.read == 10


def test_a_cap_stops_reading_pages(ledger: Ledger, make_owner: Callable[[], str]) -> None:
    run = open_run(ledger, make_owner())
    ledger.add_items(run.run_id, STAGE, names(5000))
    pages = Pages(ledger.pending_pages(run.run_id, STAGE, page_size=500))
    planned = list(
        iter_batches(
            pages, run_id=run.run_id, stage=STAGE, batch_size=5, first_number=7, max_batches=3
        )
    )
    assert [len(b.items) for b in planned] == [5, 5, 5]
    assert pages.read == 1


def _both(
    pending: Sequence[PendingItem], **caps: int | frozenset[str] | None
) -> tuple[list[tuple[int, tuple[str, ...]]], int]:
    kwargs = {"run_id": "r", "stage": STAGE, "batch_size": 4, "first_number": 1}
    whole = plan_batches(pending, **kwargs, **caps)  # type: ignore[arg-type]
    paged = list(
        iter_batches(
            [pending[i : i + 3] for i in range(0, len(pending), 3)],
            **kwargs,  # type: ignore[arg-type]
            **caps,  # type: ignore[arg-type]
        )
    )
    assert paged == whole
    count = planned_items(len(pending), batch_size=4, **caps)  # type: ignore[arg-type]
    assert count == sum(len(b.items) for b in whole)
    return [(b.number, tuple(p.item for p in b.items)) for b in whole], count


def test_paged_planning_equals_planning_the_whole_list() -> None:
    pending = [PendingItem(i, 0) for i in names(23)]
    assert _both(pending)[1] == 23
    assert _both(pending, max_items=10)[1] == 10
    assert _both(pending, max_batches=2)[1] == 8
    assert _both(pending, max_batches=2, max_items=5)[1] == 5
    only = frozenset(names(23)[::5])
    planned, count = _both(pending, only=only)
    assert count == 5
    assert [items for _, items in planned] == [tuple(sorted(only))[:4], tuple(sorted(only))[4:]]


def test_registration_in_chunks_keeps_known_items_and_counts_duplicates_once(
    ledger: Ledger, make_owner: Callable[[], str]
) -> None:
    run = open_run(ledger, make_owner())
    first = names(2500)
    assert ledger.add_items(run.run_id, STAGE, first[:1200]) == 1200
    mark(ledger, run.run_id, STAGE, [ItemOutcome.done(first[0])])
    # Duplicates within a chunk and across chunks (more than one chunk of 1,000).
    again = [*first, *first[:10], first[1500], *first[2000:2100]]
    assert ledger.add_items(run.run_id, STAGE, iter(again)) == 1300
    counts = ledger.counts(run.run_id)[STAGE]
    assert (counts.total, counts.done, counts.untouched) == (2500, 1, 2499)


def test_one_stage_counts_read_only_that_stage(
    ledger: Ledger, make_owner: Callable[[], str]
) -> None:
    run = open_run(ledger, make_owner())
    ledger.add_items(run.run_id, "prices", names(30))
    ledger.add_items(run.run_id, "dcf", names(20))
    assert set(ledger.counts(run.run_id)) == {"prices", "dcf"}
    assert set(ledger.counts(run.run_id, "dcf")) == {"dcf"}
    assert ledger.counts(run.run_id, "dcf")["dcf"].total == 20
