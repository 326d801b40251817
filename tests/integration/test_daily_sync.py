"""The daily sync end to end, in-process: real Prefect API, real HTTP, real databases."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from syncpoint.engine.job_run import RunFailed
from syncpoint.flows.daily_sync import daily_sync
from syncpoint.simulator import MarketSimulator
from tests.conftest import table_rows, tickers_file

DAY = "2026-11-20"  # a Friday: the window 15th..20th holds five weekdays


def weekdays(end: date, days: int) -> int:
    return sum(1 for i in range(days + 1) if (end - timedelta(days=i)).weekday() < 5)


def known_tickers(sim: MarketSimulator, n: int) -> list[str]:
    """Real symbols from the simulator's stock list (unknown ones answer 404)."""
    import httpx

    listing = httpx.get(f"{sim.base_url}/stable/stock-list").json()
    return [row["symbol"] for row in listing[:n]]


@pytest.fixture
def universe(sync_env: MarketSimulator, tmp_path: Path) -> list[str]:
    tickers = known_tickers(sync_env, 40)
    sync_env.reset_stats()
    return tickers


def run(url: str, tickers: Path | None = None, **kwargs: object) -> dict:
    import os

    os.environ["SYNCPOINT_DATABASE_URL"] = url
    try:
        return daily_sync(
            run_date=DAY,
            tickers_file=str(tickers) if tickers else None,
            **kwargs,  # type: ignore[arg-type]
        )
    finally:
        del os.environ["SYNCPOINT_DATABASE_URL"]


def test_sync_then_rerun_is_a_noop(
    database_url: str, universe: list[str], sync_env: MarketSimulator, tmp_path: Path
) -> None:
    file = tickers_file(tmp_path, universe)
    first = run(database_url, file, batch_size=7)

    assert first["status"] == "completed"
    per_day = weekdays(date.fromisoformat(DAY), 5)
    assert len(table_rows(database_url, "stock_prices")) == len(universe) * per_day
    assert len(table_rows(database_url, "dcf_valuations")) == len(universe)
    stats = sync_env.stats()
    assert stats["by_endpoint"]["historical-price-eod/full"] == len(universe)
    assert stats["by_endpoint"]["discounted-cash-flow"] == len(universe)
    before = table_rows(database_url, "stock_prices")

    sync_env.reset_stats()
    second = run(database_url, file, batch_size=7)

    assert second["already_complete"] is True
    assert second["status"] == "completed"
    assert sync_env.stats()["requests"] == 0
    assert table_rows(database_url, "stock_prices") == before
    logs = table_rows(database_url, "sync_logs", "task_name, status")
    assert sorted(logs) == sorted(
        [
            ("daily-sync.universe", "success"),
            ("daily-sync.prices", "success"),
            ("daily-sync.valuations", "success"),
        ]
    )


def test_max_items_is_partial_and_done_tickers_are_never_requested_again(
    sqlite_url: str, universe: list[str], sync_env: MarketSimulator, tmp_path: Path
) -> None:
    file = tickers_file(tmp_path, universe)

    first = run(sqlite_url, file, batch_size=5, max_items=15)
    assert first["status"] == "partial"
    assert {s["name"]: s["counts"]["done"] for s in first["stages"]} == {
        "universe": 40,
        "prices": 15,
        "valuations": 15,
    }
    second = run(sqlite_url, file, batch_size=5, max_items=15)
    assert second["status"] == "partial"
    third = run(sqlite_url, file, batch_size=5)
    assert third["status"] == "completed"

    for ticker in universe:
        assert sync_env.requests_for(ticker, "historical-price-eod/full") == 1, ticker
        assert sync_env.requests_for(ticker, "discounted-cash-flow") == 1, ticker
    assert len(table_rows(sqlite_url, "dcf_valuations")) == 40


def test_sp500_universe_is_fetched_once_per_run(sqlite_url: str, sync_env: MarketSimulator) -> None:
    first = run(sqlite_url, None, batch_size=100, max_items=50)
    assert first["status"] == "partial"
    assert first["totals"]["universe"]["done"] == 500
    second = run(sqlite_url, None, batch_size=100)
    assert second["status"] == "completed"
    assert sync_env.stats()["by_endpoint"]["sp500-constituent"] == 1
    assert len(table_rows(sqlite_url, "dcf_valuations")) == 500


def test_failing_stage_does_not_stop_the_next_and_rerun_reuses_fetched_batches(
    database_url: str, universe: list[str], sync_env: MarketSimulator, tmp_path: Path
) -> None:
    # A stock_prices table that refuses every row: the prices stage fails in its store
    # step, after fetching; valuations must still run. syncpoint builds its schema first.
    from syncpoint.core.db import Database, dispose_engines
    from syncpoint.core.tables import stock_prices

    Database.from_url(database_url).engine()
    engine = sa.create_engine(database_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE stock_prices"))
        conn.execute(
            sa.text(
                "CREATE TABLE stock_prices (ticker VARCHAR(32), date DATE, open FLOAT, high FLOAT,"
                " low FLOAT, close FLOAT CHECK (close < 0), volume BIGINT,"
                " PRIMARY KEY (ticker, date))"
            )
        )
    file = tickers_file(tmp_path, universe)

    with pytest.raises(RunFailed) as failed:
        run(database_url, file, batch_size=10)

    stages = {s["name"]: s for s in failed.value.summary["stages"]}
    assert stages["prices"]["status"] == "failed"
    assert "refused every row of the batch" in stages["prices"]["error"]
    assert stages["valuations"]["status"] == "success"
    assert len(table_rows(database_url, "dcf_valuations")) == 40
    logs = dict(table_rows(database_url, "sync_logs", "task_name, status"))
    assert logs["daily-sync.prices"] == "failed"
    assert logs["daily-sync.valuations"] == "success"
    fetched_before = sync_env.stats()["by_endpoint"]["historical-price-eod/full"]
    # The store failure stops new batches; those already in flight were fetched.
    assert 0 < fetched_before <= len(universe)

    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE stock_prices"))
    stock_prices.create(engine)  # the operator fixes the table
    engine.dispose()
    dispose_engines()
    second = run(database_url, file, batch_size=10)

    assert second["status"] == "completed"
    assert len(table_rows(database_url, "stock_prices")) == 40 * weekdays(
        date.fromisoformat(DAY), 5
    )
    # Batches fetched before the store failed came from Prefect's cache: each ticker's
    # prices were requested exactly once across both runs.
    for ticker in universe:
        assert sync_env.requests_for(ticker, "historical-price-eod/full") == 1, ticker


def test_fresh_starts_over_without_duplicating_rows(
    sqlite_url: str, universe: list[str], sync_env: MarketSimulator, tmp_path: Path
) -> None:
    file = tickers_file(tmp_path, universe[:10])
    run(sqlite_url, file)
    before = table_rows(sqlite_url, "stock_prices")
    sync_env.reset_stats()

    again = run(sqlite_url, file, fresh=True)

    assert again["status"] == "completed"
    assert not again["resumed"]
    assert sync_env.stats()["by_endpoint"]["historical-price-eod/full"] == 10
    assert table_rows(sqlite_url, "stock_prices") == before
