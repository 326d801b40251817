"""Several workers on one run (map_shard): leases, fencing and a kill -9, on
PostgreSQL, each worker its own process over real HTTP to the simulator.

The run and its items are registered here, as the parent flow does; each worker is
tests/integration/shard_worker.py running the product's shard flow in its own process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
import sqlalchemy as sa

from syncpoint.core.db import Database, dispose_engines
from syncpoint.core.ledger import Ledger, new_owner
from syncpoint.engine.batch_map import unmarked_batches_at_most
from syncpoint.simulator import MarketSimulator, SimulatorConfig
from tests.conftest import _fresh_pg_database, cli_env

ROOT = Path(__file__).resolve().parents[2]
STAGE = "history"
START, END = "2026-09-01", "2026-11-20"
ITEMS = 240
BATCH = 10
CONCURRENCY = 4
LEASE_SECONDS = 10


@pytest.fixture
def slow_market() -> Iterator[MarketSimulator]:
    """Slow enough that a run lasts a few seconds and a kill lands in the middle."""
    with MarketSimulator(SimulatorConfig(latency_ms=200)) as sim:
        yield sim


def planned_run(url: str, tickers: list[str]) -> str:
    """A fill-cache run with its items registered, as the parent flow leaves it; its id."""
    ledger = Ledger(Database.from_url(url).engine())
    owner = new_owner()
    run = ledger.open("fill-cache", "shards", stages=[STAGE], params={}, fresh=False, owner=owner)
    ledger.add_items(run.run.run_id, STAGE, tickers)
    return run.run.run_id


def start_worker(
    url: str, api: str, run_id: str, prefect_api: str, go: Path | None = None
) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "tests.integration.shard_worker", "--database", url]
    args += ["--go", str(go)] if go else []
    args += ["--api", api, "--run", run_id, "--start", START, "--end", END]
    args += ["--batch-size", str(BATCH), "--concurrency", str(CONCURRENCY)]
    # Long enough that a loaded machine never lets a live worker's lease run out (that
    # would only cost requests), short enough that the dead worker's come back soon.
    args += ["--lease-seconds", str(LEASE_SECONDS)]
    env = cli_env(prefect_api, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_ready(worker: subprocess.Popen[str]) -> None:
    assert worker.stdout is not None
    line = worker.stdout.readline().strip()
    assert line == "ready", (line, worker.stderr.read()[-3000:] if worker.stderr else "")


def finish(worker: subprocess.Popen[str]) -> dict[str, int | str]:
    out, err = worker.communicate(timeout=90)
    assert worker.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def prices(url: str) -> set[tuple[str, str, float]]:
    with sa.create_engine(url).connect() as conn:
        rows = conn.execute(sa.text("SELECT ticker, date, close FROM stock_prices")).all()
    return {(t, str(d), c) for t, d, c in rows}


def item_attempts(url: str, run_id: str) -> Counter[tuple[str, int]]:
    with sa.create_engine(url).connect() as conn:
        rows = conn.execute(
            sa.text("SELECT status, attempts FROM sync_items WHERE run_id = :r"), {"r": run_id}
        ).all()
    return Counter((s, a) for s, a in rows)


@pytest.mark.postgres
def test_three_workers_one_killed_finish_the_run_like_one_worker(
    pg_root_url: str, prefect_api: str, slow_market: MarketSimulator, tmp_path: Path
) -> None:
    tickers = sorted(slow_market.data.symbols[:ITEMS])

    # One worker alone: the reference rows.
    alone = _fresh_pg_database(pg_root_url)
    finish(start_worker(alone, slow_market.base_url, planned_run(alone, tickers), prefect_api))
    reference = prices(alone)
    assert len({t for t, _, _ in reference}) == ITEMS
    slow_market.reset_stats()

    # Three workers; one is killed (SIGKILL, no cleanup) once ~40% of the items are done
    # and every worker has leased work. They start leasing together, once all three have
    # imported: on a loaded machine one may take seconds longer to start than the others
    # take to finish the stage.
    shared = _fresh_pg_database(pg_root_url)
    run_id = planned_run(shared, tickers)
    go = tmp_path / "go"
    workers = [
        start_worker(shared, slow_market.base_url, run_id, prefect_api, go) for _ in range(3)
    ]
    for worker in workers:
        wait_ready(worker)
    go.touch()
    ledger = Ledger(Database.from_url(shared).engine())
    engine = sa.create_engine(shared)
    leased_by: set[str] = set()
    deadline = time.monotonic() + 120
    while len(leased_by) < 3 or ledger.counts(run_id, STAGE)[STAGE].done < 0.4 * ITEMS:
        assert time.monotonic() < deadline, f"the workers made no progress: {leased_by}"
        ended = [w for w in workers if w.poll() is not None]
        assert not ended, ("a worker ended early", leased_by, ended[0].communicate()[1][-3000:])
        with engine.connect() as conn:
            leased_by |= set(
                conn.execute(
                    sa.text("SELECT DISTINCT lease_owner FROM sync_items WHERE lease_owner <> ''")
                ).scalars()
            )
        time.sleep(0.05)
    engine.dispose()
    victim = workers[0]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(30)
    survivors = [finish(w) for w in workers[1:]]

    # Every item done exactly once (attempts 1: nothing marked twice), row for row the
    # single worker's result, and the repeated requests bounded by the killed worker's
    # batches in flight.
    assert item_attempts(shared, run_id) == {("done", 1): ITEMS}
    assert prices(shared) == reference
    requests = slow_market.stats()["by_endpoint"]
    prices_requests = requests["historical-price-eod/full"]
    in_flight = unmarked_batches_at_most(CONCURRENCY, BATCH) * BATCH
    assert ITEMS <= prices_requests <= ITEMS + in_flight
    assert all(int(s["batches"]) > 0 for s in survivors), survivors
    dispose_engines()


def test_a_taken_over_batch_is_stored_from_its_first_holders_fetch(
    database_url: str, prefect_api: str, market: MarketSimulator
) -> None:
    """Worker A leases and fetches a batch, then dies before storing it. When its lease
    runs out, worker B takes the items: B's fetch is answered by the fetch cache (no
    request goes out again) and B stores it under B's lease, not A's, which would be
    refused."""
    from prefect import flow

    from syncpoint.blocks.market_api import MarketApi
    from syncpoint.core.http import ClientThread
    from syncpoint.core.interrupts import StopFlag
    from syncpoint.core.request_slots import RequestSlots
    from syncpoint.engine.batch_map import LeaseTerms, map_shard
    from syncpoint.sources.market import PricesSource
    from syncpoint.tasks.batches import Batch, BatchGate, Halt, Window, fetch_window

    tickers = sorted(market.data.symbols[:6])
    run_id = planned_run(database_url, tickers)
    database = Database.from_url(database_url)
    ledger = Ledger(database.engine())
    source = PricesSource(
        MarketApi(base_url=market.base_url, concurrency=2),
        date.fromisoformat(START),
        date.fromisoformat(END),
    )

    @flow(name="shard-takeover-test")
    def takeover() -> tuple[int, int, int]:
        first = ledger.lease(run_id, STAGE, "worker-a", 6, 60)
        assert first is not None
        batch = Batch(run_id, STAGE, first.batch_no, first.items, first)
        with ClientThread(source.client()) as clients:  # fetched and recorded, never stored
            fetch_window(
                source,
                Window.of([batch]),
                RequestSlots(2),
                clients,
                BatchGate(1, 1, clients),
                Halt(StopFlag()),
            )
        with database.engine().begin() as conn:  # A's lease runs out
            conn.execute(sa.text("UPDATE sync_items SET lease_until = :t"), {"t": "2000-01-01"})
        ran = map_shard(
            ledger=ledger,
            data=database,
            checkpoints=database,
            run_id=run_id,
            stage=STAGE,
            source=source,
            batch_size=6,
            terms=LeaseTerms("worker-b", seconds=60),
            stop=StopFlag(),
            on_progress=lambda _p: None,
            logger=logging.getLogger("test"),
            poll_seconds=0.1,
        )
        return ran.batches_reused, ran.requests, ran.leases_lost

    assert takeover() == (1, 0, 0)
    assert item_attempts(database_url, run_id) == {("done", 1): 6}
    assert market.stats()["by_endpoint"]["historical-price-eod/full"] == 6
    assert len({t for t, _, _ in prices(database_url)}) == 6
