"""The run page in the Prefect UI, as a person reads it: artifacts and the run's own log.

In-process flow runs against the session's real Prefect API (`prefect_api`), real HTTP to
the simulator and real SQLite; artifacts and logs are read back through the Prefect
client, as the UI reads them. Retries are real second attempts of the same flow run (its
state set back to Scheduled, as the Retry button does, and run again).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import sqlalchemy as sa
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.sorting import LogSort
from prefect.flow_engine import run_flow
from prefect.logging.handlers import APILogHandler
from prefect.states import Scheduled

from syncpoint.core.db import Database
from syncpoint.engine.job_run import RunFailed
from syncpoint.engine.run_page import artifact_key
from syncpoint.flows.daily_sync import daily_sync
from syncpoint.simulator import FaultKind, MarketSimulator
from tests.conftest import tickers_file

DAY = "2026-11-20"
PROGRESS, SUMMARY, FAILED = (
    artifact_key("daily-sync", c) for c in ("progress", "summary", "failed-items")
)


@pytest.fixture
def info_logs() -> Iterator[None]:
    """The run loggers at INFO (the test session runs Prefect at WARNING)."""
    loggers = [logging_logger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel("INFO")
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


def logging_logger(name: str) -> Any:
    import logging

    return logging.getLogger(name)


def artifacts_of(flow_run_id: UUID) -> dict[str, list[Any]]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    by_key: dict[str, list[Any]] = {}
    for artifact in sorted(found, key=lambda a: a.created):
        # Prefect's server keeps a failed state's data as a keyless artifact of its own.
        if artifact.key is not None:
            by_key.setdefault(artifact.key, []).append(artifact)
    return by_key


def run_log(flow_run_id: UUID) -> list[Any]:
    """The flow run's log as its page shows it, oldest first."""
    APILogHandler().flush()
    lines: list[Any] = []
    with get_client(sync_client=True) as client:
        while True:  # the API hands out at most 200 lines a page
            page = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                sort=LogSort.TIMESTAMP_ASC,
                limit=200,
                offset=len(lines),
            )
            lines += page
            if len(page) < 200:
                return lines


def table(artifact: Any) -> list[dict[str, Any]]:
    rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert isinstance(rows, list)
    return rows


def flow_run_id(state: Any) -> UUID:
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    return run_id  # type: ignore[no-any-return]


# --- artifacts -------------------------------------------------------------------------------


def test_one_progress_one_summary_and_the_failed_items(
    env: MarketSimulator, tmp_path: Path
) -> None:
    tickers = list(env.data.sp500_symbols[:30])
    env.set_fault(tickers[3], FaultKind.NOT_FOUND)
    env.set_fault(tickers[7], FaultKind.GARBAGE)
    state = daily_sync(
        run_date=DAY,
        tickers_file=str(tickers_file(tmp_path, tickers)),
        batch_size=5,
        return_state=True,
    )
    assert state.is_completed()
    assert state.name == "Completed"

    by_key = artifacts_of(flow_run_id(state))
    assert set(by_key) == {PROGRESS, SUMMARY, FAILED}
    # One of each, updated in place: no new version per batch or per stage.
    assert [len(v) for v in by_key.values()] == [1, 1, 1]
    assert float(by_key[PROGRESS][0].data) == 100.0
    summary = by_key[SUMMARY][0].data
    assert summary.startswith(f"# daily-sync {DAY}: completed")
    assert "| prices | success | 28 | 2 |" in summary  # both faulted tickers fail for good
    assert "running" not in summary

    failed = {(r["stage"], r["item"]): r for r in table(by_key[FAILED][0])}
    assert set(failed) == {
        (stage, tickers[i]) for stage in ("prices", "valuations") for i in (3, 7)
    }
    assert "404" in failed[("prices", tickers[3])]["reason"]
    assert failed[("prices", tickers[7])]["kind"] == "permanent"


def test_a_run_without_failures_has_no_failed_items_table(
    env: MarketSimulator, tmp_path: Path
) -> None:
    tickers = list(env.data.sp500_symbols[:8])
    state = daily_sync(
        run_date=DAY, tickers_file=str(tickers_file(tmp_path, tickers)), return_state=True
    )
    assert state.is_completed()
    assert set(artifacts_of(flow_run_id(state))) == {PROGRESS, SUMMARY}


def test_a_rerun_of_a_completed_date_publishes_one_summary_saying_so(
    env: MarketSimulator, tmp_path: Path
) -> None:
    tickers = list(env.data.sp500_symbols[:6])
    file = str(tickers_file(tmp_path, tickers))
    states = [daily_sync(run_date=DAY, tickers_file=file, return_state=True) for _ in range(2)]
    first, rerun = (flow_run_id(s) for s in states)
    assert set(artifacts_of(first)) == {PROGRESS, SUMMARY}
    ((key, (summary,)),) = artifacts_of(rerun).items()
    assert key == SUMMARY
    assert summary.data.startswith(f"# daily-sync {DAY}: completed")
    assert "Already complete" in summary.data
    assert "0 API requests" in summary.data


