"""Batch leases for sharded runs, on real SQLite and PostgreSQL.

Several workers lease batches of one stage's pending items; none gets an item another
holds, a dead worker's items come back when its lease runs out, and a worker whose lease
ran out can mark nothing: its transaction, rows included, rolls back (fencing).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime

import pytest
from sqlalchemy import select, update

from syncpoint.core.db import Database
from syncpoint.core.ledger import ItemOutcome, Lease, LeaseLost, Ledger, new_owner
from syncpoint.core.store import upsert
from syncpoint.core.tables import stock_prices, sync_items

from .ledger_helpers import done, open_run, transient

STAGE = "prices"


@pytest.fixture
def shared(database_url: str) -> Iterator[tuple[Ledger, str]]:
    """A ledger with a run of 40 pending items in STAGE; the run's id."""
    ledger = Ledger(Database.from_url(database_url).engine())
    owner = new_owner()
    run = open_run(ledger, owner, stages=(STAGE,))
    ledger.add_items(run.run_id, STAGE, [f"T{i:03d}" for i in range(40)])
    yield ledger, run.run_id
    ledger.release(owner)


def mark_leased(ledger: Ledger, lease: Lease, outcomes: list[ItemOutcome] | None = None) -> None:
    with ledger.engine.begin() as conn:
        ledger.mark(
            conn,
            lease.run_id,
            lease.stage,
            outcomes if outcomes is not None else done(*(p.item for p in lease.items)),
            lease.batch_no,
            lease=lease,
        )


def expire(ledger: Ledger, lease: Lease) -> None:
    """Let a lease run out now, as waiting past `until` would."""
    with ledger.engine.begin() as conn:
        conn.execute(
            update(sync_items)
            .where(sync_items.c.item.in_([p.item for p in lease.items]))
            .values(lease_until=lease.until.replace(year=2000))
        )


def test_leases_split_a_stage_in_order_without_overlap(shared: tuple[Ledger, str]) -> None:
    ledger, run_id = shared
    a, b = new_owner(), new_owner()
    leases = []
    while (lease := ledger.lease(run_id, STAGE, a if len(leases) % 2 else b, 15, 60)) is not None:
        leases.append(lease)
    assert [len(x.items) for x in leases] == [15, 15, 10]
    assert [x.batch_no for x in leases] == [1, 2, 3]
    items = [p.item for x in leases for p in x.items]
    assert items == [f"T{i:03d}" for i in range(40)]  # each once, in item order
    assert ledger.count_pending(run_id, STAGE) == 40  # leased is not settled


def test_workers_leasing_at_once_share_every_item_once(shared: tuple[Ledger, str]) -> None:
    """Four threads lease and mark batches of 3 until nothing is left: each item is marked
    exactly once and every batch number is used once."""
    ledger, run_id = shared
    numbers: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        owner = new_owner()
        try:
            while (lease := ledger.lease(run_id, STAGE, owner, 3, 60)) is not None:
                numbers.append(lease.batch_no)
                mark_leased(ledger, lease)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(numbers) == list(range(1, 15))
    with ledger.engine.connect() as conn:
        attempts = Counter(conn.execute(select(sync_items.c.attempts)).scalars())
    assert attempts == {1: 40}
    counts = ledger.counts(run_id, STAGE)[STAGE]
    assert (counts.done, counts.untouched, counts.total) == (40, 0, 40)


def test_an_expired_lease_goes_to_another_worker_and_its_holder_writes_nothing(
    shared: tuple[Ledger, str], database_url: str
) -> None:
    ledger, run_id = shared
    data = Database.from_url(database_url)
    slow, fast = new_owner(), new_owner()
    first = ledger.lease(run_id, STAGE, slow, 5, 60)
    assert first is not None
    expire(ledger, first)  # the slow worker stalled (or died) past its lease

    second = ledger.lease(run_id, STAGE, fast, 5, 60)
    assert second is not None
    assert [p.item for p in second.items] == [p.item for p in first.items]
    assert second.batch_no == first.batch_no + 1

    # The slow worker wakes up and stores its batch: rows and marks in one transaction.
    row = {"ticker": "T000", "date": date(2026, 11, 20), "open": 1.0, "high": 2.0}
    row |= {"low": 0.5, "close": 1.5, "volume": 10}

    def store_batch() -> None:
        with data.engine().begin() as conn:
            upsert(conn, "stock_prices", [row])
            ledger.mark(conn, run_id, STAGE, done(*(p.item for p in first.items)), 1, lease=first)

    with pytest.raises(LeaseLost, match="ran out"):
        store_batch()
    with data.engine().connect() as conn:
        assert conn.execute(select(stock_prices)).all() == []  # rolled back with the marks
    assert ledger.counts(run_id, STAGE)[STAGE].done == 0

    mark_leased(ledger, second)
    assert ledger.counts(run_id, STAGE)[STAGE].done == 5


