"""The checkpoint ledger's transitions, on a real SQLite file.

Every figure is read back from the database the ledger wrote: runs are claimed, resumed,
refused, reopened and reset; items go pending -> done / failed and back.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from syncpoint.core.errors import CheckpointError
from syncpoint.core.ledger import (
    Claim,
    ItemFailure,
    ItemOutcome,
    ItemStatus,
    Ledger,
    PendingItem,
    RunBusy,
    RunStatus,
    StageCounts,
)

from .ledger_helpers import (
    JOB,
    KEY,
    ago,
    done,
    item_row,
    item_rows,
    mark,
    open_run,
    permanent,
    run_column,
    set_run_columns,
    transient,
)

RESET = f"syncpoint checkpoints reset {JOB} --key {KEY}"
Owners = Callable[[], str]


def reopen(ledger: Ledger, owner: str, *, fresh: bool = False, **options: Any) -> Claim:
    """Open (job, key) again as `owner`."""
    return ledger.open(
        JOB, KEY, stages=("prices", "dcf"), params={}, fresh=fresh, owner=owner, **options
    )


# --- open: create, resume, refuse ---------------------------------------------------------


def test_open_creates_a_running_run_held_by_its_owner(ledger: Ledger, make_owner: Owners) -> None:
    owner = make_owner()
    claim = ledger.open(
        JOB, KEY, stages=["prices", "dcf"], params={"batch_size": 5}, fresh=False, owner=owner
    )

    assert (claim.resumed, claim.took_over) == (False, None)
    run = claim.run
    assert (run.job, run.run_key, run.status) == (JOB, KEY, RunStatus.RUNNING)
    assert run.state.stages == ["prices", "dcf"]
    assert run.state.params == {"batch_size": 5}
    assert (run.state.summary, run.state.stream, run.finished_at) == (None, None, None)
    assert run_column(ledger, run.run_id, "owner") == owner
    assert run_column(ledger, run.run_id, "version") == 1
    latest = ledger.latest(JOB, KEY)
    assert latest is not None
    assert latest.run_id == run.run_id
    assert ledger.latest(JOB, "2026-11-21") is None


def test_open_refuses_a_run_a_live_owner_of_this_process_holds(
    ledger: Ledger, make_owner: Owners
) -> None:
    holder = make_owner()
    run = open_run(ledger, holder)

    with pytest.raises(RunBusy, match="is already running") as refused:
        reopen(ledger, make_owner())
    assert holder in str(refused.value)
    assert f"{JOB} {KEY}" in str(refused.value)
    with pytest.raises(RunBusy):
        reopen(ledger, make_owner(), fresh=True)  # --fresh does not wipe a live run
    with pytest.raises(RunBusy):
        ledger.ensure_idle(JOB, KEY)
    # The refused attempts changed nothing.
    assert run_column(ledger, run.run_id, "owner") == holder
    latest = ledger.latest(JOB, KEY)
    assert latest is not None
    assert latest.run_id == run.run_id


def test_a_run_left_running_by_a_released_owner_is_taken_over_at_once(
    ledger: Ledger, make_owner: Owners
) -> None:
    first, second = make_owner(), make_owner()
    run = open_run(ledger, first)
    ledger.release(first)  # the attempt that held it was abandoned; this process lives on

    ledger.ensure_idle(JOB, KEY)  # no longer busy
    claim = reopen(ledger, second)

    assert (claim.resumed, claim.took_over) == (True, first)
    assert claim.run.run_id == run.run_id
    assert claim.run.status is RunStatus.RUNNING
    assert run_column(ledger, run.run_id, "owner") == second


def test_a_mark_between_reading_a_dead_holders_run_and_claiming_it_does_not_refuse(
    ledger: Ledger, make_owner: Owners, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parent started again while its shard workers still mark batches: a worker's mark
    bumps the run's heartbeat between the new parent's read and its claim. The claim
    compares the holder, not the heartbeat, so it takes the run over."""
    first = make_owner()
    run = open_run(ledger, first)
    ledger.add_items(run.run_id, "prices", ["AAA"])
    ledger.release(first)
    read = ledger._latest_row(JOB, KEY)  # the new parent's read...
    with ledger.engine.begin() as conn:  # ...then a worker's mark, before the claim
        ledger.mark(conn, run.run_id, "prices", [ItemOutcome.done("AAA")])
    monkeypatch.setattr(ledger, "_latest_row", lambda job, run_key: read)

    second = make_owner()
    claim = reopen(ledger, second)
    assert (claim.resumed, claim.took_over) == (True, first)
    assert run_column(ledger, run.run_id, "owner") == second

    # Two starts that read the same holder: the second finds it changed, and is refused.
    with pytest.raises(RunBusy, match="just now"):
        reopen(ledger, make_owner())


