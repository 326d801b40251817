"""Case 4: SIGKILL about half way, rerun: how many requests were spent twice.

The CLI runs 1,000 tickers x (prices + valuations); the bench polls the run's SQLite
ledger (sync_items done) and sends SIGKILL once just over half of the 2,000 item-stages
are done and the next batch is half fetched, then reruns the same command to completion.
Requests over both runs are counted by the simulator. Bound: items x 2 stages + batch
size x 3 (the two batches being fetched and the one being stored when the kill lands).

The baseline (`bench.baseline_sync`, no checkpoint) is killed at the same share of its
requests and rerun: everything it fetched before the kill is fetched again.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.harness import (
    Bench,
    CaseResult,
    Failed,
    baseline_sync,
    daily_sync_cli,
    sqlite_scalar,
    tickers_file,
    watched,
)
from syncpoint.simulator import MarketSimulator, SimulatorConfig

LATENCY_MS = 20
CONCURRENCY = 32
BATCH_SIZE = 100
POLL = 0.02
DONE_SQL = (
    "SELECT count(*) FROM sync_items WHERE stage IN ('prices', 'valuations') AND status = 'done'"
)


def _item_requests(sim: MarketSimulator) -> int:
    by = sim.stats()["by_endpoint"]
    return int(by["historical-price-eod/full"] + by["discounted-cash-flow"])


def _kill_when(
    args: list[str],
    env: dict[str, str],
    cwd: Path,
    reached: Callable[[], bool],
    timeout: float = 300,
) -> float:
    """Start `args`, SIGKILL it as soon as `reached()` is true; returns when it was killed."""
    with (cwd / "killed-run.log").open("w") as log:
        proc = subprocess.Popen(  # noqa: S603
            args, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT
        )
        started = time.monotonic()
        try:
            while not reached():
                if proc.poll() is not None:
                    raise Failed(f"the run ended (exit {proc.returncode}) before the kill point")
                if time.monotonic() - started > timeout:
                    raise Failed("no progress to kill")
                time.sleep(POLL)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def run(bench: Bench) -> CaseResult:
    # Here, not at the top: the bench driver itself never imports Prefect.
    from syncpoint.engine.batch_map import fetches_in_flight, unmarked_batches_at_most

    tickers_n = 150 if bench.quick else 1000
    batch = 30 if bench.quick else BATCH_SIZE
    items = 2 * tickers_n
    kill_at = tickers_n + batch  # just past half: the first valuations batch stored
    # The batches a kill can find fetched-but-unmarked at this concurrency and batch size.
    in_flight = unmarked_batches_at_most(CONCURRENCY, batch)
    fetching = fetches_in_flight(CONCURRENCY, batch)
    bound = items + in_flight * batch
    result = CaseResult(
        4,
        "Crash redo",
        setup=(
            f"{tickers_n:,} tickers x (prices + valuations) = {items:,} item-stages, simulator "
            f"latency {LATENCY_MS} ms, `syncpoint run daily-sync --batch-size {batch} "
            f"--concurrency {CONCURRENCY}`; SIGKILL once {kill_at:,} item-stages are done "
            f"(polling sync_items every {POLL * 1000:.0f} ms) and the simulator has seen "
            f"{batch // 2} more requests (the next batch half fetched), then the same command "
            "to the end. Baseline: `bench.baseline_sync` killed at the same share of its requests, "
            "then rerun."
        ),
        command="scripts/bench --case 4" + (" --quick" if bench.quick else ""),
    )
    with MarketSimulator(SimulatorConfig(latency_ms=LATENCY_MS)) as sim:
        where = bench.folder("crash")
        db = where / "sync.db"
        file = tickers_file(where, sim.data.symbols[:tickers_n])
        env = bench.env(MARKET_API_URL=sim.base_url, SYNCPOINT_DATABASE_URL=f"sqlite:///{db}")
        cli = daily_sync_cli(file, CONCURRENCY, "--batch-size", str(batch))
        sim.reset_stats()
        # Past the done mark, wait until the next batch is half fetched: a kill right after
        # a commit would find nothing in flight and prove nothing.
        mark: list[int] = []

        def half_way() -> bool:
            if not mark:
                if sqlite_scalar(db, DONE_SQL) < kill_at:
                    return False
                mark.append(_item_requests(sim))
            return _item_requests(sim) >= mark[0] + batch // 2

        _kill_when(cli, env, where, half_way)
        done_at_kill = sqlite_scalar(db, DONE_SQL)
        before = _item_requests(sim)
        print(
            f"  [4] killed with {done_at_kill:,}/{items:,} item-stages done, "
            f"{before:,} requests sent",
            flush=True,
        )
        rerun = watched(sim, cli, env=env, cwd=where, what="case 4 rerun")
        total = before + rerun.requests
        done = sqlite_scalar(db, DONE_SQL)
        valuations = sqlite_scalar(db, "SELECT count(*) FROM dcf_valuations")
        priced = sqlite_scalar(db, "SELECT count(DISTINCT ticker) FROM stock_prices")
        if done != items or valuations != tickers_n or priced != tickers_n:
            raise Failed(
                f"case 4: after the rerun {done} item-stages done, {valuations} valuations, "
                f"{priced} priced tickers; expected {items}, {tickers_n}, {tickers_n}"
            )
        result.add(
            "killed at (item-stages done)",
            f"{done_at_kill:,} of {items:,} ({100 * done_at_kill / items:.0f}%)",
        )
        result.add(
            "syncpoint: requests before kill + rerun",
            f"{before:,} + {rerun.requests:,} = {total:,}",
            f"<= {bound:,}",
            total <= bound,
        )
        result.add(
            "syncpoint: requests spent twice",
            f"{total - items:,} ({(total - items) / batch:.1f} batches of {batch})",
            f"<= {in_flight * batch:,} ({in_flight} batches in flight)",
            total - items <= in_flight * batch,
        )
        result.add("syncpoint: rerun completes every item", f"{done:,}/{items:,} done")

        # The baseline: no checkpoint, so a kill loses all it fetched.
        base_dir = bench.folder("crash-baseline")
        base = baseline_sync(sim.base_url, file, base_dir / "baseline.db", concurrency=CONCURRENCY)
        share = done_at_kill / items
        sim.reset_stats()
        _kill_when(base, bench.env(), base_dir, lambda: _item_requests(sim) >= share * items)
        base_before = _item_requests(sim)
        base_rerun = watched(sim, base, env=bench.env(), cwd=base_dir, what="baseline rerun")
        base_total = base_before + base_rerun.requests
        result.add(
            "baseline: requests before kill + rerun",
            f"{base_before:,} + {base_rerun.requests:,} = {base_total:,}",
        )
        result.add("baseline: requests spent twice", f"{base_total - items:,}")
    result.notes.append(
        f"Killed with {done_at_kill:,} item-stages marked done, syncpoint spent "
        f"{total - items:,} requests twice: the items of the batches that were fetched but "
        f"not yet marked when the kill landed (at most the {fetching} batches being "
        "fetched and the one being stored; the persisted fetch cache gives back those whose "
        "fetch had finished). The hand-written baseline loses everything it fetched: "
        f"{base_total - items:,} requests twice."
    )
    return result
