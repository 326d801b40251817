"""plan_batches: which pending items this invocation takes, in which numbered batches.

Pure planning, so most cases are a table; the last test feeds it from a real ledger the
way map_batches does, to show batch numbers continuing across invocations of a run.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from syncpoint.core.ledger import Ledger, PendingItem
from syncpoint.engine.batch_map import plan_batches
from syncpoint.tasks.batches import Batch

from .ledger_helpers import done, mark, open_run, permanent, transient

RUN, STAGE = "run-1", "prices"
LETTERS = "ABCDEFG"


def pending(names: str = LETTERS) -> list[PendingItem]:
    """One pending item per letter; the attempts tell the items apart from their names."""
    return [PendingItem(name, attempts=i % 3) for i, name in enumerate(names)]


def layout(batches: list[Batch]) -> list[tuple[int, str]]:
    """Each batch as (number, its items' names joined): the plan at a glance."""
    return [(b.number, "".join(p.item for p in b.items)) for b in batches]


@pytest.mark.parametrize(
    ("names", "options", "expected"),
    [
        pytest.param("ABCDEF", {"batch_size": 3}, [(1, "ABC"), (2, "DEF")], id="exact-multiple"),
        pytest.param(
            LETTERS, {"batch_size": 3}, [(1, "ABC"), (2, "DEF"), (3, "G")], id="remainder"
        ),
        pytest.param(
            LETTERS, {"batch_size": 1}, [(i + 1, c) for i, c in enumerate(LETTERS)], id="size-1"
        ),
        pytest.param("AB", {"batch_size": 50}, [(1, "AB")], id="size-beyond-pending"),
        pytest.param("", {"batch_size": 5}, [], id="nothing-pending"),
        pytest.param(
            LETTERS, {"batch_size": 3, "max_items": 4}, [(1, "ABC"), (2, "D")], id="max-items"
        ),
        pytest.param(
            LETTERS, {"batch_size": 3, "max_items": 3}, [(1, "ABC")], id="max-items-one-batch"
        ),
        pytest.param(LETTERS, {"batch_size": 3, "max_items": 0}, [], id="max-items-0"),
        pytest.param(
            LETTERS,
            {"batch_size": 3, "max_items": 99},
            [(1, "ABC"), (2, "DEF"), (3, "G")],
            id="max-items-beyond",
        ),
        pytest.param(
            LETTERS, {"batch_size": 3, "max_batches": 2}, [(1, "ABC"), (2, "DEF")], id="max-batches"
        ),
        pytest.param(LETTERS, {"batch_size": 3, "max_batches": 0}, [], id="max-batches-0"),
        pytest.param(
            LETTERS,
            {"batch_size": 3, "max_batches": 9},
            [(1, "ABC"), (2, "DEF"), (3, "G")],
            id="max-batches-beyond",
        ),
        pytest.param(
            LETTERS,
            {"batch_size": 3, "max_batches": 2, "max_items": 5},
            [(1, "ABC"), (2, "DE")],
            id="both-caps-items-tighter",
        ),
        pytest.param(
            LETTERS,
            {"batch_size": 3, "max_batches": 1, "max_items": 5},
            [(1, "ABC")],
            id="both-caps-batches-tighter",
        ),
        pytest.param(
            LETTERS,
            {"batch_size": 2, "only": frozenset("GBDX")},
            [(1, "BD"), (2, "G")],
            id="only-keeps-pending-order",
        ),
        pytest.param(LETTERS, {"batch_size": 2, "only": frozenset()}, [], id="only-nothing"),
        pytest.param(
            LETTERS, {"batch_size": 2, "only": frozenset("XYZ")}, [], id="only-none-pending"
        ),
        pytest.param(
            LETTERS,
            {"batch_size": 2, "only": frozenset("ACEG"), "max_batches": 1},
            [(1, "AC")],
            id="only-before-max-batches",
        ),
        pytest.param(
            LETTERS,
            {"batch_size": 2, "only": frozenset("ACEG"), "max_items": 3},
            [(1, "AC"), (2, "E")],
            id="only-before-max-items",
        ),
        pytest.param(
            LETTERS,
            {"batch_size": 3, "first_number": 8},
            [(8, "ABC"), (9, "DEF"), (10, "G")],
            id="numbering-continues",
        ),
        pytest.param(
            LETTERS,
            {"batch_size": 4, "first_number": 8, "max_batches": 1},
            [(8, "ABCD")],
            id="numbering-with-cap",
        ),
    ],
)
def test_plan(names: str, options: dict[str, object], expected: list[tuple[int, str]]) -> None:
    arguments: dict[str, object] = {"first_number": 1, **options}
    batches = plan_batches(pending(names), run_id=RUN, stage=STAGE, **arguments)  # type: ignore[arg-type]
    assert layout(batches) == expected


def test_batches_carry_the_run_the_stage_and_the_pending_items_themselves() -> None:
    items = pending("ABCDE")

    batches = plan_batches(items, run_id=RUN, stage=STAGE, batch_size=2, first_number=4)

    assert batches == [
        Batch(RUN, STAGE, 4, (items[0], items[1])),
        Batch(RUN, STAGE, 5, (items[2], items[3])),
        Batch(RUN, STAGE, 6, (items[4],)),
    ]
    # The attempt counts travel with the items: they are part of the fetch cache key.
    assert [p.attempts for b in batches for p in b.items] == [0, 1, 2, 0, 1]


def test_planning_leaves_its_input_alone_and_takes_any_sequence() -> None:
    items = pending()
    before = list(items)

    as_list = plan_batches(
        items,
        run_id=RUN,
        stage=STAGE,
        batch_size=3,
        first_number=1,
        max_items=2,
        only=frozenset("AB"),
    )
    as_tuple = plan_batches(
        tuple(items),
        run_id=RUN,
        stage=STAGE,
        batch_size=3,
        first_number=1,
        max_items=2,
        only=frozenset("AB"),
    )

    assert items == before
    assert as_list == as_tuple
    assert layout(as_list) == [(1, "AB")]


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7, 8])
def test_every_pending_item_is_planned_exactly_once(size: int) -> None:
    items = pending()
    batches = plan_batches(items, run_id=RUN, stage=STAGE, batch_size=size, first_number=1)

    assert [p for b in batches for p in b.items] == items
    assert all(len(b.items) == size for b in batches[:-1])
    assert 1 <= len(batches[-1].items) <= size
    assert [b.number for b in batches] == list(range(1, len(batches) + 1))


def test_a_resumed_run_plans_only_what_is_left_numbered_after_its_last_batch(
    ledger: Ledger, make_owner: Callable[[], str]
) -> None:
    """What map_batches feeds the planner, from a real ledger."""
    run = open_run(ledger, make_owner())
    ledger.add_items(run.run_id, STAGE, list(LETTERS))
    mark(ledger, run.run_id, STAGE, [*done("A"), permanent("B"), transient("C")], batch_no=1)
    mark(ledger, run.run_id, STAGE, done("D"), batch_no=2)

    def plan() -> list[Batch]:
        return plan_batches(
            ledger.pending(run.run_id, STAGE),
            run_id=run.run_id,
            stage=STAGE,
            batch_size=2,
            first_number=ledger.last_batch_no(run.run_id, STAGE) + 1,
            max_batches=1,
        )

    first = plan()
    assert layout(first) == [(3, "CE")]
    assert [p.attempts for p in first[0].items] == [1, 0]  # C failed once before

    mark(ledger, run.run_id, STAGE, done("C", "E"), batch_no=3)
    assert layout(plan()) == [(4, "FG")]
    mark(ledger, run.run_id, STAGE, done("F", "G"), batch_no=4)
    assert plan() == []