def test_another_hosts_run_is_busy_until_its_heartbeat_is_stale(
    ledger: Ledger, make_owner: Owners
) -> None:
    run = open_run(ledger, make_owner())
    elsewhere = "another-host.invalid:4242:0badcafe"
    set_run_columns(ledger, run.run_id, owner=elsewhere, heartbeat_at=ago(seconds=60))

    with pytest.raises(RunBusy, match=r"heartbeat 60s ago"):
        reopen(ledger, make_owner())  # alive as far as we can tell: 60 s < 120 s

    set_run_columns(ledger, run.run_id, heartbeat_at=ago(seconds=121))
    claim = reopen(ledger, make_owner())
    assert (claim.resumed, claim.took_over) == (True, elsewhere)

    # stale_after is the caller's: a recent heartbeat is stale against a shorter limit.
    set_run_columns(ledger, run.run_id, owner=elsewhere, heartbeat_at=ago(seconds=30))
    assert reopen(ledger, make_owner(), stale_after=10).took_over == elsewhere


def test_a_partial_run_is_resumed(ledger: Ledger, make_owner: Owners) -> None:
    first = make_owner()
    run = open_run(ledger, first)
    ledger.set_status(run.run_id, RunStatus.PARTIAL)

    second = make_owner()
    claim = reopen(ledger, second)

    assert (claim.resumed, claim.took_over) == (True, None)
    assert claim.run.run_id == run.run_id
    assert (claim.run.status, claim.run.finished_at) == (RunStatus.RUNNING, None)
    assert run_column(ledger, run.run_id, "owner") == second


def test_a_completed_run_is_returned_unclaimed_unless_reopened(
    ledger: Ledger, make_owner: Owners
) -> None:
    first = make_owner()
    run = open_run(ledger, first)
    ledger.add_items(run.run_id, "prices", ["AAPL"])
    ledger.set_status(run.run_id, RunStatus.COMPLETED, summary={"rows": 1})

    claim = reopen(ledger, make_owner())
    assert claim.resumed is True
    assert claim.run.status is RunStatus.COMPLETED
    assert claim.run.finished
    assert claim.run.finished_at is not None
    assert run_column(ledger, run.run_id, "owner") == first  # nobody claimed it

    second = make_owner()
    claim = reopen(ledger, second, reopen=True)
    assert claim.resumed is True
    assert claim.run.run_id == run.run_id
    assert (claim.run.status, claim.run.finished_at) == (RunStatus.RUNNING, None)
    assert claim.run.state.summary == {"rows": 1}
    assert run_column(ledger, run.run_id, "owner") == second
    assert ledger.items(run.run_id, "prices") == ["AAPL"]


def test_fresh_deletes_the_run_and_its_items(ledger: Ledger, make_owner: Owners) -> None:
    old = open_run(ledger, make_owner())
    ledger.add_items(old.run_id, "prices", ["AAPL", "MSFT"])
    mark(ledger, old.run_id, "prices", done("AAPL"), batch_no=1)
    ledger.set_status(old.run_id, RunStatus.PARTIAL)

    claim = reopen(ledger, make_owner(), fresh=True)

    assert (claim.resumed, claim.took_over) == (False, None)
    assert claim.run.run_id != old.run_id
    assert claim.run.status is RunStatus.RUNNING
    assert item_rows(ledger, old.run_id) == 0
    assert ledger.counts(claim.run.run_id) == {}
    with pytest.raises(CheckpointError, match="no checkpoint with run id"):
        ledger.get(old.run_id)


# --- items --------------------------------------------------------------------------------


