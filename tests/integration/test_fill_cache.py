"""fill-cache through the real CLI: cached skip, partial runs, retry-failed, kill -9."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from syncpoint.engine.batch_map import unmarked_batches_at_most
from syncpoint.settings import CONCURRENCY
from syncpoint.simulator import FaultKind, MarketSimulator, SimulatorConfig
from tests.conftest import cli_env, run_cli
from tests.reliability.test_interrupts import done_items, start

PRICES = "historical-price-eod/full"
RANGE = ["--start", "2026-06-01", "--end", "2026-06-30"]  # 22 weekdays
pytestmark = pytest.mark.slow


@pytest.fixture
def env(prefect_api: str, market: MarketSimulator, tmp_path: Path) -> dict[str, str]:
    return cli_env(
        prefect_api,
        MARKET_API_URL=market.base_url,
        SYNCPOINT_DATABASE_URL=f"sqlite:///{tmp_path / 'cache.db'}",
        PREFECT_LOGGING_LEVEL="INFO",
    )


def fill(env: dict[str, str], cwd: Path, tickers: list[str], *extra: str) -> Any:
    args = ["run", "fill-cache", "--ticker-source", "custom", "--tickers", ",".join(tickers)]
    return run_cli([*args, *RANGE, *extra], env, cwd)


def status(env: dict[str, str], cwd: Path) -> dict[str, Any]:
    result = run_cli(["status", "fill-cache", "--json"], env, cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_partial_then_continued_with_exact_progress(
    env: dict[str, str], market: MarketSimulator, tmp_path: Path
) -> None:
    tickers = list(market.data.sp500_symbols[:23])
    first = fill(env, tmp_path, tickers, "--max-batches", "2")
    assert first.returncode == 3, first.stdout + first.stderr
    assert market.stats()["by_endpoint"][PRICES] == 10

    now = status(env, tmp_path)
    assert set(now) == {"jobId", "runKey", "status", "progress", "batches", "message"}
    assert now["status"] == "partial"
    progress = now["progress"]
    assert {k: progress[k] for k in ("processed", "total", "successful", "failed")} == {
        "processed": 10,
        "total": 23,
        "successful": 10,
        "failed": 0,
    }
    assert progress["percentage"] == 43.5
    assert set(progress) >= {"elapsedTime", "estimatedTimeRemaining"}
    assert now["batches"] == {"current": 2, "total": 5, "completed": 2, "remaining": 3}
    assert now["message"].startswith("Stopped after batch 2 of 5. 3 batches remaining")

    second = fill(env, tmp_path, tickers)
    assert second.returncode == 0, second.stdout + second.stderr
    assert market.stats()["by_endpoint"][PRICES] == 23  # nothing fetched twice
    done = status(env, tmp_path)
    assert done["status"] == "completed"
    assert done["progress"]["processed"] == done["progress"]["total"] == 23
    assert done["progress"]["percentage"] == 100.0
    assert done["batches"] == {"current": 5, "total": 5, "completed": 5, "remaining": 0}


def test_cached_tickers_are_skipped_without_requests(
    env: dict[str, str], market: MarketSimulator, tmp_path: Path
) -> None:
    tickers = list(market.data.sp500_symbols[:10])
    assert fill(env, tmp_path, tickers[:6]).returncode == 0
    market.reset_stats()

    bigger = fill(env, tmp_path, tickers)
    assert bigger.returncode == 0, bigger.stderr
    assert "tickersToProcess 4 of 10 (6 already cached)" in bigger.stderr
    assert market.stats()["by_endpoint"][PRICES] == 4
    for ticker in tickers[:6]:
        assert market.requests_for(ticker, PRICES) == 0
    now = status(env, tmp_path)
    assert now["progress"]["cached"] == 6
    assert now["batches"]["total"] == 1  # 4 tickers to fetch, batches of 5


def test_retry_failed_touches_only_the_failed_tickers(
    env: dict[str, str], market: MarketSimulator, tmp_path: Path
) -> None:
    tickers = list(market.data.sp500_symbols[:12])
    market.set_fault(tickers[2], FaultKind.NOT_FOUND)
    market.set_fault(tickers[9], FaultKind.GARBAGE)
    first = fill(env, tmp_path, tickers)
    assert first.returncode == 0, first.stderr  # completed, with failures listed
    assert status(env, tmp_path)["progress"]["failed"] == 2

    market.clear_faults()
    market.reset_stats()
    retry = fill(env, tmp_path, tickers, "--retry-failed")
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert market.stats()["by_endpoint"][PRICES] == 2
    assert market.requests_for(tickers[2], PRICES) == 1
    assert market.requests_for(tickers[9], PRICES) == 1
    after = status(env, tmp_path)
    assert after["progress"]["failed"] == 0
    assert after["progress"]["successful"] == 12


def test_resume_after_sigkill(prefect_api: str, tmp_path: Path) -> None:
    with MarketSimulator(SimulatorConfig(latency_ms=60)) as sim:
        db = tmp_path / "cache.db"
        env = cli_env(
            prefect_api, MARKET_API_URL=sim.base_url, SYNCPOINT_DATABASE_URL=f"sqlite:///{db}"
        )
        tickers = list(sim.data.sp500_symbols[:60])
        args = ["run", "fill-cache", "--ticker-source", "custom", "--tickers", ",".join(tickers)]
        proc = start([*args, *RANGE], env, tmp_path)

        deadline = time.monotonic() + 120
        while done_items(db, "history") < 15:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()

        again = run_cli([*args, *RANGE], env, tmp_path)
        assert again.returncode == 0, again.stdout + again.stderr
        # At most the batches a kill can find fetched-but-unmarked are fetched again.
        redo = unmarked_batches_at_most(CONCURRENCY, 5) * 5
        assert 60 <= sim.stats()["by_endpoint"][PRICES] <= 60 + redo
        assert status(env, tmp_path)["progress"]["successful"] == 60
