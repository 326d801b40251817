"""Ctrl+C safety with the real CLI: finish in-flight batches, flush, exit 130/143.

Each test interrupts a real `syncpoint run` in its own process group mid-stage, then
checks the checkpoint against the API's own request log: every ticker the interrupted
run fetched is stored and marked, so the rerun fetches each remaining ticker once.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncpoint.engine.batch_map import unmarked_batches_at_most
from syncpoint.simulator import MarketSimulator, SimulatorConfig
from tests.conftest import cli_env, run_cli, tickers_file

DAY = "2026-11-20"  # Friday: five weekdays of prices
TICKERS = 120
PRICES = "historical-price-eod/full"
pytestmark = pytest.mark.slow


@pytest.fixture
def slow_market() -> Iterator[MarketSimulator]:
    with MarketSimulator(SimulatorConfig(latency_ms=40, seed=3)) as sim:
        yield sim


def start(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "syncpoint.cli", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, like a terminal's foreground job
    )


def done_items(db: Path, stage: str = "prices") -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            row = conn.execute(
                "SELECT count(*) FROM sync_items WHERE stage = ? AND status = 'done'", (stage,)
            ).fetchone()
    except sqlite3.OperationalError:  # tables not created yet
        return 0
    return int(row[0])


def wait_for_progress(proc: subprocess.Popen[str], db: Path, at_least: int) -> None:
    deadline = time.monotonic() + 180
    while done_items(db) < at_least:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.1)


def ledger(db: Path) -> tuple[str, int, int]:
    with sqlite3.connect(db) as conn:
        status = conn.execute("SELECT status FROM sync_runs").fetchone()[0]
        done = conn.execute(
            "SELECT count(*) FROM sync_items WHERE stage='prices' AND status='done'"
        ).fetchone()[0]
        stored = conn.execute("SELECT count(DISTINCT ticker) FROM stock_prices").fetchone()[0]
    return status, done, stored


def setup(sim: MarketSimulator, tmp_path: Path) -> tuple[list[str], Path, list[str]]:
    symbols = list(sim.data.sp500_symbols[:TICKERS])
    file = tickers_file(tmp_path, symbols)
    args = ["run", "daily-sync", "--date", DAY, "--tickers-file", str(file)]
    return symbols, tmp_path / "sync.db", [*args, "--batch-size", "10", "--concurrency", "2"]


def price_requests(sim: MarketSimulator) -> int:
    return int(sim.stats()["by_endpoint"].get(PRICES, 0))


def check_resume_fetches_each_ticker_once(
    sim: MarketSimulator, env: dict[str, str], tmp_path: Path, args: list[str], db: Path
) -> None:
    status, done, stored = ledger(db)
    assert status == "partial"
    assert 0 < done < TICKERS
    # Stored and marked together: the interrupted run lost nothing it fetched.
    assert stored == done
    assert price_requests(sim) == done

    rerun = run_cli(args, env, tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert price_requests(sim) == TICKERS  # each ticker fetched exactly once overall
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM stock_prices").fetchone()[0] == TICKERS * 5


def test_ctrl_c_finishes_in_flight_batches_and_exits_130(
    slow_market: MarketSimulator, tmp_path: Path
) -> None:
    """A terminal's Ctrl+C: SIGINT to the whole process group, ephemeral Prefect included."""
    _, db, args = setup(slow_market, tmp_path)
    env = cli_env("", MARKET_API_URL=slow_market.base_url, SYNCPOINT_DATABASE_URL=f"sqlite:///{db}")
    env.pop("PREFECT_API_URL")  # the embedded default: Prefect's temporary server
    proc = start(args, env, tmp_path)
    wait_for_progress(proc, db, at_least=20)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=180)

    assert proc.returncode == 130, out + err
    assert "SIGINT received: finishing the batches in flight" in err
    assert f"Resume with: syncpoint run daily-sync --date {DAY}" in err
    assert "Traceback" not in err
    check_resume_fetches_each_ticker_once(slow_market, env, tmp_path, args, db)


def test_sigterm_exits_143_after_flushing(
    prefect_api: str, slow_market: MarketSimulator, tmp_path: Path
) -> None:
    _, db, args = setup(slow_market, tmp_path)
    env = cli_env(
        prefect_api, MARKET_API_URL=slow_market.base_url, SYNCPOINT_DATABASE_URL=f"sqlite:///{db}"
    )
    proc = start(args, env, tmp_path)
    wait_for_progress(proc, db, at_least=20)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)

    assert proc.returncode == 143, out + err
    assert "SIGTERM received" in err
    assert "Traceback" not in err
    check_resume_fetches_each_ticker_once(slow_market, env, tmp_path, args, db)


def test_second_signal_exits_at_once_and_loses_only_the_batches_in_flight(
    prefect_api: str, slow_market: MarketSimulator, tmp_path: Path
) -> None:
    _, db, args = setup(slow_market, tmp_path)
    env = cli_env(
        prefect_api, MARKET_API_URL=slow_market.base_url, SYNCPOINT_DATABASE_URL=f"sqlite:///{db}"
    )
    proc = start(args, env, tmp_path)
    wait_for_progress(proc, db, at_least=20)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)

    assert proc.returncode == 130, out + err
    assert "SIGINT again: exiting now" in err
    _, done, stored = ledger(db)
    assert stored >= done  # rows may be ahead of their marks, never behind
    rerun = run_cli(args, env, tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    # Redone work is bounded by what was in flight: the fetches and the batch storing.
    assert TICKERS <= price_requests(slow_market) <= TICKERS + unmarked_batches_at_most(2, 10) * 10