def test_add_items_registers_each_item_once(ledger: Ledger, make_owner: Owners) -> None:
    run = open_run(ledger, make_owner())
    assert not ledger.has_items(run.run_id, "prices")

    assert ledger.add_items(run.run_id, "prices", ["MSFT", "AAPL", "MSFT", "IBM"]) == 3
    assert ledger.add_items(run.run_id, "prices", ["AAPL", "ZM"]) == 1
    mark(ledger, run.run_id, "prices", done("AAPL"), batch_no=1)
    assert ledger.add_items(run.run_id, "prices", ["AAPL", "IBM"]) == 0

    assert ledger.has_items(run.run_id, "prices")
    assert ledger.items(run.run_id, "prices") == ["AAPL", "IBM", "MSFT", "ZM"]
    assert ledger.items(run.run_id, "prices", ItemStatus.DONE) == ["AAPL"]  # kept, not reset
    assert ledger.items(run.run_id, "prices", ItemStatus.PENDING) == ["IBM", "MSFT", "ZM"]
    # Stages are separate universes.
    assert not ledger.has_items(run.run_id, "dcf")
    assert ledger.add_items(run.run_id, "dcf", ["AAPL"]) == 1
    assert ledger.items(run.run_id, "dcf", ItemStatus.PENDING) == ["AAPL"]


def test_mark_records_each_outcome_and_counts_attempts(ledger: Ledger, make_owner: Owners) -> None:
    run = open_run(ledger, make_owner())
    ledger.add_items(run.run_id, "prices", ["A", "B", "C", "D"])
    set_run_columns(ledger, run.run_id, heartbeat_at=ago(hours=1))

    mark(ledger, run.run_id, "prices", [*done("A"), permanent("B"), transient("C")], batch_no=1)

    def row(item: str) -> tuple[Any, ...]:
        r = item_row(ledger, run.run_id, "prices", item)
        return (r["status"], r["error_kind"], r["last_error"], r["attempts"], r["batch_no"])

    assert row("A") == ("done", None, None, 1, 1)
    assert row("B") == ("failed", "permanent", "404 not found", 1, 1)
    assert row("C") == ("failed", "transient", "503 unavailable", 1, 1)
    assert row("D") == ("pending", None, None, 0, None)
    assert ledger.last_batch_no(run.run_id, "prices") == 1
    # Marking is a sign of life: the run's heartbeat moved from an hour ago to now.
    assert run_column(ledger, run.run_id, "heartbeat_at") > ago(minutes=1).replace(tzinfo=None)

    # The transient failure is retried in a later batch and succeeds: its error goes.
    mark(ledger, run.run_id, "prices", done("C"), batch_no=3)
    assert row("C") == ("done", None, None, 2, 3)
    assert ledger.last_batch_no(run.run_id, "prices") == 3
    assert ledger.last_batch_no(run.run_id, "dcf") == 0

    mark(ledger, run.run_id, "prices", [], batch_no=9)  # nothing to record: a no-op
    assert ledger.last_batch_no(run.run_id, "prices") == 3


def test_a_batch_is_marked_by_shared_outcome_and_its_counts_follow_the_items(
    ledger: Ledger, make_owner: Owners
) -> None:
    """Items sharing an outcome are marked together; an item the ledger does not hold is
    neither marked nor counted, and an item named twice takes its last outcome, once."""
    run = open_run(ledger, make_owner())
    ledger.add_items(run.run_id, "prices", ["A", "B", "C", "D", "E", "F"])
    mark(ledger, run.run_id, "prices", [permanent("F"), transient("E")], batch_no=1)

    outcomes = [
        *done("A", "B", "NOT-HELD"),
        permanent("C", "404 not found"),
        permanent("D", "422 bad symbol"),
        transient("E"),  # retried, fails again
        transient("A"),  # named twice: this outcome stands
        *done("F"),  # a permanent failure done after all
    ]
    mark(ledger, run.run_id, "prices", outcomes, batch_no=2)

    def row(item: str) -> tuple[Any, ...]:
        r = item_row(ledger, run.run_id, "prices", item)
        return (r["status"], r["error_kind"], r["last_error"], r["attempts"])

    assert row("A") == ("failed", "transient", "503 unavailable", 1)
    assert row("B") == ("done", None, None, 1)
    assert row("C") == ("failed", "permanent", "404 not found", 1)
    assert row("D") == ("failed", "permanent", "422 bad symbol", 1)
    assert row("E") == ("failed", "transient", "503 unavailable", 2)
    assert row("F") == ("done", None, None, 2)
    assert "NOT-HELD" not in ledger.items(run.run_id, "prices")
    counts = ledger.counts(run.run_id)["prices"]
    assert (counts.total, counts.done, counts.failed, counts.retrying, counts.untouched) == (
        6,
        2,
        2,
        2,
        0,
    )


