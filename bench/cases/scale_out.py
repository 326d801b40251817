"""Case 10: one run over N workers (a sharded run), N = 1, 2 and 3.

A Prefect server backed by PostgreSQL (Debian's postgresql, as .ci/run installs it), the
process work pool and three `prefect worker start --limit 1` processes (one flow run
each), the data and the checkpoints in PostgreSQL, the API in its own process.
`syncpoint run fill-cache --shards N` is started from the bench (its parent run waits;
the children on the workers do the batches); N = 1 is the same command run in one
process, the best one worker can do.

Two settings:
- latency-bound: 200 ms a request, 8 requests in flight per worker; the throughput with
  N workers should be at least 0.9 x N x one worker's;
- a binding budget: the API enforces BUDGET_PER_MINUTE (429 beyond it) and every
  process draws from one Prefect global limit of that rate; the throughput should stay
  within 5% of the budget whatever N is, with no 429 and no 60-second window over the
  budget by more than the limit's burst.

Throughput is requests a second in the middle 60% of the first -> last request span,
counted by the API process each second: the children start a few seconds apart (a worker
polls, then starts a process), which is start-up, not scaling; start-up is shown apart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from bench.harness import (
    Bench,
    CaseResult,
    Failed,
    Sample,
    SimProcess,
    ensure_global_limit,
    syncpoint_cli,
    watched,
)

LATENCY_MS = 200
CONCURRENCY = 8
BATCH = 40
WORKERS = (1, 2, 3)
# Each N syncs the same tickers over its own range of the same length (its own run key),
# so that the workers, whose database setting is fixed when they start, serve every N.
FIRST_DAY = date(2026, 1, 5)
RANGE_DAYS = 80
TARGET_SCALING = 0.9
# The budget: below one worker's 40 a second, so that it binds whatever N is.
BUDGET_PER_MINUTE = 1500
BUDGET_SLOTS = BUDGET_PER_MINUTE // 60  # one second of it: the API's bucket holds as much
GLOBAL_LIMIT = "bench-scale-out-budget"
TARGET_FLAT = 0.05
POOL = "syncpoint"


def steady_rate(sample: Sample) -> float:
    """Requests a second in the middle 60% of the span (see the module's docstring)."""
    seconds = sample.per_second[:-1]  # the last second is partial
    if len(seconds) < 5:
        return (sample.requests - 1) / sample.span if sample.span > 0 else 0.0
    cut = len(seconds) // 5
    middle = seconds[cut : len(seconds) - cut]
    return sum(middle) / len(middle)


def worst_minute(sample: Sample) -> int:
    """The most requests in any 60 consecutive seconds (the whole run if shorter)."""
    counts = sample.per_second
    if len(counts) <= 60:
        return sum(counts)
    window = sum(counts[:60])
    worst = window
    for i in range(60, len(counts)):
        window += counts[i] - counts[i - 60]
        worst = max(worst, window)
    return worst


def run(bench: Bench) -> CaseResult:
    free_items = 200 if bench.quick else 2400
    budget_items = 200 if bench.quick else 1800
    result = CaseResult(
        10,
        "Scale-out over N workers",
        setup=(
            "A Prefect server on PostgreSQL, a process pool and 3 workers (`--limit 1`), data "
            f"and checkpoints in PostgreSQL, the API in its own process with {LATENCY_MS} ms "
            f"latency. `syncpoint run fill-cache --shards N --concurrency {CONCURRENCY} "
            f"--batch-size {BATCH}` for N = 1, 2, 3 (N = 1: the command alone, in one process). "
            f"Latency-bound: {free_items:,} tickers. Binding budget: {budget_items:,} tickers, "
            f"the API enforcing {BUDGET_PER_MINUTE:,}/min and a Prefect global limit of "
            f"{BUDGET_SLOTS} slots decaying at {BUDGET_PER_MINUTE // 60}/s "
            "(MARKET_API_GLOBAL_RATE_LIMIT) on every worker. Throughput: requests/s in the "
            "middle 60% of the first -> last request span, counted by the API each second."
        ),
        command="scripts/bench --case 10" + (" --quick" if bench.quick else ""),
    )
    from tests.e2e.harness import debian_postgres_bindir

    bindir = debian_postgres_bindir()
    if bindir is None:
        raise Failed("Debian's postgresql (with pg_trgm) is not installed: .ci/run installs it")
    rates: dict[tuple[str, int], Sample] = {}
    with cluster(bench, bindir) as (server, new_database):
        ensure_global_limit(
            server.api_url, GLOBAL_LIMIT, slots=BUDGET_SLOTS, per_minute=BUDGET_PER_MINUTE
        )
        for setting, items, limit in (
            ("latency-bound", free_items, None),
            ("budget", budget_items, BUDGET_PER_MINUTE),
        ):
            extra = {"MARKET_API_GLOBAL_RATE_LIMIT": GLOBAL_LIMIT} if limit else {}
            where = bench.folder(f"scale-out-{setting}")
            with SimProcess(latency_ms=LATENCY_MS, rate_limit_per_minute=limit) as sim:
                env = bench.env(
                    PREFECT_API_URL=server.api_url,
                    SYNCPOINT_DATABASE_URL=new_database(setting.replace("-", "_")),
                    MARKET_API_URL=sim.base_url,
                    PREFECT_LOCAL_STORAGE_PATH=str(where / "shared-results"),
                    **extra,
                )
                tickers = sim.data.symbols[:items]
                with workers(server, env, where, max(WORKERS)):
                    for n in WORKERS:
                        sample = watched(
                            sim,
                            fill_cache(tickers, n),
                            env=env,
                            cwd=where,
                            what=f"case 10 {setting} N={n}",
                        )
                        rates[(setting, n)] = sample
                        print(
                            f"  [10] {setting:<13} N={n}: {sample.requests} requests, steady "
                            f"{steady_rate(sample):6.1f}/s, span {sample.span:5.1f}s, start-up "
                            f"{sample.startup:4.1f}s, 429s {sample.responses.get('429', 0)}",
                            flush=True,
                        )
    report(result, rates)
    return result


def report(result: CaseResult, rates: dict[tuple[str, int], Sample]) -> None:
    one = steady_rate(rates[("latency-bound", 1)])
    for n in WORKERS:
        rate = steady_rate(rates[("latency-bound", n)])
        judged = n > 1
        result.add(
            f"latency-bound, N={n}: requests/s (x one worker)",
            f"{rate:.1f} ({rate / one:.2f}x)",
            f">= {TARGET_SCALING * n:.1f}x" if judged else "",
            rate >= TARGET_SCALING * n * one if judged else None,
        )
    budget = BUDGET_PER_MINUTE / 60
    burst = BUDGET_SLOTS
    for n in WORKERS:
        sample = rates[("budget", n)]
        rate = steady_rate(sample)
        throttled = sample.responses.get("429", 0)
        worst = worst_minute(sample)
        result.add(
            f"budget {BUDGET_PER_MINUTE:,}/min, N={n}: requests/s (share of the budget)",
            f"{rate:.1f} ({rate / budget:.1%})",
            f"within {TARGET_FLAT:.0%}",
            abs(rate / budget - 1) <= TARGET_FLAT,
        )
        result.add(
            f"budget, N={n}: 429s; most requests in a 60 s window",
            f"{throttled}; {worst:,}",
            f"0; <= {BUDGET_PER_MINUTE + burst:,}",
            throttled == 0 and worst <= BUDGET_PER_MINUTE + burst,
        )
    shares = [steady_rate(rates[("budget", n)]) / budget for n in WORKERS]
    if any(abs(share - 1) > TARGET_FLAT for share in shares):
        result.notes.append(
            "Budget, target missed: the throughput is flat in N (the budget binds, and adding "
            "workers neither raises nor lowers it) but stays at "
            f"{100 * min(shares):.0f}-{100 * max(shares):.0f}% of the budget with one worker "
            "as with three, so the loss is in how one process draws, not in sharing. Case 2 "
            "(a budget of 100/s, a SQLite-backed server) reaches 98-101% with the same drawer. "
            "Known losses: the server rounds its decay down at every write (about half a slot "
            "a draw), and a chunk that arrives with the cover at zero has decayed by the "
            "draw's round trip (kept, rounded up: syncpoint.core.rate_limit."
            "slots_still_counted)."
        )
    startups = [rates[("latency-bound", n)].startup for n in WORKERS]
    result.add(
        "start-up (command -> first request), N = 1, 2, 3",
        ", ".join(f"{s:.1f}s" for s in startups),
    )
    per_worker = one
    night = 500_000
    result.notes.append(
        "Throughput model. One worker sends at most concurrency / latency requests a second "
        f"({CONCURRENCY} / {LATENCY_MS / 1000:.1f} s = {CONCURRENCY / LATENCY_MS * 1000:.0f}/s; "
        f"measured {per_worker:.1f}/s). N workers send N times that until a budget B binds: "
        "throughput = min(N x per-worker rate, B, database write rate / rows per item). "
        "The database is far from binding here: case 5 upserts about 175,000 rows/s into "
        "PostgreSQL, and an item of this range is ~57 rows (2,300 items/s). For a "
        f"{night:,}-item night at one request an item: one worker "
        f"{night / per_worker / 3600:.1f} h, three {night / (3 * per_worker) / 3600:.1f} h "
        f"(at the measured per-worker rate); under a budget of B requests a minute, "
        f"{night:,} / B minutes whatever N is ({night / BUDGET_PER_MINUTE / 60:.1f} h at "
        f"{BUDGET_PER_MINUTE:,}/min, {night / 6000 / 60:.1f} h at 6,000/min): more workers "
        "then only add the budget's share of a worker's failover."
    )


def fill_cache(tickers: Sequence[str], shards: int) -> list[str]:
    start = FIRST_DAY + timedelta(days=(RANGE_DAYS + 10) * (shards - 1))
    end = start + timedelta(days=RANGE_DAYS)
    args = ["run", "fill-cache", "--ticker-source", "custom", "--tickers", ",".join(tickers)]
    args += ["--start", start.isoformat(), "--end", end.isoformat(), "--batch-size", str(BATCH)]
    args += ["--concurrency", str(CONCURRENCY), "--shards", str(shards)]
    return syncpoint_cli(*args)


@contextlib.contextmanager
def cluster(bench: Bench, bindir: Path) -> Iterator[tuple[Any, Any]]:
    """A PostgreSQL cluster, a Prefect server on it with syncpoint deployed; yields the
    server and a function that makes a new data database (its URL)."""
    import sqlalchemy as sa

    from tests.e2e.harness import deploy, prefect_server, throwaway_postgres

    folder = bench.folder("scale-out-cluster")
    with throwaway_postgres(bindir, "prefect") as url:
        root = sa.engine.make_url(url)
        server_url = root.set(drivername="postgresql+asyncpg")
        with prefect_server(
            "postgres", folder, server_url.render_as_string(hide_password=False)
        ) as server:
            deploy(server)
            admin = sa.create_engine(
                root.set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT"
            )

            def new_database(name: str) -> str:
                with admin.connect() as conn:
                    conn.execute(sa.text(f'CREATE DATABASE "data_{name}"'))
                return root.set(
                    drivername="postgresql+psycopg", database=f"data_{name}"
                ).render_as_string(hide_password=False)

            try:
                yield server, new_database
            finally:
                admin.dispose()


@contextlib.contextmanager
def workers(server: Any, env: dict[str, str], folder: Path, count: int) -> Iterator[None]:
    """`count` workers on the pool, one flow run each, online before the block starts."""
    from tests.e2e.harness import PREFECT, Proc, api, poll

    started = []
    try:
        for n in range(count):
            home = folder / f"worker-home-{n}"
            home.mkdir()
            started.append(
                Proc.spawn(
                    f"worker {n}",
                    [PREFECT, "worker", "start", "--pool", POOL, "--limit", "1"],
                    {**env, "PREFECT_HOME": str(home), "PREFECT_WORKER_QUERY_SECONDS": "1"},
                    folder / f"worker-{n}.log",
                )
            )

        def online() -> bool:
            with api(server) as client:
                alive = [w for w in client.read_workers_for_work_pool(POOL) if w.status == "ONLINE"]
            return len(alive) >= count

        if count:
            poll(f"{count} workers online", online, 120)
        yield
    finally:
        for worker in started:
            worker.stop()
