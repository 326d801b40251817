"""One run over three workers, on real parts: a Prefect server backed by PostgreSQL, the
work pool and three `prefect worker start` processes (one flow run each), the data and
checkpoints in PostgreSQL, the simulator on loopback, and the parent run started by the
real `syncpoint` command (`--shards 3`, PREFECT_API_URL set) in its own process.

The parent registers the run, starts three children of the shard deployment and waits;
each child leases batches until none is left. Checked here: the rows equal a run of one
process row for row; a worker killed with its flow run (SIGKILL, no cleanup) costs at
most its batches in flight and the run completes; a parent killed and started again
finds its children instead of starting more.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import sqlalchemy as sa
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

from syncpoint.engine.batch_map import unmarked_batches_at_most
from syncpoint.simulator import MarketSimulator, SimulatorConfig
from tests.conftest import _fresh_pg_database
from tests.e2e.harness import (
    POOL,
    PREFECT,
    PRICES,
    ROOT,
    Proc,
    Server,
    api,
    base_env,
    deploy,
    poll,
    prefect_server,
    retry_from_cli,
    wait_worker_done,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

WORKERS = 3
BATCH = 5
CONCURRENCY = 2
LEASE_SECONDS = 10
START, END = "2026-09-01", "2026-11-20"
# One API budget for every process of the cluster: the simulator enforces it (token
# bucket of one second's worth, 429 beyond it) and the workers draw it from one Prefect
# global limit of the same rate. The other tests stay below it (3 workers x 2 requests
# in flight at 150 ms: 40 a second); the budget test binds it.
BUDGET_PER_MINUTE = 3000
BUDGET = "market-api"


@dataclass
class Cluster:
    server: Server
    sim: MarketSimulator
    data_url: str  # every worker's SYNCPOINT_DATABASE_URL (data and checkpoints)
    results: Path  # the result storage every worker and the parent share
    workers: list[Proc]

    def env(self, **extra: str) -> dict[str, str]:
        """What a machine of the cluster has: the server, the database, the API, the
        shared result storage."""
        common = {
            "PREFECT_API_URL": self.server.api_url,
            "SYNCPOINT_DATABASE_URL": self.data_url,
            "MARKET_API_URL": self.sim.base_url,
            "PREFECT_LOCAL_STORAGE_PATH": str(self.results),
            "SYNCPOINT_LEASE_SECONDS": str(LEASE_SECONDS),
            "SYNCPOINT_FLOW_RETRIES": "0",
            "SYNCPOINT_TICKERS_DIR": str(self.results.parent),
            "MARKET_API_GLOBAL_RATE_LIMIT": BUDGET,
        }
        return base_env(**{**common, **extra})

    def logs(self) -> str:
        return "\n".join(w.tail(40) for w in self.workers) + "\n" + self.server.proc.tail(20)

    def start_worker(self, n: int) -> Proc:
        """Worker `n` (again, after a kill): one flow run at a time, so each child lands on
        a worker of its own."""
        home = self.results.parent / f"worker-{n}"
        home.mkdir(exist_ok=True)
        worker = Proc.spawn(
            f"prefect worker {n}",
            [PREFECT, "worker", "start", "--pool", POOL, "--limit", "1"],
            self.env(PREFECT_HOME=str(home), PREFECT_WORKER_QUERY_SECONDS="1"),
            self.results.parent / f"worker-{n}-{time.monotonic_ns()}.log",
        )
        if n < len(self.workers):
            self.workers[n] = worker
        else:
            self.workers.append(worker)
        return worker


@pytest.fixture(scope="module")
def cluster(
    prefect_pg_url: str, pg_root_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("shards")
    url = sa.engine.make_url(prefect_pg_url).set(drivername="postgresql+asyncpg")
    with (
        prefect_server("postgres", workdir, url.render_as_string(hide_password=False)) as server,
        MarketSimulator(
            SimulatorConfig(latency_ms=150, rate_limit_per_minute=BUDGET_PER_MINUTE)
        ) as sim,
    ):
        deploy(server)
        with api(server) as client:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(
                    name=BUDGET,
                    limit=BUDGET_PER_MINUTE // 60,
                    slot_decay_per_second=BUDGET_PER_MINUTE / 60,
                )
            )
            client.read_deployment_by_name("syncpoint-shard/shard")
            for name in ("daily-sync/market-nightly", "document-sync/documents-nightly"):
                deployment = client.read_deployment_by_name(name)
                for schedule in deployment.schedules:
                    client.update_deployment_schedule(deployment.id, schedule.id, active=False)
        results = workdir / "results"
        results.mkdir()
        cluster = Cluster(server, sim, _fresh_pg_database(pg_root_url), results, [])
        for n in range(WORKERS):
            cluster.start_worker(n)
        try:

            def online() -> bool:
                with api(server) as client:
                    return len(client.read_workers_for_work_pool(POOL)) >= WORKERS

            poll("three workers on the pool", online, 120, context=cluster.logs)
            yield cluster
        finally:
            for worker in cluster.workers:
                worker.stop()


def fill_cache(cluster: Cluster, tickers: list[str], *extra: str) -> subprocess.Popen[str]:
    """`syncpoint run fill-cache` for these tickers, as its own process (group)."""
    args = [sys.executable, "-m", "syncpoint.cli", "run", "fill-cache", "--json"]
    args += ["--ticker-source", "custom", "--tickers", ",".join(tickers)]
    args += ["--start", START, "--end", END, "--batch-size", str(BATCH)]
    args += ["--concurrency", str(CONCURRENCY), *extra]
    return subprocess.Popen(
        args,
        env=cluster.env(PYTHONPATH=str(ROOT)),
        cwd=cluster.results.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finished(parent: subprocess.Popen[str], cluster: Cluster) -> dict[str, Any]:
    out, err = parent.communicate(timeout=300)
    assert parent.returncode == 0, f"{err[-3000:]}\n{cluster.logs()}"
    summary: dict[str, Any] = json.loads(out[out.index("{") :])
    return summary


def run_id_of(cluster: Cluster, tickers: list[str]) -> str:
    from syncpoint.flows.fill_cache import run_key
    from syncpoint.settings import history_range

    first, last = history_range(START, END)
    with sa.create_engine(cluster.data_url).connect() as conn:
        if not sa.inspect(conn).has_table("sync_runs"):
            return ""  # the parent has not made the schema yet
        value = conn.execute(
            sa.text("SELECT run_id FROM sync_runs WHERE job = 'fill-cache' AND run_key = :k"),
            {"k": run_key("custom", tickers, first, last)},
        ).scalar()
    return str(value or "")


def final_run_id(cluster: Cluster) -> str:
    """The nightly run's checkpoint id (run key 2026-11-20)."""
    with sa.create_engine(cluster.data_url).connect() as conn:
        value = conn.execute(
            sa.text(
                "SELECT run_id FROM sync_runs WHERE job = 'daily-sync' AND run_key = '2026-11-20'"
            )
        ).scalar()
    return str(value)