def test_the_bar_weighs_stages_by_their_items(env: MarketSimulator, tmp_path: Path) -> None:
    """max_items stops each stage at 10 of 40 tickers: a quarter of the work, not the
    third the one-step universe stage used to add on its own."""
    tickers = list(env.data.sp500_symbols[:40])
    state = daily_sync(
        run_date=DAY,
        tickers_file=str(tickers_file(tmp_path, tickers)),
        batch_size=5,
        max_items=10,
        return_state=True,
    )
    assert state.result()["status"] == "partial"
    by_key = artifacts_of(flow_run_id(state))
    (progress,) = by_key[PROGRESS]
    # universe (1 step) + prices 10 of 40 + valuations 10 of 40 = 21 of 81.
    assert float(progress.data) == pytest.approx(100 * 21 / 81, abs=0.1)
    assert by_key[SUMMARY][0].data.startswith(f"# daily-sync {DAY}: partial")


# --- honest counts ---------------------------------------------------------------------------


def test_batches_the_task_cache_gives_back_are_not_counted_as_requests(
    env: MarketSimulator, sqlite_url: str, tmp_path: Path
) -> None:
    """A store step that fails (a table the rows cannot go into) after the fetch: the rerun
    gets those batches from the fetch cache. They are "reused", not API requests."""
    tickers = list(env.data.sp500_symbols[:80])
    file = str(tickers_file(tmp_path, tickers))
    # syncpoint's schema, as a first run makes it, without a column the rows need: every
    # store step fails, after its batch was fetched.
    engine = Database.from_url(sqlite_url).engine()
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE stock_prices DROP COLUMN volume"))
    with pytest.raises(RunFailed) as failed:
        daily_sync(run_date=DAY, tickers_file=file, batch_size=10)
    first = failed.value.summary
    assert first["requests"] == env.stats()["requests"]  # every request that went out
    fetched_prices = env.stats()["by_endpoint"]["historical-price-eod/full"]
    # The fetches run ahead of the failing store (up to two task runs' windows of batches,
    # each recorded), so some or all of the 80 went out.
    assert 0 < fetched_prices <= 80

    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE stock_prices ADD COLUMN volume BIGINT"))
    env.reset_stats()
    state = daily_sync(run_date=DAY, tickers_file=file, batch_size=10, return_state=True)

    second = state.result()
    assert second["status"] == "completed"
    assert second["batches_reused"] == fetched_prices // 10
    assert second["requests"] == env.stats()["requests"]  # the cached batches sent nothing
    for ticker in tickers:
        assert env.requests_for(ticker, "historical-price-eod/full") <= 1, ticker
    (summary,) = artifacts_of(flow_run_id(state))[SUMMARY]
    reused = second["batches_reused"]
    said = f"{reused} batch reused" if reused == 1 else f"{reused} batches reused"
    assert f"{second['requests']} API requests · {said} from the cache" in summary.data


def test_a_refused_key_counts_the_request_it_sent(
    env: MarketSimulator, tmp_path: Path, info_logs: None
) -> None:
    env.set_global_fault(FaultKind.UNAUTHORIZED)
    state = daily_sync(run_date=DAY, return_state=True)  # the S&P 500 list: one request
    assert state.is_failed()
    assert env.stats()["requests"] == 1
    (summary,) = artifacts_of(flow_run_id(state))[SUMMARY]
    assert summary.data.startswith(f"# daily-sync {DAY}: failed")
    assert "1 API requests" in summary.data
    assert "rejected the key" in summary.data

    log = run_log(flow_run_id(state))
    messages = [entry.message for entry in log]
    # Explained once, in user terms, without Prefect's traceback.
    assert not [m for m in messages if "Traceback" in m or "Encountered exception" in m], messages
    assert any(m.startswith(f"daily-sync {DAY} failed") and "1 API requests" in m for m in messages)


# --- the log ------------------------------------------------------------------------------


def test_the_log_has_progress_and_a_final_summary_but_no_task_state_lines(
    env: MarketSimulator, tmp_path: Path, info_logs: None
) -> None:
    tickers = list(env.data.sp500_symbols[:20])
    state = daily_sync(
        run_date=DAY,
        tickers_file=str(tickers_file(tmp_path, tickers)),
        batch_size=5,
        return_state=True,
    )
    assert state.is_completed()
    log = run_log(flow_run_id(state))
    task_lines = [e.message for e in log if e.task_run_id is not None]
    assert not [m for m in task_lines if m.startswith("Finished in state")], task_lines
    flow_lines = [e.message for e in log if e.task_run_id is None]
    assert any(m.startswith("prices: 20/20 settled") for m in flow_lines), flow_lines
    # The last word: Prefect's state line, right after syncpoint's summary of the run.
    assert flow_lines[-1] == "Finished in state Completed()", flow_lines
    assert flow_lines[-2].startswith(f"daily-sync {DAY} completed in "), flow_lines
    assert "prices 20 done; valuations 20 done. 40 API requests" in flow_lines[-2]


