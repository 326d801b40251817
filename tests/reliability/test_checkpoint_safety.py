"""Checkpoint rules through the real CLI: validated on load, reset by name, expired."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from syncpoint.simulator import MarketSimulator
from tests.conftest import cli_env, run_cli, tickers_file

DAY = "2026-11-20"
pytestmark = pytest.mark.slow


@pytest.fixture
def partial_run(
    prefect_api: str, market: MarketSimulator, tmp_path: Path
) -> tuple[dict[str, str], list[str], sa.Engine]:
    """A date left partial (--max-items), so there is a checkpoint to resume."""
    db = tmp_path / "sync.db"
    env = cli_env(
        prefect_api, MARKET_API_URL=market.base_url, SYNCPOINT_DATABASE_URL=f"sqlite:///{db}"
    )
    file = tickers_file(tmp_path, list(market.data.sp500_symbols[:12]))
    args = ["run", "daily-sync", "--date", DAY, "--tickers-file", str(file), "--batch-size", "4"]
    first = run_cli([*args, "--max-items", "4"], env, tmp_path)
    assert first.returncode == 3, first.stdout + first.stderr
    engine = sa.create_engine(f"sqlite:///{db}")
    yield env, args, engine
    engine.dispose()


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        pytest.param(
            'state = \'{"job": "daily-sync", trunc\'', "state is not valid", id="bad-json"
        ),
        pytest.param("state = '[1, 2, 3]'", "state is not valid", id="wrong-shape"),
        pytest.param("version = 99", "version 99 is not the supported version 1", id="version"),
        pytest.param("status = 'exploded'", "unknown status 'exploded'", id="status"),
    ],
)
def test_corrupt_checkpoint_is_a_clear_error_naming_the_reset(
    partial_run: tuple[dict[str, str], list[str], sa.Engine],
    tmp_path: Path,
    damage: str,
    why: str,
) -> None:
    env, args, engine = partial_run
    with engine.begin() as conn:
        run_id = conn.execute(sa.text("SELECT run_id FROM sync_runs")).scalar_one()
        conn.execute(sa.text(f"UPDATE sync_runs SET {damage}"))
        rows_before = conn.execute(sa.text("SELECT count(*) FROM stock_prices")).scalar_one()

    resumed = run_cli(args, env, tmp_path)
    assert resumed.returncode == 1
    assert f"checkpoint for daily-sync {DAY} (run {run_id}) is unusable: {why}" in resumed.stderr
    assert f"syncpoint checkpoints reset daily-sync --key {DAY}" in resumed.stderr
    assert "Traceback" not in resumed.stderr
    with engine.connect() as conn:  # nothing was touched
        assert (
            conn.execute(sa.text("SELECT count(*) FROM stock_prices")).scalar_one() == rows_before
        )

    status = run_cli(["status"], env, tmp_path)
    assert status.returncode == 0
    assert "is unusable" in status.stdout

    reset = run_cli(["checkpoints", "reset", "daily-sync", "--date", DAY], env, tmp_path)
    assert reset.returncode == 0, reset.stderr
    assert "removed 1 checkpoint(s)" in reset.stdout
    again = run_cli(args, env, tmp_path)
    assert again.returncode == 0, again.stderr


def test_list_show_reset(
    partial_run: tuple[dict[str, str], list[str], sa.Engine], tmp_path: Path
) -> None:
    env, _args, _engine = partial_run
    listed = run_cli(["checkpoints", "list"], env, tmp_path)
    assert listed.returncode == 0
    assert f"daily-sync {DAY}  partial" in listed.stdout

    shown = run_cli(["checkpoints", "show", "daily-sync", "--date", DAY], env, tmp_path)
    assert shown.returncode == 0
    detail = json.loads(shown.stdout)
    assert detail["status"] == "partial"
    assert detail["stages"]["prices"] == {
        "total": 12,
        "done": 4,
        "failed": 0,
        "retrying": 0,
        "untouched": 8,
    }
    assert detail["state"]["params"]["price_days"] == 5

    missing = run_cli(["checkpoints", "show", "daily-sync", "--date", "1999-01-01"], env, tmp_path)
    assert missing.returncode == 1
    no_key = run_cli(["checkpoints", "reset", "daily-sync"], env, tmp_path)
    assert no_key.returncode == 2
    assert "give the run key" in no_key.stderr


def test_completed_checkpoints_older_than_retention_are_removed(
    partial_run: tuple[dict[str, str], list[str], sa.Engine], tmp_path: Path
) -> None:
    env, args, engine = partial_run
    assert run_cli(args, env, tmp_path).returncode == 0  # finish DAY
    old = datetime.now(UTC) - timedelta(days=40)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE sync_runs SET finished_at = :old"), {"old": old})
        items = conn.execute(sa.text("SELECT count(*) FROM sync_items")).scalar_one()
    assert items > 0

    env = {**env, "SYNCPOINT_CHECKPOINT_RETENTION_DAYS": "30", "PREFECT_LOGGING_LEVEL": "INFO"}
    other_day = [a if a != DAY else "2026-11-19" for a in args]
    nightly = run_cli(other_day, env, tmp_path)
    assert nightly.returncode == 0, nightly.stderr
    assert "removed 1 completed checkpoints older than 30 days" in nightly.stderr
    with engine.connect() as conn:
        keys = conn.execute(sa.text("SELECT run_key FROM sync_runs")).scalars().all()
        orphans = conn.execute(
            sa.text(
                "SELECT count(*) FROM sync_items WHERE run_id NOT IN (SELECT run_id FROM sync_runs)"
            )
        ).scalar_one()
    assert keys == ["2026-11-19"]
    assert orphans == 0
