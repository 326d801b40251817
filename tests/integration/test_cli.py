"""The real `syncpoint` command in a subprocess: exit codes, output, kill -9 and resume."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from syncpoint.engine.batch_map import unmarked_batches_at_most
from syncpoint.simulator import MarketSimulator, SimulatorConfig
from tests.conftest import cli_env, run_cli, table_rows, tickers_file

DAY = "2026-11-20"


@pytest.fixture
def slow_market() -> MarketSimulator:
    with MarketSimulator(SimulatorConfig(latency_ms=15)) as sim:
        yield sim


def symbols(sim: MarketSimulator, n: int) -> list[str]:
    return list(sim.data.symbols[:n])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--date", "2026-13-01"], "bad date", id="bad-date"),
        pytest.param(["--batch-size", "0"], "batch_size must be at least 1", id="batch-size"),
        pytest.param(["--tickers-file", "/no/such/file"], "tickers file not found", id="file"),
        pytest.param(["--max-items", "-3"], "--max-items must be at least 1", id="max-items"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    result = run_cli(["run", "daily-sync", *args], cli_env("http://127.0.0.1:9/api"), tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unwritable_database_is_a_clear_error(tmp_path: Path) -> None:
    env = cli_env("http://127.0.0.1:9/api", SYNCPOINT_DATABASE_URL="sqlite:////no/such/dir/x.db")
    result = run_cli(["run", "daily-sync", "--builtin-api"], env, tmp_path)
    assert result.returncode == 2
    assert "cannot open database" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("job", "variable"),
    [
        (["daily-sync"], "MARKET_API_URL"),
        (["fill-cache"], "MARKET_API_URL"),
        (["document-sync", "--all"], "DIP_API_URL"),
    ],
    ids=["daily-sync", "fill-cache", "document-sync"],
)
def test_no_api_configured_is_a_usage_error_naming_what_to_set(
    job: list[str], variable: str, tmp_path: Path
) -> None:
    # Nothing may fall back to the simulator's made-up data unless asked to.
    result = run_cli(["run", *job], cli_env("http://127.0.0.1:9/api"), tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert variable in result.stderr
    assert "--builtin-api" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "syncpoint.db").exists()


def test_max_items_partial_exit_3_then_completed_then_noop(
    prefect_api: str, market: MarketSimulator, tmp_path: Path
) -> None:
    file = tickers_file(tmp_path, symbols(market, 12))
    env = cli_env(prefect_api, MARKET_API_URL=market.base_url)
    args = ["run", "daily-sync", "--date", DAY, "--tickers-file", str(file), "--batch-size", "4"]

    partial = run_cli([*args, "--max-items", "5"], env, tmp_path)
    assert partial.returncode == 3, partial.stdout + partial.stderr
    assert "PARTIAL" in partial.stdout
    assert "run the same command again" in partial.stdout

    done = run_cli(args, env, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "COMPLETED (resumed)" in done.stdout

    market.reset_stats()
    again = run_cli(args, env, tmp_path)
    assert again.returncode == 0
    assert "already complete" in again.stdout
    assert market.stats()["requests"] == 0
    assert len(table_rows(f"sqlite:///{tmp_path / 'syncpoint.db'}", "dcf_valuations")) == 12


def _done_items(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            row = conn.execute(
                "SELECT count(*) FROM sync_items WHERE stage='prices' AND status='done'"
            ).fetchone()
            return int(row[0])
    except sqlite3.OperationalError:
        return 0


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_matches_an_uninterrupted_run(
    prefect_api: str, slow_market: MarketSimulator, tmp_path: Path
) -> None:
    tickers = symbols(slow_market, 120)
    file = tickers_file(tmp_path, tickers)
    batch = 10
    args = [
        "run",
        "daily-sync",
        "--date",
        DAY,
        "--tickers-file",
        str(file),
        "--batch-size",
        str(batch),
        "--concurrency",
        "4",
    ]
    env = cli_env(prefect_api, MARKET_API_URL=slow_market.base_url)

    killed_dir = tmp_path / "killed"
    killed_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "syncpoint.cli", *args],
        env=env,
        cwd=killed_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while _done_items(killed_dir / "syncpoint.db") < 3 * batch:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no progress to kill"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    settled_at_kill = _done_items(killed_dir / "syncpoint.db")
    assert settled_at_kill < len(tickers)

    resumed = run_cli(args, env, killed_dir)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    killed_requests = slow_market.stats()["by_endpoint"]["historical-price-eod/full"]

    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    clean = run_cli(args, env, clean_dir)
    assert clean.returncode == 0

    killed_db = f"sqlite:///{killed_dir / 'syncpoint.db'}"
    clean_db = f"sqlite:///{clean_dir / 'syncpoint.db'}"
    assert table_rows(killed_db, "stock_prices") == table_rows(clean_db, "stock_prices")
    cols = "ticker, date, dcf, stock_price"
    assert table_rows(killed_db, "dcf_valuations", cols) == table_rows(
        clean_db, "dcf_valuations", cols
    )
    # Work redone is bounded by the batches a kill can find fetched-but-unmarked.
    assert killed_requests <= len(tickers) + unmarked_batches_at_most(4, batch) * batch


@pytest.mark.slow
def test_readme_demo_uses_the_builtin_api_and_a_rerun_is_a_noop(
    prefect_api: str, tmp_path: Path
) -> None:
    env = cli_env(prefect_api)
    first = run_cli(["run", "daily-sync", "--builtin-api"], env, tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "COMPLETED" in first.stdout
    assert "1001 API requests" in first.stdout  # sp500 list + 500 x (prices, valuation)
    assert len(table_rows(f"sqlite:///{tmp_path / 'syncpoint.db'}", "dcf_valuations")) == 500

    second = run_cli(["run", "daily-sync"], {**env, "SYNCPOINT_BUILTIN_API": "1"}, tmp_path)
    assert second.returncode == 0
    assert "already complete" in second.stdout
    assert "0 API requests" in second.stdout


def test_an_older_schema_is_refused_until_db_upgrade(tmp_path: Path) -> None:
    """A database written by syncpoint before its tables were versioned: every command
    that opens it names `syncpoint db upgrade`; after it, every row is still there."""
    from tests.unit.test_schema import LEGACY_ROWS, a953648_metadata

    url = f"sqlite:///{tmp_path / 'syncpoint.db'}"
    engine = sa.create_engine(url)
    legacy = a953648_metadata()
    legacy.create_all(engine)
    with engine.begin() as conn:
        for name, rows in LEGACY_ROWS.items():
            conn.execute(legacy.tables[name].insert(), rows)
    engine.dispose()
    env = cli_env("http://127.0.0.1:9/api")

    refused = run_cli(["status"], env, tmp_path)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "syncpoint db upgrade" in refused.stderr
    assert "Traceback" not in refused.stderr
    run = run_cli(["run", "daily-sync", "--builtin-api"], env, tmp_path)
    assert run.returncode == 2
    assert "syncpoint db upgrade" in run.stderr

    upgraded = run_cli(["db", "upgrade"], env, tmp_path)
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert "unversioned ->" in upgraded.stdout
    again = run_cli(["db", "upgrade"], env, tmp_path)
    assert "already at" in again.stdout
    for name, rows in LEGACY_ROWS.items():
        assert len(table_rows(url, name)) == len(rows), name
    assert run_cli(["status"], env, tmp_path).returncode == 0