def test_sigterm_is_explained_in_the_run_log(
    env: MarketSimulator, sqlite_url: str, tmp_path: Path, info_logs: None
) -> None:
    """A SIGTERM (what a worker sends on Cancel) is said in the run's own log at once, not
    only on the process's stderr; the run ends partial and its last line says why."""
    env.config.latency_ms = 60
    tickers = list(env.data.sp500_symbols[:60])
    db = Path(sqlite_url.removeprefix("sqlite:///"))

    def terminate_after_first_batch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with sqlite3.connect(db, timeout=5) as conn:
                    done = conn.execute("SELECT count(*) FROM sync_items WHERE status = 'done'")
                    if done.fetchone()[0] > 60:  # the universe, then a batch of prices
                        os.kill(os.getpid(), signal.SIGTERM)
                        return
            except sqlite3.OperationalError:
                pass  # not created yet
            time.sleep(0.05)

    killer = threading.Thread(target=terminate_after_first_batch, daemon=True)
    killer.start()
    state = daily_sync(
        run_date=DAY,
        tickers_file=str(tickers_file(tmp_path, tickers)),
        batch_size=5,
        return_state=True,
    )
    killer.join(5)
    summary = state.result()
    assert summary["status"] == "partial"
    assert summary["stopped_by"].startswith("SIGTERM")

    flow_lines = [e.message for e in run_log(flow_run_id(state)) if e.task_run_id is None]
    announced = [m for m in flow_lines if m.startswith("SIGTERM (the worker")]
    assert len(announced) == 1, flow_lines
    assert "no new batch starts" in announced[0]
    assert f"Resume with: syncpoint run daily-sync --date {DAY}" in announced[0]
    assert flow_lines[-2].startswith(f"daily-sync {DAY} partial"), flow_lines
    assert "Stopped by SIGTERM" in flow_lines[-2]
    (page,) = artifacts_of(flow_run_id(state))[SUMMARY]
    assert "Stopped by SIGTERM" in page.data


# --- a retry of a deployment's run ----------------------------------------------------------


def test_a_retried_deployment_run_replaces_its_pages_figures_and_says_press_retry(
    env: MarketSimulator, tmp_path: Path, info_logs: None
) -> None:
    """Attempt 1 fails (the API refuses the key on one ticker); Retry runs attempt 2 of the
    same flow run, which completes. The page keeps one bar and one summary, now attempt 2's,
    and the failed-items table of attempt 1 is gone with its failures."""
    tickers = sorted(env.data.sp500_symbols[:30])
    # In the last batch: it is fetched only once the first batch is stored, however many
    # batches the pipeline fetches at once.
    env.set_fault(tickers[27], FaultKind.UNAUTHORIZED)
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(daily_sync)
        deployment_id = client.create_deployment(flow_id=flow_id, name="run-page-test")
        flow_run = client.create_flow_run_from_deployment(
            deployment_id,
            parameters={
                "run_date": DAY,
                "tickers_file": str(tickers_file(tmp_path, tickers)),
                "batch_size": 5,
            },
        )
    first = run_flow(daily_sync, flow_run=flow_run, return_type="state")
    assert first.is_failed()
    by_key = artifacts_of(flow_run.id)
    assert set(by_key) == {PROGRESS, SUMMARY, FAILED}
    (summary,) = by_key[SUMMARY]
    assert summary.data.startswith(f"# daily-sync {DAY}: failed")
    # A deployment's run is continued with Retry on its page, not with a shell command.
    hint = re.search(
        r"Press Retry on this run to continue \(it skips the (\d+) items already done\)",
        summary.data,
    )
    assert hint, summary.data
    assert "syncpoint run" not in summary.data
    done = int(hint[1])
    assert 5 <= done < 30  # the first batch at least

    env.clear_faults()
    env.reset_stats()
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(
            flow_run.id, Scheduled(message="Retried from the test"), force=True
        )
        again = client.read_flow_run(flow_run.id)
    second = run_flow(daily_sync, flow_run=again, return_type="state")
    assert second.is_completed()

    by_key = artifacts_of(flow_run.id)
    assert set(by_key) == {PROGRESS, SUMMARY}  # no stale failed-items table
    (progress,) = by_key[PROGRESS]
    (summary,) = by_key[SUMMARY]
    assert float(progress.data) == 100.0
    assert summary.data.startswith(f"# daily-sync {DAY}: completed")
    note = summary.data.split("\n\n")[1]  # the retry is said right under the title
    assert note.startswith("_Attempt 2 of this flow run (a retry); attempt 1 ended Failed ("), note
    assert "replaces the earlier attempt's" in summary.data
    assert "(resumed)" in summary.data
    # Attempt 2 fetched only what attempt 1 had not done.
    assert env.stats()["by_endpoint"]["historical-price-eod/full"] == 30 - done
    assert "| prices | success | 30 | 0 |" in summary.data

    with get_client(sync_client=True) as client:
        named = client.read_flow_run(flow_run.id).name
    assert named == f"daily-sync {DAY}"