def test_a_long_error_is_cut_to_1000_characters() -> None:
    outcome = transient("A", "x" * 5000)
    assert outcome.error == "x" * 1000


def test_items_settled_without_a_batch_are_counted_apart(
    ledger: Ledger, make_owner: Owners
) -> None:
    run = open_run(ledger, make_owner())
    ledger.add_items(run.run_id, "prices", ["A", "B", "C"])
    mark(ledger, run.run_id, "prices", done("A", "B"))  # already cached: no batch
    mark(ledger, run.run_id, "prices", done("C"), batch_no=1)

    assert ledger.settled_without_fetch(run.run_id, "prices") == 2
    assert ledger.last_batch_no(run.run_id, "prices") == 1


def test_pending_is_the_universe_minus_done_and_permanent_failures(
    ledger: Ledger, make_owner: Owners
) -> None:
    run = open_run(ledger, make_owner())
    ledger.add_items(run.run_id, "prices", ["E", "D", "C", "B", "A"])
    mark(ledger, run.run_id, "prices", [*done("A"), permanent("B"), transient("C")], batch_no=1)

    pending = ledger.pending(run.run_id, "prices")

    assert pending == [PendingItem("C", 1), PendingItem("D", 0), PendingItem("E", 0)]
    assert ledger.pending(run.run_id, "prices") == pending  # the same order every time
    assert ledger.pending(run.run_id, "dcf") == []


def test_counts_put_every_item_in_one_bucket_per_stage(ledger: Ledger, make_owner: Owners) -> None:
    run = open_run(ledger, make_owner())
    assert ledger.counts(run.run_id) == {}
    ledger.add_items(run.run_id, "prices", ["A", "B", "C", "D", "E"])
    ledger.add_items(run.run_id, "dcf", ["A", "B"])
    mark(ledger, run.run_id, "prices", [*done("A", "E"), permanent("B"), transient("C")], 1)
    mark(ledger, run.run_id, "dcf", done("A"), batch_no=1)

    counts = ledger.counts(run.run_id)

    assert counts == {
        "prices": StageCounts(total=5, done=2, failed=1, retrying=1, untouched=1),
        "dcf": StageCounts(total=2, done=1, failed=0, retrying=0, untouched=1),
    }
    assert (counts["prices"].pending, counts["prices"].settled) == (2, 3)


def test_failures_list_both_kinds_in_stage_and_item_order(
    ledger: Ledger, make_owner: Owners
) -> None:
    run = open_run(ledger, make_owner())
    ledger.add_items(run.run_id, "prices", ["A", "B", "C"])
    ledger.add_items(run.run_id, "dcf", ["A"])
    mark(ledger, run.run_id, "prices", [transient("C"), *done("A"), permanent("B")], batch_no=2)
    mark(ledger, run.run_id, "dcf", [permanent("A", "no DCF")], batch_no=1)

    assert ledger.failures(run.run_id) == [
        ItemFailure("dcf", "A", "permanent", 1, "no DCF", 1),
        ItemFailure("prices", "B", "permanent", 1, "404 not found", 2),
        ItemFailure("prices", "C", "transient", 1, "503 unavailable", 2),
    ]
    assert [f.item for f in ledger.failures(run.run_id, limit=2)] == ["A", "B"]


def test_requeue_failed_makes_every_failure_pending_again(
    ledger: Ledger, make_owner: Owners
) -> None:
    run = open_run(ledger, make_owner())
    ledger.add_items(run.run_id, "prices", ["A", "B", "C", "D"])
    ledger.add_items(run.run_id, "dcf", ["B"])
    mark(ledger, run.run_id, "prices", [*done("A"), permanent("B"), transient("C")], batch_no=1)
    mark(ledger, run.run_id, "dcf", [permanent("B")], batch_no=1)

    assert ledger.requeue_failed(run.run_id, "prices") == ["B", "C"]

    assert ledger.pending(run.run_id, "prices") == [
        PendingItem("B", 1),  # attempts are kept: a requeued batch is not a cache hit
        PendingItem("C", 1),
        PendingItem("D", 0),
    ]
    assert item_row(ledger, run.run_id, "prices", "B")["error_kind"] is None
    assert ledger.counts(run.run_id)["prices"] == StageCounts(4, done=1, untouched=3)
    assert ledger.failures(run.run_id) == [
        ItemFailure("dcf", "B", "permanent", 1, "404 not found", 1)
    ]
    assert ledger.requeue_failed(run.run_id, "prices") == []


