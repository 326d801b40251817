"""The run page in the Prefect UI: progress, summary and failed items as real artifacts."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from syncpoint.engine.run_page import artifact_key
from syncpoint.flows.daily_sync import daily_sync
from syncpoint.simulator import FaultKind, MarketSimulator
from tests.conftest import tickers_file


def artifacts_of(flow_run_id: UUID) -> list[Any]:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def test_run_page_shows_progress_summary_and_failed_items(
    sync_env: MarketSimulator, sqlite_url: str, tmp_path: Path
) -> None:
    tickers = list(sync_env.data.sp500_symbols[:30])
    sync_env.set_fault(tickers[3], FaultKind.NOT_FOUND)
    sync_env.set_fault(tickers[7], FaultKind.GARBAGE)
    os.environ["SYNCPOINT_DATABASE_URL"] = sqlite_url
    try:
        state = daily_sync(
            run_date="2026-11-20",
            tickers_file=str(tickers_file(tmp_path, tickers)),
            batch_size=5,
            return_state=True,
        )
    finally:
        del os.environ["SYNCPOINT_DATABASE_URL"]
    assert state.is_completed()
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None

    by_key: dict[str, list[Any]] = {}
    for artifact in artifacts_of(flow_run_id):
        by_key.setdefault(artifact.key, []).append(artifact)

    progress = by_key[artifact_key("daily-sync", "progress")]
    assert len(progress) == 1  # one bar, updated in place after every batch
    assert float(progress[0].data) == 100.0

    summaries = sorted(by_key[artifact_key("daily-sync", "summary")], key=lambda a: a.created)
    final = summaries[-1].data
    assert final.startswith("# daily-sync 2026-11-20: completed")
    assert "| prices | success | 28 | 2 |" in final  # both faulted tickers fail for good

    (table,) = by_key["daily-sync-failed-items"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    failed = {(r["stage"], r["item"]): r for r in rows}
    assert set(failed) == {
        (stage, tickers[i]) for stage in ("prices", "valuations") for i in (3, 7)
    }
    assert "404" in failed[("prices", tickers[3])]["reason"]
    assert failed[("prices", tickers[7])]["kind"] == "permanent"


def test_a_rerun_of_a_completed_date_publishes_one_summary_saying_so(
    sync_env: MarketSimulator, sqlite_url: str, tmp_path: Path
) -> None:
    tickers = list(sync_env.data.sp500_symbols[:6])
    os.environ["SYNCPOINT_DATABASE_URL"] = sqlite_url
    try:
        states = [
            daily_sync(
                run_date="2026-11-20",
                tickers_file=str(tickers_file(tmp_path, tickers)),
                return_state=True,
            )
            for _ in range(2)
        ]
    finally:
        del os.environ["SYNCPOINT_DATABASE_URL"]
    first, rerun = (s.state_details.flow_run_id for s in states)
    assert first is not None
    assert rerun is not None
    assert {a.key for a in artifacts_of(first)} == {
        artifact_key("daily-sync", part) for part in ("progress", "summary", "failed-items")
    }
    (summary,) = artifacts_of(rerun)
    assert summary.key == artifact_key("daily-sync", "summary")
    assert summary.data.startswith("# daily-sync 2026-11-20: completed")
    assert "Already complete" in summary.data
    assert "0 API requests" in summary.data