def wait_final_run(cluster: Cluster, flow_run_id: Any) -> Any:
    def final() -> Any:
        with api(cluster.server) as client:
            run = client.read_flow_run(flow_run_id)
        return run if run.state is not None and run.state.is_final() else None

    return poll(f"flow run {flow_run_id} to end", final, 300, context=cluster.logs)


def children(cluster: Cluster, run_id: str) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with api(cluster.server) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["shard"]))
        )
    return [r for r in runs if r.parameters.get("run_id") == run_id]


def item_attempts(url: str, run_id: str) -> Counter[tuple[str, int]]:
    with sa.create_engine(url).connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT status, attempts FROM sync_items WHERE run_id = :r AND stage = 'history'"
            ),
            {"r": run_id},
        ).all()
    return Counter((s, a) for s, a in rows)


def done(url: str, run_id: str) -> int:
    return item_attempts(url, run_id)[("done", 1)] if run_id else 0


def prices(url: str, tickers: list[str]) -> set[tuple[str, str, float, int]]:
    with sa.create_engine(url).connect() as conn:
        rows = conn.execute(
            sa.text("SELECT ticker, date, close, volume FROM stock_prices WHERE ticker = ANY(:t)"),
            {"t": tickers},
        ).all()
    return {(t, str(d), c, v) for t, d, c, v in rows}


def reference(cluster: Cluster, pg_root_url: str, tickers: list[str]) -> set[Any]:
    """The same tickers synced by one process, into a database of its own."""
    url = _fresh_pg_database(pg_root_url)
    args = [sys.executable, "-m", "syncpoint.cli", "run", "fill-cache", "--ticker-source"]
    args += ["custom", "--tickers", ",".join(tickers), "--start", START, "--end", END]
    env = cluster.env(SYNCPOINT_DATABASE_URL=url)
    one = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    return prices(url, tickers)


def running(cluster: Cluster, flow_run_ids: set[str], what: str) -> tuple[Proc, psutil.Process]:
    """A live worker whose flow-run process executes one of these runs, and that process."""

    def find() -> tuple[Proc, psutil.Process] | None:
        for worker in cluster.workers:
            if not worker.alive():
                continue
            for child in psutil.Process(worker.popen.pid).children(recursive=True):
                try:
                    if child.environ().get("PREFECT__FLOW_RUN_ID") in flow_run_ids:
                        return worker, child
                except psutil.Error:
                    continue
        return None

    return poll(what, find, 120, context=cluster.logs)


