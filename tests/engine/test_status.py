"""The status documents `syncpoint status --json` prints, from a ledger filled by hand.

Each shape is compared whole: its keys are an interface (dashboards read them), and its
figures are computed from the item ledger, so a miscount shows as a wrong number.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from syncpoint.core.errors import CheckpointError
from syncpoint.core.ledger import Ledger, Run, RunStatus
from syncpoint.engine.report import batch_job_status, run_status, stream_status
from syncpoint.engine.stream import StreamPosition

from .ledger_helpers import done, mark, open_run, permanent, set_run_columns, transient

Owners = Callable[[], str]
FILL = "fill-cache"
FILL_KEY = "sp500:2021-11-22:2026-11-22"


def backdate(ledger: Ledger, run: Run, seconds: float) -> Run:
    """The run as if it had been created `seconds` before it finished (or before now)."""
    current = ledger.get(run.run_id)
    end = current.finished_at or current.updated_at
    set_run_columns(ledger, run.run_id, created_at=end - timedelta(seconds=seconds))
    return ledger.get(run.run_id)


# --- run_status -------------------------------------------------------------------------


def test_run_status_lists_stages_in_job_order_with_their_counts(
    ledger: Ledger, make_owner: Owners
) -> None:
    run = open_run(ledger, make_owner(), stages=("prices", "dcf"))
    # Registered out of order, plus a stage the job does not name: it is listed last.
    ledger.add_items(run.run_id, "dcf", ["A", "B"])
    ledger.add_items(run.run_id, "audit", ["A"])
    ledger.add_items(run.run_id, "prices", ["A", "B", "C", "D"])
    mark(ledger, run.run_id, "prices", [*done("A"), permanent("B"), transient("C")], batch_no=1)
    mark(ledger, run.run_id, "dcf", done("A", "B"), batch_no=1)
    ledger.set_status(run.run_id, RunStatus.PARTIAL)
    run = ledger.get(run.run_id)
    assert run.finished_at is not None

    status = run_status(ledger, run)

    assert status == {
        "job": "daily-sync",
        "run_key": "2026-11-20",
        "run_id": run.run_id,
        "status": "partial",
        "created_at": run.created_at.isoformat(),
        "updated_at": run.updated_at.isoformat(),
        "heartbeat_at": run.heartbeat_at.isoformat(),
        "finished_at": run.finished_at.isoformat(),
        "stages": {
            "prices": {"total": 4, "done": 1, "failed": 1, "retrying": 1, "untouched": 1},
            "dcf": {"total": 2, "done": 2, "failed": 0, "retrying": 0, "untouched": 0},
            "audit": {"total": 1, "done": 0, "failed": 0, "retrying": 0, "untouched": 1},
        },
    }
    assert list(status["stages"]) == ["prices", "dcf", "audit"]
    assert status["created_at"].endswith("+00:00")  # timestamps are UTC, with their zone


def test_run_status_of_a_run_just_opened(ledger: Ledger, make_owner: Owners) -> None:
    run = open_run(ledger, make_owner())

    status = run_status(ledger, run)

    assert (status["status"], status["finished_at"], status["stages"]) == ("running", None, {})


# --- batch_job_status (seed 001's shape) ---------------------------------------------------


def fill_run(ledger: Ledger, owner: str, universe: int = 23, cached: int = 2) -> Run:
    """A fill-cache run of `universe` tickers, batch size 5, `cached` already stored."""
    run = open_run(
        ledger,
        owner,
        job=FILL,
        key=FILL_KEY,
        stages=("prices",),
        params={"source": "sp500", "batch_size": 5},
    )
    tickers = [f"T{i:02d}" for i in range(universe)]
    ledger.add_items(run.run_id, "prices", tickers)
    mark(ledger, run.run_id, "prices", done(*tickers[:cached]))  # no batch: cache hits
    return run


def test_batch_job_status_of_a_run_stopped_after_two_batches(
    ledger: Ledger, make_owner: Owners
) -> None:
    run = fill_run(ledger, make_owner(), universe=23, cached=3)
    mark(ledger, run.run_id, "prices", done("T03", "T04", "T05", "T06", "T07"), batch_no=1)
    mark(
        ledger,
        run.run_id,
        "prices",
        [*done("T08", "T09", "T10", "T11"), permanent("T12")],
        batch_no=2,
    )
    ledger.set_status(run.run_id, RunStatus.PARTIAL)
    run = backdate(ledger, run, seconds=100)

    status = batch_job_status(ledger, run, "prices")

    # 23 tickers, 3 cached: 20 to fetch in batches of 5 -> 4 batches, 2 of them done.
    # processed 12 done + 1 failed = 13; 10 fetched in 100 s -> 10 pending take 100 s.
    assert status == {
        "jobId": run.run_id,
        "runKey": FILL_KEY,
        "status": "partial",
        "progress": {
            "processed": 13,
            "total": 23,
            "percentage": 56.5,
            "successful": 12,
            "failed": 1,
            "cached": 3,
            "elapsedTime": 100,
            "estimatedTimeRemaining": 100,
        },
        "batches": {"current": 2, "total": 4, "completed": 2, "remaining": 2},
        "message": "Stopped after batch 2 of 4. 2 batches remaining: run it again to continue.",
    }


def test_batch_job_status_of_a_running_run_points_at_the_next_batch(
    ledger: Ledger, make_owner: Owners
) -> None:
    run = fill_run(ledger, make_owner(), universe=12, cached=0)
    mark(ledger, run.run_id, "prices", done("T00", "T01", "T02", "T03", "T04"), batch_no=1)
    run = backdate(ledger, run, seconds=50)  # created 50 s before its last update

    status = batch_job_status(ledger, run, "prices")

    assert status["status"] == "running"
    assert status["batches"] == {"current": 2, "total": 3, "completed": 1, "remaining": 2}
    assert status["message"] == "Processing batch 2 of 3. 2 batches remaining."
    progress = status["progress"]
    assert (progress["processed"], progress["total"], progress["percentage"]) == (5, 12, 41.7)
    # A running run's clock is now: 50 s and the moments the test took since.
    assert 50 <= progress["elapsedTime"] <= 55
    # 5 fetched in those ~50 s, 7 pending: about 70 s more.
    assert 70 <= progress["estimatedTimeRemaining"] <= 77


def test_batch_job_status_of_a_completed_run(ledger: Ledger, make_owner: Owners) -> None:
    run = fill_run(ledger, make_owner(), universe=7, cached=1)
    mark(ledger, run.run_id, "prices", done("T01", "T02", "T03", "T04", "T05"), batch_no=1)
    mark(ledger, run.run_id, "prices", [permanent("T06")], batch_no=2)
    ledger.set_status(run.run_id, RunStatus.COMPLETED)
    run = backdate(ledger, run, seconds=30)

    status = batch_job_status(ledger, run, "prices")

    assert status["progress"] == {
        "processed": 7,
        "total": 7,
        "percentage": 100.0,
        "successful": 6,
        "failed": 1,
        "cached": 1,
        "elapsedTime": 30,
        "estimatedTimeRemaining": 0,
    }
    assert status["batches"] == {"current": 2, "total": 2, "completed": 2, "remaining": 0}
    assert status["message"] == "Completed: 6 successful, 1 failed."


def test_a_completed_run_has_every_batch_done_whatever_its_batch_numbers(
    ledger: Ledger, make_owner: Owners
) -> None:
    # Opened with batches of 5; a later invocation (--batch-size 12) took all in one.
    run = fill_run(ledger, make_owner(), universe=12, cached=0)
    mark(ledger, run.run_id, "prices", done(*[f"T{i:02d}" for i in range(12)]), batch_no=1)
    ledger.set_status(run.run_id, RunStatus.COMPLETED)

    status = batch_job_status(ledger, ledger.get(run.run_id), "prices")

    assert status["batches"] == {"current": 3, "total": 3, "completed": 3, "remaining": 0}
    assert status["message"] == "Completed: 12 successful, 0 failed."


def test_batch_job_status_of_a_failed_run(ledger: Ledger, make_owner: Owners) -> None:
    run = fill_run(ledger, make_owner(), universe=10, cached=0)
    mark(ledger, run.run_id, "prices", done("T00", "T01", "T02", "T03", "T04"), batch_no=1)
    ledger.set_status(run.run_id, RunStatus.FAILED)

    status = batch_job_status(ledger, ledger.get(run.run_id), "prices")

    assert status["status"] == "failed"
    assert status["batches"] == {"current": 1, "total": 2, "completed": 1, "remaining": 1}
    assert status["message"] == "Failed after batch 1 of 2: run it again to resume."


def test_batch_job_status_counts_transient_failures_as_failed_until_retried(
    ledger: Ledger, make_owner: Owners
) -> None:
    run = fill_run(ledger, make_owner(), universe=10, cached=0)
    mark(
        ledger,
        run.run_id,
        "prices",
        [*done("T00", "T01", "T02"), transient("T03"), transient("T04")],
        batch_no=1,
    )
    ledger.set_status(run.run_id, RunStatus.PARTIAL)

    progress = batch_job_status(ledger, ledger.get(run.run_id), "prices")["progress"]

    assert (progress["successful"], progress["failed"], progress["processed"]) == (3, 2, 5)
    assert progress["percentage"] == 50.0


def test_batch_job_status_of_a_stage_with_no_items(ledger: Ledger, make_owner: Owners) -> None:
    run = open_run(ledger, make_owner(), job=FILL, key=FILL_KEY, stages=("prices",))
    ledger.set_status(run.run_id, RunStatus.COMPLETED)

    status = batch_job_status(ledger, ledger.get(run.run_id), "prices")

    assert status["progress"]["total"] == 0
    assert status["progress"]["percentage"] == 100.0
    assert status["batches"] == {"current": 0, "total": 0, "completed": 0, "remaining": 0}
    assert status["message"] == "Completed: 0 successful, 0 failed."


@pytest.mark.parametrize(("batch_size", "batches"), [(None, 3), (4, 3), (10, 2), (11, 1)])
def test_batch_job_status_batches_follow_the_runs_batch_size(
    ledger: Ledger, make_owner: Owners, batch_size: int | None, batches: int
) -> None:
    params: dict[str, Any] = {} if batch_size is None else {"batch_size": batch_size}
    run = open_run(ledger, make_owner(), job=FILL, key=FILL_KEY, stages=("prices",), params=params)
    ledger.add_items(run.run_id, "prices", [f"T{i:02d}" for i in range(11)])

    status = batch_job_status(ledger, run, "prices")

    # No batch_size recorded: seed 001's batches of 5.
    assert status["batches"]["total"] == batches
    assert status["batches"]["remaining"] == batches


# --- stream_status ---------------------------------------------------------------------------


def test_stream_status_reports_the_saved_position(ledger: Ledger, make_owner: Owners) -> None:
    run = open_run(ledger, make_owner(), job="document-sync", key="vorgang", stages=("stream",))
    position = StreamPosition(
        window_start="2026-11-19T23:59:59+00:00",
        window_end="2026-11-20T23:59:59+00:00",
        cursor="AoJw9f2",
        records=20,
        pages=2,
        checkpoints=1,
        newest="2026-11-20T08:00:00+00:00",
        watermark="2026-11-19T23:59:59+00:00",
        total_records=160,
        guard="the API repeated cursor 'AoJw9f2'",
    )
    with ledger.engine.begin() as conn:
        ledger.save_stream(conn, run.run_id, position.to_dict())
    ledger.set_status(run.run_id, RunStatus.PARTIAL)
    run = ledger.get(run.run_id)

    assert stream_status(run) == {
        "entity": "vorgang",
        "status": "partial",
        "run_id": run.run_id,
        "updated_at": run.updated_at.isoformat(),
        "window": "2026-11-19T23:59:59+00:00 .. 2026-11-20T23:59:59+00:00",
        "cursor": "AoJw9f2",
        "finished": False,
        "records": 20,
        "total_records": 160,
        "newest": "2026-11-20T08:00:00+00:00",
        "watermark": "2026-11-19T23:59:59+00:00",
        "loop_guard": "the API repeated cursor 'AoJw9f2'",
    }


def test_stream_status_of_a_first_window_and_of_no_position(
    ledger: Ledger, make_owner: Owners
) -> None:
    run = open_run(ledger, make_owner(), job="document-sync", key="person", stages=("stream",))
    assert stream_status(run) == {
        "entity": "person",
        "status": "running",
        "run_id": run.run_id,
        "updated_at": run.updated_at.isoformat(),
        "window": "ever .. None",
        "cursor": None,
        "finished": None,
        "records": 0,
        "total_records": 0,
        "newest": None,
        "watermark": "the beginning",
        "loop_guard": None,
    }

    with ledger.engine.begin() as conn:
        ledger.save_stream(
            conn, run.run_id, StreamPosition(None, "2026-11-20T23:59:59+00:00").to_dict()
        )
    status = stream_status(ledger.get(run.run_id))
    assert status["window"] == "ever .. 2026-11-20T23:59:59+00:00"
    assert (status["finished"], status["watermark"]) == (False, "the beginning")


def test_stream_status_of_a_damaged_checkpoint_is_its_error(
    ledger: Ledger, make_owner: Owners
) -> None:
    run = open_run(ledger, make_owner(), job="document-sync", key="person", stages=("stream",))
    set_run_columns(ledger, run.run_id, version=99)
    (listed,) = ledger.runs("document-sync")
    assert isinstance(listed, CheckpointError)

    assert stream_status(listed) == {"error": str(listed)}
    assert stream_status(listed)["error"].endswith(
        "Reset it with: syncpoint checkpoints reset document-sync --key person"
    )
