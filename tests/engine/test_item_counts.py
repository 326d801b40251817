"""The counts the ledger keeps (sync_item_counts) always equal a count of the items.

Every operation that changes sync_items is applied in turn, and after each the kept
counts are compared with a GROUP BY over the items themselves, which is what the ledger
used to run on every status call.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import func, select

from syncpoint.core.ledger import Ledger, RunStatus, StageCounts, bucket
from syncpoint.core.tables import sync_item_counts, sync_items

from .ledger_helpers import JOB, KEY, done, mark, open_run, permanent, transient

Owners = Callable[[], str]


def recount(ledger: Ledger, run_id: str) -> dict[str, StageCounts]:
    """The counts as the items themselves say."""
    query = (
        select(sync_items.c.stage, sync_items.c.status, sync_items.c.error_kind, func.count())
        .where(sync_items.c.run_id == run_id)
        .group_by(sync_items.c.stage, sync_items.c.status, sync_items.c.error_kind)
    )
    tally: dict[str, dict[str, int]] = {}
    with ledger.engine.connect() as conn:
        for stage, status, kind, n in conn.execute(query):
            t = tally.setdefault(stage, {"done": 0, "failed": 0, "retrying": 0, "untouched": 0})
            t[bucket(status, kind)] += n
    return {stage: StageCounts(total=sum(t.values()), **t) for stage, t in tally.items()}


def kept_rows(ledger: Ledger) -> int:
    with ledger.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(sync_item_counts)).scalar_one())


def test_kept_counts_follow_every_change_to_the_items(ledger: Ledger, make_owner: Owners) -> None:
    run = open_run(ledger, make_owner())
    rid = run.run_id

    def check() -> None:
        assert ledger.counts(rid) == recount(ledger, rid)
        for stage, counts in recount(ledger, rid).items():
            assert ledger.count_pending(rid, stage) == counts.pending

    items = [f"T{i:03d}" for i in range(40)]
    assert ledger.add_items(rid, "prices", items) == 40
    check()
    assert ledger.add_items(rid, "prices", [*items[:10], "NEW", "NEW"]) == 1  # known ones kept
    check()
    ledger.add_items(rid, "dcf", items[:5])
    check()

    mark(ledger, rid, "prices", done(*items[:10]), batch_no=1)
    check()
    mark(ledger, rid, "prices", [permanent(items[10]), transient(items[11])], batch_no=2)
    check()
    # A retried item moves out of "retrying"; one marked twice in a batch moves once.
    mark(ledger, rid, "prices", [*done(items[11]), transient(items[12]), *done(items[12])], 3)
    check()
    # Marking done again, or an item the ledger does not hold: nothing moves.
    mark(ledger, rid, "prices", done(items[0], "UNKNOWN"), batch_no=4)
    check()
    mark(ledger, rid, "dcf", [permanent(items[0]), transient(items[1])], batch_no=1)
    check()

    assert ledger.requeue_failed(rid, "dcf") == sorted(items[:2])
    check()
    assert ledger.counts(rid)["dcf"] == StageCounts(5, untouched=5)

    expected = recount(ledger, rid)["prices"]
    assert expected == StageCounts(41, done=12, failed=1, retrying=0, untouched=28)

    assert ledger.delete(JOB, KEY) == 1
    assert ledger.counts(rid) == {}
    assert kept_rows(ledger) == 0


def test_expiring_a_run_drops_its_counts(ledger: Ledger, make_owner: Owners) -> None:
    owner = make_owner()
    run = open_run(ledger, owner)
    ledger.add_items(run.run_id, "prices", ["A", "B"])
    mark(ledger, run.run_id, "prices", done("A", "B"))
    ledger.set_status(run.run_id, RunStatus.COMPLETED)
    assert kept_rows(ledger) > 0
    # Finished "now", so expiring everything older than -1 days takes it.
    assert ledger.expire(older_than_days=-1) == 1
    assert kept_rows(ledger) == 0