def test_three_workers_sync_what_one_process_syncs_and_survive_a_kill(
    cluster: Cluster, pg_root_url: str
) -> None:
    sim = cluster.sim
    tickers = sorted(sim.data.symbols[1000:1300])
    expected = reference(cluster, pg_root_url, tickers)
    assert len({t for t, *_ in expected}) == len(tickers)
    sim.reset_stats()

    parent = fill_cache(cluster, tickers, "--shards", str(WORKERS))
    run_id = poll("the run's checkpoint", lambda: run_id_of(cluster, tickers), 120)

    def all_running() -> bool:
        if parent.poll() is not None:
            raise AssertionError(parent.communicate()[1][-3000:])
        runs = children(cluster, run_id)
        return len(runs) == WORKERS and all(r.state.is_running() for r in runs)

    poll("three shard runs running", all_running, 180, context=cluster.logs)
    poll(
        "40% of the items done",
        lambda: done(cluster.data_url, run_id) >= 0.4 * len(tickers),
        240,
        context=cluster.logs,
    )
    ids = {str(r.id) for r in children(cluster, run_id)}
    victim, _ = running(cluster, ids, "a worker running a shard")
    os.killpg(victim.popen.pid, signal.SIGKILL)  # the worker and its flow run, no cleanup
    victim.popen.wait(10)

    summary = finished(parent, cluster)
    assert summary["status"] == "completed", summary
    # Every item done exactly once, row for row what one process syncs.
    assert item_attempts(cluster.data_url, run_id) == {("done", 1): len(tickers)}
    assert prices(cluster.data_url, tickers) == expected
    # The dead worker cost at most its batches in flight.
    requests = sim.stats()["by_endpoint"][PRICES]
    in_flight = unmarked_batches_at_most(CONCURRENCY, BATCH) * BATCH
    assert len(tickers) <= requests <= len(tickers) + in_flight
    # Three children, no more; the dead one marked Crashed by the parent.
    runs = children(cluster, run_id)
    assert len(runs) == WORKERS
    states = sorted(r.state.type.value for r in runs)
    assert states == ["COMPLETED", "COMPLETED", "CRASHED"], states
    # The machine comes back: the next tests have three workers again.
    cluster.start_worker(cluster.workers.index(victim))


def test_a_parent_killed_and_started_again_finds_its_children(cluster: Cluster) -> None:
    sim = cluster.sim
    tickers = sorted(sim.data.symbols[2000:2240])
    sim.reset_stats()
    first = fill_cache(cluster, tickers, "--shards", str(WORKERS))
    run_id = poll("the run's checkpoint", lambda: run_id_of(cluster, tickers), 120)
    poll(
        "the shard runs at work",
        lambda: len(children(cluster, run_id)) == WORKERS and done(cluster.data_url, run_id) > 0,
        180,
        context=cluster.logs,
    )
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(10)
    assert done(cluster.data_url, run_id) < len(tickers)

    again = fill_cache(cluster, tickers, "--shards", str(WORKERS))
    summary = finished(again, cluster)
    assert summary["status"] == "completed", summary
    assert summary["resumed"], summary
    assert len(children(cluster, run_id)) == WORKERS  # found by their keys, none added
    assert item_attempts(cluster.data_url, run_id) == {("done", 1): len(tickers)}
    assert sim.stats()["by_endpoint"][PRICES] == len(tickers)
    # What the children did, read back from the shared result storage.
    assert summary["requests"] == len(tickers), summary


def test_a_deployment_run_with_shards_spreads_both_stages(cluster: Cluster) -> None:
    """The nightly deployment with shards 3, as the UI's Custom run starts it: the parent
    takes one worker, its children the others (and the first one freed)."""
    sim = cluster.sim
    tickers = sorted(sim.data.sp500_symbols[:60])
    path = cluster.results.parent / "nightly-tickers.txt"
    path.write_text("\n".join(tickers) + "\n")
    sim.reset_stats()
    with api(cluster.server) as client:
        deployment = client.read_deployment_by_name("daily-sync/market-nightly")
        parent = client.create_flow_run_from_deployment(
            deployment.id,
            parameters={
                "run_date": "2026-11-20",
                "tickers_file": str(path),
                "batch_size": BATCH,
                "shards": WORKERS,
            },
        )
    final = wait_final_run(cluster, parent.id)
    assert final.state.is_completed(), f"{final.state.message}\n{cluster.logs()}"
    by_stage = Counter(r.parameters["stage"] for r in children(cluster, final_run_id(cluster)))
    assert by_stage == {"prices": WORKERS, "valuations": WORKERS}
    stats = sim.stats()["by_endpoint"]
    assert stats[PRICES] == stats["discounted-cash-flow"] == len(tickers)
    with sa.create_engine(cluster.data_url).connect() as conn:
        stored = conn.execute(
            sa.text("SELECT count(DISTINCT ticker) FROM dcf_valuations WHERE ticker = ANY(:t)"),
            {"t": tickers},
        ).scalar()
    assert stored == len(tickers)