def test_a_lease_that_really_runs_out_can_be_taken(shared: tuple[Ledger, str]) -> None:
    """No row edited: a one-second lease, and the database's clock moving past it."""
    ledger, run_id = shared
    first = ledger.lease(run_id, STAGE, new_owner(), 40, 1)
    assert first is not None
    assert ledger.lease(run_id, STAGE, new_owner(), 40, 60) is None  # all held
    deadline = time.monotonic() + 10
    while (taken := ledger.lease(run_id, STAGE, new_owner(), 40, 60)) is None:
        assert time.monotonic() < deadline, "the lease never ran out"
        time.sleep(0.2)
    assert len(taken.items) == 40


def test_renewing_keeps_what_is_held_and_not_what_ran_out(shared: tuple[Ledger, str]) -> None:
    ledger, run_id = shared
    owner = new_owner()
    kept = ledger.lease(run_id, STAGE, owner, 4, 60)
    lapsed = ledger.lease(run_id, STAGE, owner, 4, 60)
    assert kept is not None
    assert lapsed is not None
    expire(ledger, lapsed)
    assert ledger.renew(run_id, owner, 600) == 4  # the held lease only
    taker = ledger.lease(run_id, STAGE, new_owner(), 4, 60)
    assert taker is not None
    assert [p.item for p in taker.items] == [p.item for p in lapsed.items]
    with ledger.engine.connect() as conn:
        until = conn.execute(
            select(sync_items.c.lease_until).where(sync_items.c.item == kept.items[0].item)
        ).scalar_one()
    assert _utc(until) > kept.until  # renewed past the first term
    mark_leased(ledger, kept)
    with pytest.raises(LeaseLost):
        mark_leased(ledger, lapsed)


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def test_a_retry_pass_leases_transient_failures_once(shared: tuple[Ledger, str]) -> None:
    """The first pass leases untouched items only, so a transient failure is not leased
    again at once; a retry pass leases failures attempted fewer than `retry_below` times,
    so it cannot come round to the same one forever. Settled items are never leased."""
    ledger, run_id = shared
    owner = new_owner()
    lease = ledger.lease(run_id, STAGE, owner, 40, 60)
    assert lease is not None
    names = [p.item for p in lease.items]
    mark_leased(ledger, lease, [*done(*names[:38]), *(transient(n) for n in names[38:])])
    assert ledger.lease(run_id, STAGE, owner, 40, 60) is None
    again = ledger.lease(run_id, STAGE, owner, 40, 60, retry_below=2)
    assert again is not None
    assert [(p.item, p.attempts) for p in again.items] == [(n, 1) for n in names[38:]]
    mark_leased(ledger, again, [transient(n) for n in names[38:]])
    assert ledger.lease(run_id, STAGE, owner, 40, 60, retry_below=2) is None


def test_a_mark_without_a_lease_is_not_fenced(shared: tuple[Ledger, str]) -> None:
    """The single-process path marks without leases, as before."""
    ledger, run_id = shared
    with ledger.engine.begin() as conn:
        ledger.mark(conn, run_id, STAGE, done("T000", "T001"), 1)
    assert ledger.counts(run_id, STAGE)[STAGE].done == 2


def test_releasing_frees_only_what_is_still_the_releasers(shared: tuple[Ledger, str]) -> None:
    ledger, run_id = shared
    mine = ledger.lease(run_id, STAGE, new_owner(), 5, 600)
    lapsed = ledger.lease(run_id, STAGE, new_owner(), 5, 600)
    assert mine is not None
    assert lapsed is not None
    expire(ledger, lapsed)
    taker = ledger.lease(run_id, STAGE, new_owner(), 5, 600)
    assert taker is not None
    ledger.release_lease(mine)  # free at once, long before its ten minutes
    ledger.release_lease(lapsed)  # the taker's now: left alone
    again = ledger.lease(run_id, STAGE, new_owner(), 40, 600)
    assert again is not None
    assert {p.item for p in again.items} >= {p.item for p in mine.items}
    assert not {p.item for p in again.items} & {p.item for p in taker.items}
    mark_leased(ledger, taker)
