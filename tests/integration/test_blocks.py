"""The blocks as a Prefect user meets them: registered by the CLI, saved, used by the flow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa
from pydantic import SecretStr

from syncpoint.blocks import CheckpointStore, MarketApi
from syncpoint.flows.daily_sync import daily_sync
from syncpoint.simulator import MarketSimulator, SimulatorConfig
from tests.conftest import ROOT, cli_env, table_rows, tickers_file

KEY = "block-key-4f1d9c"


def test_prefect_block_register_finds_both_blocks(prefect_api: str) -> None:
    prefect = Path(sys.executable).with_name("prefect")
    result = subprocess.run(
        [str(prefect), "block", "register", "-m", "syncpoint.blocks"],
        env=cli_env(prefect_api),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Syncpoint Checkpoint Store" in result.stdout
    assert "Syncpoint Market API" in result.stdout


def test_flow_runs_from_saved_blocks_and_keeps_the_key_secret(
    prefect_api: str, sqlite_url: str, tmp_path: Path
) -> None:
    checkpoints_url = f"sqlite:///{tmp_path / 'checkpoints.db'}"
    with MarketSimulator(SimulatorConfig(api_key=KEY)) as sim:
        MarketApi(base_url=sim.base_url, api_key=SecretStr(KEY), concurrency=4).save(
            "test-market", overwrite=True
        )
        CheckpointStore(database_url=SecretStr(checkpoints_url), retention_days=7).save(
            "test-checkpoints", overwrite=True
        )
        tickers = list(sim.data.sp500_symbols[:6])
        file = tickers_file(tmp_path, tickers)
        import os

        os.environ["SYNCPOINT_DATABASE_URL"] = sqlite_url
        try:
            summary = daily_sync(
                run_date="2026-11-20",
                tickers_file=str(file),
                market_api_block="test-market",
                checkpoint_block="test-checkpoints",
            )
        finally:
            del os.environ["SYNCPOINT_DATABASE_URL"]
        assert sim.stats()["responses"].get("401", 0) == 0

    assert summary["status"] == "completed"
    assert {r[0] for r in table_rows(sqlite_url, "dcf_valuations")} == set(tickers)
    # The checkpoint ledger lives where the block says, not beside the data.
    assert len(table_rows(checkpoints_url, "sync_items", "stage, item")) == 3 * len(tickers)
    data_engine = sa.create_engine(sqlite_url)
    with data_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM sync_items")).scalar_one() == 0
        dump = "\n".join(
            str(row)
            for table in ("sync_logs", "stock_prices", "dcf_valuations")
            for row in conn.execute(sa.text(f"SELECT * FROM {table}"))
        )
    data_engine.dispose()
    assert KEY not in dump
    assert KEY not in str(summary)