# --- run status, heartbeat, stream ----------------------------------------------------------


def test_set_status_records_the_end_and_the_summary(ledger: Ledger, make_owner: Owners) -> None:
    run = open_run(ledger, make_owner(), params={"batch_size": 5})

    ledger.set_status(run.run_id, RunStatus.PARTIAL, summary={"rows_written": 3})
    partial = ledger.get(run.run_id)
    assert partial.status is RunStatus.PARTIAL
    assert not partial.finished
    assert partial.finished_at is not None
    assert partial.state.summary == {"rows_written": 3}
    assert (partial.state.stages, partial.state.params) == (["prices", "dcf"], {"batch_size": 5})

    ledger.set_status(run.run_id, RunStatus.RUNNING)
    running = ledger.get(run.run_id)
    assert (running.status, running.finished_at) == (RunStatus.RUNNING, None)
    assert running.state.summary == {"rows_written": 3}  # no summary given: the old one stays

    ledger.set_status(run.run_id, RunStatus.COMPLETED, summary={"rows_written": 7})
    completed = ledger.get(run.run_id)
    assert completed.finished
    assert completed.state.summary == {"rows_written": 7}


def test_heartbeat_only_for_the_owner_of_a_running_run(ledger: Ledger, make_owner: Owners) -> None:
    owner = make_owner()
    run = open_run(ledger, owner)

    assert ledger.heartbeat(run.run_id, owner) is True
    assert ledger.heartbeat(run.run_id, make_owner()) is False
    ledger.set_status(run.run_id, RunStatus.PARTIAL)
    assert ledger.heartbeat(run.run_id, owner) is False


def test_save_stream_writes_the_position_in_the_callers_transaction(
    ledger: Ledger, make_owner: Owners
) -> None:
    run = open_run(ledger, make_owner(), job="document-sync", key="person", stages=("stream",))
    position = {"window_start": None, "window_end": "2026-11-20T23:59:59+00:00", "records": 3}

    with ledger.engine.begin() as conn:
        ledger.save_stream(conn, run.run_id, position)
    assert ledger.get(run.run_id).state.stream == position

    def save_then_fail() -> None:
        with ledger.engine.begin() as conn:
            ledger.save_stream(conn, run.run_id, {**position, "records": 99})
            raise RuntimeError("the records' write failed after the cursor was saved")

    with pytest.raises(RuntimeError):
        save_then_fail()
    assert ledger.get(run.run_id).state.stream == position  # rolled back with it

    with pytest.raises(CheckpointError, match="no checkpoint"), ledger.engine.begin() as conn:
        ledger.save_stream(conn, "no-such-run", position)


# --- delete and expire ----------------------------------------------------------------------


def test_delete_removes_runs_and_their_items(ledger: Ledger, make_owner: Owners) -> None:
    a1 = open_run(ledger, make_owner(), key="k1")
    a2 = open_run(ledger, make_owner(), key="k2")
    b1 = open_run(ledger, make_owner(), job="fill-cache", key="k1")
    for run in (a1, a2, b1):
        ledger.add_items(run.run_id, "prices", ["A", "B"])

    assert ledger.delete(JOB, "k1") == 1
    assert (ledger.latest(JOB, "k1"), item_rows(ledger, a1.run_id)) == (None, 0)
    assert ledger.latest(JOB, "k2") is not None

    assert ledger.delete(JOB) == 1  # every key of the job
    assert (ledger.latest(JOB, "k2"), item_rows(ledger, a2.run_id)) == (None, 0)
    assert ledger.delete(JOB) == 0

    assert ledger.latest("fill-cache", "k1") is not None
    assert item_rows(ledger, b1.run_id) == 2


