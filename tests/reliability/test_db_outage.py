"""The database goes away mid-run: a clear one-line error, nothing corrupted, rerun continues."""

from __future__ import annotations

import tempfile
import time
from datetime import date
from pathlib import Path

import pytest
import sqlalchemy as sa

from syncpoint.engine.batch_map import unmarked_batches_at_most
from syncpoint.flows.daily_sync import resume_command
from syncpoint.simulator import MarketSimulator, SimulatorConfig
from tests.conftest import cli_env, run_cli, tickers_file
from tests.reliability.test_interrupts import start

DAY = "2026-11-20"
TICKERS = 150
pytestmark = pytest.mark.slow


def pg_count(url: str, sql: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(sql)).scalar_one())
    except sa.exc.SQLAlchemyError:
        return 0
    finally:
        engine.dispose()


def test_postgres_stopping_mid_run_then_rerun_completes(prefect_api: str, tmp_path: Path) -> None:
    pgserver = pytest.importorskip("pgserver")
    datadir = tempfile.mkdtemp(prefix="syncpoint-outage-")
    server = pgserver.get_server(datadir, cleanup_mode="stop")
    url = sa.engine.make_url(server.get_uri()).set(drivername="postgresql+psycopg")
    url_text = url.render_as_string(hide_password=False)
    try:
        with MarketSimulator(SimulatorConfig(latency_ms=40)) as sim:
            file = tickers_file(tmp_path, list(sim.data.sp500_symbols[:TICKERS]))
            env = cli_env(prefect_api, MARKET_API_URL=sim.base_url, SYNCPOINT_DATABASE_URL=url_text)
            args = ["run", "daily-sync", "--date", DAY, "--tickers-file", str(file)]
            proc = start([*args, "--batch-size", "10", "--concurrency", "2"], env, tmp_path)
            deadline = time.monotonic() + 180
            done_sql = "SELECT count(*) FROM sync_items WHERE stage='prices' AND status='done'"
            while pg_count(url_text, done_sql) < 30:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline
                time.sleep(0.2)

            server.cleanup()  # pg_ctl stop: every connection is cut, new ones refused
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 1, out + err
            assert "Traceback" not in err
            last = err.strip().splitlines()[-1]
            assert last.startswith("syncpoint: "), err
            assert "database" in last.lower()

            server = pgserver.get_server(datadir, cleanup_mode="stop")  # it comes back
            status_sql = "SELECT status FROM sync_runs"
            engine = sa.create_engine(url_text)
            with engine.connect() as conn:
                assert conn.execute(sa.text(status_sql)).scalar_one() in ("running", "failed")
                done = conn.execute(sa.text(done_sql)).scalar_one()
                stored = conn.execute(
                    sa.text("SELECT count(DISTINCT ticker) FROM stock_prices")
                ).scalar_one()
            assert stored >= done >= 30  # rows never behind their marks

            # As its resume command says: in batches of the same size, so the batches
            # fetched and recorded but not stored are taken from their records.
            resume = resume_command(date.fromisoformat(DAY), 10).split()[1:]
            assert resume[-2:] == ["--batch-size", "10"]
            again = run_cli([*resume, "--tickers-file", str(file)], env, tmp_path)
            assert again.returncode == 0, again.stdout + again.stderr
            with engine.connect() as conn:
                assert conn.execute(sa.text(status_sql)).scalar_one() == "completed"
                assert (
                    conn.execute(sa.text("SELECT count(*) FROM stock_prices")).scalar_one()
                    == TICKERS * 5
                )
                assert (
                    conn.execute(sa.text("SELECT count(*) FROM dcf_valuations")).scalar_one()
                    == TICKERS
                )
            engine.dispose()
            # The outage cost at most the batches in flight, refetched once.
            fetched = sim.stats()["by_endpoint"]["historical-price-eod/full"]
            assert fetched <= TICKERS + unmarked_batches_at_most(2, 10) * 10
    finally:
        server.cleanup()