def test_workers_on_another_database_fail_the_stage_with_their_reason(
    cluster: Cluster, pg_root_url: str
) -> None:
    """The parent's database is not the workers': each child says so, and the parent
    fails the stage with what they said instead of waiting or starting more."""
    tickers = sorted(cluster.sim.data.symbols[2500:2510])
    elsewhere = _fresh_pg_database(pg_root_url)
    args = [sys.executable, "-m", "syncpoint.cli", "run", "fill-cache", "--ticker-source"]
    args += ["custom", "--tickers", ",".join(tickers), "--start", START, "--end", END]
    args += ["--shards", str(WORKERS)]
    env = cluster.env(SYNCPOINT_DATABASE_URL=elsewhere)
    run = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    said = run.stdout + run.stderr
    assert "the shard runs settled none of the 10 untouched items" in said, said
    assert "is not in this worker's checkpoint database" in said, said
    assert "Traceback" not in said
    run_id = run_id_of(
        Cluster(cluster.server, cluster.sim, elsewhere, cluster.results, []), tickers
    )
    assert len(children(cluster, run_id)) == WORKERS  # one round: no more were started


def test_three_workers_share_one_api_budget_without_a_429(cluster: Cluster) -> None:
    """Three workers that could send 160 requests a second share a budget of 50: the API,
    which enforces it, never has to refuse one (each 429 would be a request beyond the
    budget and its one-second burst, in some window)."""
    sim = cluster.sim
    tickers = sorted(sim.data.symbols[3000:3600])
    sim.reset_stats()
    parent = fill_cache(cluster, tickers, "--shards", str(WORKERS), "--concurrency", "8")
    summary = finished(parent, cluster)
    assert summary["status"] == "completed", summary
    stats = sim.stats()
    assert stats["responses"].get("429", 0) == 0, stats["responses"]
    assert stats["by_endpoint"][PRICES] == len(tickers)
    run_id = run_id_of(cluster, tickers)
    assert item_attempts(cluster.data_url, run_id) == {("done", 1): len(tickers)}
    assert {r.state.type.value for r in children(cluster, run_id)} == {"COMPLETED"}


def test_a_crashed_parent_retried_from_prefect_reuses_its_children(cluster: Cluster) -> None:
    """The backfill deployment with shards 2 (the parent and its two children fill the
    three workers). The parent's process is killed (SIGKILL) while its children work;
    Prefect marks it Crashed; `prefect flow-run retry` resumes it, and the retry finds
    the two children by their keys instead of starting two more."""
    sim = cluster.sim
    tickers = sorted(sim.data.symbols[4000:4240])
    sim.reset_stats()
    with api(cluster.server) as client:
        deployment = client.read_deployment_by_name("fill-cache/prices-backfill")
        parent = client.create_flow_run_from_deployment(
            deployment.id,
            parameters={
                "ticker_source": "custom",
                "tickers": tickers,
                "start": START,
                "end": END,
                "batch_size": BATCH,
                "concurrency": CONCURRENCY,
                "shards": 2,
            },
        )
    run_id = poll("the run's checkpoint", lambda: run_id_of(cluster, tickers), 120)
    poll(
        "both shard runs at work",
        lambda: len(children(cluster, run_id)) == 2 and done(cluster.data_url, run_id) > 0,
        180,
        context=cluster.logs,
    )
    _, engine = running(cluster, {str(parent.id)}, "the parent's process")
    engine.kill()
    crashed = wait_final_run(cluster, parent.id)
    assert crashed.state.is_crashed(), crashed.state
    wait_worker_done(cluster, parent.id, attempts=1)  # type: ignore[arg-type]
    retry_from_cli(cluster, parent.id)  # type: ignore[arg-type]

    final = wait_final_run(cluster, parent.id)
    assert final.state.is_completed(), f"{final.state.message}\n{cluster.logs()}"
    assert len(children(cluster, run_id)) == 2  # found again, none added
    assert item_attempts(cluster.data_url, run_id) == {("done", 1): len(tickers)}
    assert sim.stats()["by_endpoint"][PRICES] == len(tickers)