def test_expire_drops_only_completed_runs_finished_long_enough_ago(
    ledger: Ledger, make_owner: Owners
) -> None:
    old_done = open_run(ledger, make_owner(), key="old-done")
    new_done = open_run(ledger, make_owner(), key="new-done")
    old_partial = open_run(ledger, make_owner(), key="old-partial")
    for run in (old_done, new_done, old_partial):
        ledger.add_items(run.run_id, "prices", ["A"])
    ledger.set_status(old_done.run_id, RunStatus.COMPLETED)
    ledger.set_status(new_done.run_id, RunStatus.COMPLETED)
    ledger.set_status(old_partial.run_id, RunStatus.PARTIAL)
    set_run_columns(ledger, old_done.run_id, finished_at=ago(days=31))
    set_run_columns(ledger, new_done.run_id, finished_at=ago(days=29))
    set_run_columns(ledger, old_partial.run_id, finished_at=ago(days=90))

    assert ledger.expire(30) == 1

    assert ledger.latest(JOB, "old-done") is None
    assert item_rows(ledger, old_done.run_id) == 0
    assert ledger.latest(JOB, "new-done") is not None
    assert ledger.latest(JOB, "old-partial") is not None  # unfinished work is never expired
    assert item_rows(ledger, old_partial.run_id) == 1
    assert ledger.expire(30) == 0


# --- validation on load --------------------------------------------------------------------

_GOOD_STATE = {"job": JOB, "run_key": KEY, "stages": ["prices"], "params": {}}

CORRUPT = [
    pytest.param({"state": "{not json"}, "state is not valid", id="state-not-json"),
    pytest.param({"state": "[1, 2]"}, "state is not a JSON object", id="state-a-list"),
    pytest.param(
        {"state": json.dumps({"job": JOB, "run_key": KEY})}, "lacks ['stages']", id="no-stages"
    ),
    pytest.param(
        {"state": json.dumps({**_GOOD_STATE, "stages": "prices"})},
        "state.stages is not a list of names",
        id="stages-a-string",
    ),
    pytest.param(
        {"state": json.dumps({**_GOOD_STATE, "summary": [1]})},
        "state.params/summary/stream are not objects",
        id="summary-a-list",
    ),
    pytest.param(
        {"state": json.dumps({**_GOOD_STATE, "run_key": "2026-11-19"})},
        "state names a different run",
        id="state-of-another-run",
    ),
    pytest.param({"version": 2}, "version 2 is not the supported version 1", id="version-2"),
    pytest.param({"version": 0}, "version 0 is not the supported version 1", id="version-0"),
    pytest.param({"status": "exploded"}, "unknown status 'exploded'", id="unknown-status"),
]


@pytest.mark.parametrize(("damage", "reason"), CORRUPT)
def test_a_damaged_checkpoint_is_an_error_naming_the_reset_command(
    ledger: Ledger, make_owner: Owners, damage: dict[str, Any], reason: str
) -> None:
    run = open_run(ledger, make_owner())
    other = open_run(ledger, make_owner(), job="fill-cache", key="sp500")
    ledger.set_status(run.run_id, RunStatus.PARTIAL)  # not running: open() reaches the load
    set_run_columns(ledger, run.run_id, **damage)

    for load in (
        lambda: ledger.latest(JOB, KEY),
        lambda: ledger.get(run.run_id),
        lambda: reopen(ledger, make_owner()),
    ):
        with pytest.raises(CheckpointError) as caught:
            load()
        assert not isinstance(caught.value, RunBusy)
        message = str(caught.value)
        assert reason in message
        assert f"checkpoint for {JOB} {KEY} (run {run.run_id}) is unusable" in message
        assert message.endswith(f"Reset it with: {RESET}")

    # Listing shows the damaged run as its error and still loads the others.
    listed = ledger.runs()
    errors = [r for r in listed if isinstance(r, CheckpointError)]
    assert len(listed) == 2
    assert len(errors) == 1
    assert reason in str(errors[0])
    assert [r.run_id for r in listed if not isinstance(r, CheckpointError)] == [other.run_id]

    # The reset the message names clears it: the next open starts a new run.
    assert ledger.delete(JOB, KEY) == 1
    assert reopen(ledger, make_owner()).resumed is False
