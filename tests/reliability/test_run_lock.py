"""One run at a time per (job, date); a run left 'running' by a dead process is taken over."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from syncpoint.core.db import Database
from syncpoint.core.ledger import Ledger, RunBusy, RunStatus
from syncpoint.simulator import MarketSimulator, SimulatorConfig
from tests.conftest import cli_env, run_cli, tickers_file
from tests.reliability.test_interrupts import start, wait_for_progress

DAY = "2026-11-20"
STAGES = ["universe", "prices", "valuations"]


def claim(ledger: Ledger, owner: str, stale_after: float = 60.0) -> str:
    return ledger.open(
        "daily-sync",
        DAY,
        stages=STAGES,
        params={},
        fresh=False,
        owner=owner,
        stale_after=stale_after,
    ).run.run_id


def test_claims_are_exclusive_until_stale(database_url: str) -> None:
    ledger = Ledger(Database.from_url(database_url).engine())
    run_id = claim(ledger, "host-a:101:aaaa")
    with pytest.raises(RunBusy, match=r"already running \(host-a:101:aaaa, heartbeat"):
        claim(ledger, "host-b:202:bbbb")
    assert ledger.heartbeat(run_id, "host-a:101:aaaa")

    time.sleep(1.2)
    # Host A went quiet for longer than the stale limit: B takes the run over ...
    assert claim(ledger, "host-b:202:bbbb", stale_after=1.0) == run_id
    # ... and A, should it wake up, learns that it lost the run and must stop.
    assert not ledger.heartbeat(run_id, "host-a:101:aaaa")
    assert ledger.heartbeat(run_id, "host-b:202:bbbb")
    assert ledger.get(run_id).status is RunStatus.RUNNING


def test_a_dead_local_process_is_recognised_at_once(sqlite_url: str) -> None:
    ledger = Ledger(Database.from_url(sqlite_url).engine())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    import socket

    run_id = claim(ledger, f"{socket.gethostname()}:{gone.pid}:dead")
    # Its heartbeat is fresh, but its pid is gone on this very host: no need to wait.
    assert claim(ledger, "me:1:x", stale_after=3600) == run_id


@pytest.mark.slow
def test_second_start_of_a_running_date_is_refused_then_first_completes(
    prefect_api: str, tmp_path: Path
) -> None:
    # 400 requests, two at a time, 150 ms each: the first run lasts about 30 s, longer
    # than the three refused starts take on a loaded machine (each one is a CLI start).
    with MarketSimulator(SimulatorConfig(latency_ms=150)) as sim:
        file = tickers_file(tmp_path, list(sim.data.sp500_symbols[:200]))
        db = tmp_path / "sync.db"
        env = cli_env(
            prefect_api, MARKET_API_URL=sim.base_url, SYNCPOINT_DATABASE_URL=f"sqlite:///{db}"
        )
        args = ["run", "daily-sync", "--date", DAY, "--tickers-file", str(file)]
        first = start([*args, "--batch-size", "10", "--concurrency", "2"], env, tmp_path)
        wait_for_progress(first, db, at_least=10)

        second = run_cli(args, env, tmp_path)
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"daily-sync {DAY} is already running" in second.stderr
        assert "Traceback" not in second.stderr
        for flag in ("--fresh",):  # --fresh must not pull the rug from under a live run
            busy = run_cli([*args, flag], env, tmp_path)
            assert busy.returncode == 1
            assert "already running" in busy.stderr
        assert first.poll() is None, "the first run ended too soon for this test to mean much"

        out, err = first.communicate(timeout=300)
        assert first.returncode == 0, out + err
        assert sim.stats()["by_endpoint"]["historical-price-eod/full"] == 200


@pytest.mark.slow
def test_run_killed_mid_way_is_taken_over_by_the_next_start(
    prefect_api: str, tmp_path: Path
) -> None:
    with MarketSimulator(SimulatorConfig(latency_ms=30)) as sim:
        file = tickers_file(tmp_path, list(sim.data.sp500_symbols[:60]))
        db = tmp_path / "sync.db"
        env = cli_env(
            prefect_api,
            MARKET_API_URL=sim.base_url,
            SYNCPOINT_DATABASE_URL=f"sqlite:///{db}",
        )
        args = ["run", "daily-sync", "--date", DAY, "--tickers-file", str(file)]
        first = start([*args, "--batch-size", "10", "--concurrency", "2"], env, tmp_path)
        wait_for_progress(first, db, at_least=10)
        first.send_signal(signal.SIGKILL)
        first.communicate()

        ledger = Ledger(Database.from_url(f"sqlite:///{db}").engine())
        left = ledger.latest("daily-sync", DAY)
        assert left is not None
        assert left.status is RunStatus.RUNNING  # the dead process could not say otherwise

        again = run_cli(args, env, tmp_path)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "took over" in again.stderr
        assert ledger.latest("daily-sync", DAY).status is RunStatus.COMPLETED  # type: ignore[union-attr]
