"""The fetch step's grain: a Prefect task run per window of batches, a record and a store
per batch (syncpoint.engine.batch_map.batches_per_window)."""

from __future__ import annotations

import time
from pathlib import Path
from uuid import UUID

import sqlalchemy as sa
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from syncpoint.core.db import Database
from syncpoint.engine.batch_map import WINDOW_ITEMS, batches_per_window
from syncpoint.flows.daily_sync import daily_sync
from syncpoint.simulator import MarketSimulator
from tests.conftest import tickers_file

DAY = "2026-11-20"


def fetch_task_runs(flow_run_id: UUID, expected: int) -> list[str]:
    """The names of the flow run's fetch task runs, once the server has recorded them
    (task run events reach it in the background)."""
    deadline = time.monotonic() + 30
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        names = sorted(r.name for r in runs if r.name.startswith("fetch "))
        if len(names) >= expected or time.monotonic() > deadline:
            return names
        time.sleep(0.2)


def test_a_fetch_task_run_takes_a_window_of_batches_and_each_batch_is_stored_alone(
    env: MarketSimulator, sqlite_url: str, tmp_path: Path
) -> None:
    tickers = list(env.data.sp500_symbols[:300])
    per_window = batches_per_window(10)
    assert per_window * 10 >= WINDOW_ITEMS
    state = daily_sync(
        run_date=DAY,
        tickers_file=str(tickers_file(tmp_path, tickers)),
        batch_size=10,
        return_state=True,
    )
    summary = state.result()
    assert summary["status"] == "completed"
    assert env.stats()["requests"] == 2 * 300  # every ticker once per stage

    # 30 batches a stage, in 2 task runs: 25 batches, then the 5 left.
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    assert fetch_task_runs(run_id, 4) == [
        "fetch prices #1-#25",
        "fetch prices #26-#30",
        "fetch valuations #1-#25",
        "fetch valuations #26-#30",
    ]
    # The checkpoint's grain is still the batch: each was stored and marked on its own.
    with Database.from_url(sqlite_url).engine().connect() as conn:
        batches = dict(
            conn.execute(
                sa.text(
                    "SELECT stage, COUNT(DISTINCT batch_no) FROM sync_items "
                    "WHERE status = 'done' AND stage IN ('prices', 'valuations') GROUP BY stage"
                )
            ).all()
        )
    assert batches == {"prices": 30, "valuations": 30}
