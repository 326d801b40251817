"""Case 3: the rerun of a completed 5,000-ticker date: no requests, little time.

The date is completed once (simulator without latency), then the same command runs again.
Its time beyond Prefect's start-up = its wall time minus that of a bare Prefect flow
started the same way (`python -m bench.trivial_flow`), paired per repetition.

The baseline is the Prefect-only way of skipping: one task per ticker, cached on the
ticker with a persisted result (`python -m bench.prefect_cache`). Its rerun makes no
request either, but costs Prefect's per-task price for every item; with fewer items than
the syncpoint run (time budget), its cost per item is measured and extrapolated.
"""

from __future__ import annotations

import json

from bench.harness import (
    DAY,
    Bench,
    CaseResult,
    Failed,
    Sample,
    bench_module,
    daily_sync_cli,
    median,
    require,
    run_timed,
    spread,
    tickers_file,
    watched,
)
from syncpoint.simulator import MarketSimulator, SimulatorConfig

BATCH_SIZE = 250
CONCURRENCY = 32
TARGET_SECONDS = 2.0


def run(bench: Bench) -> CaseResult:
    tickers_n = 150 if bench.quick else 5000
    cached_n = 30 if bench.quick else 300
    reps = bench.reps(3)
    result = CaseResult(
        3,
        "No-op rerun of a completed date",
        setup=(
            f"A {tickers_n:,}-ticker date completed once (`syncpoint run daily-sync "
            f"--batch-size {BATCH_SIZE} --concurrency {CONCURRENCY}`, simulator latency 0), "
            f"then rerun {reps} time(s), each paired with `python -m bench.trivial_flow` "
            "(a bare Prefect flow run, started the same way). Baseline: `python -m "
            f"bench.prefect_cache` on {cached_n:,} tickers, one cached task per ticker "
            "(cache_key_fn on the ticker, persist_result=True), run once to fill the cache "
            "and twice more to time the skip. `python -m bench.import_cost` times the imports "
            "the CLI adds to Prefect's."
        ),
        command="scripts/bench --case 3" + (" --quick" if bench.quick else ""),
    )
    with MarketSimulator(SimulatorConfig()) as sim:
        where = bench.folder("noop")
        file = tickers_file(where, sim.data.symbols[:tickers_n])
        env = bench.env(
            MARKET_API_URL=sim.base_url, SYNCPOINT_DATABASE_URL=f"sqlite:///{where / 'sync.db'}"
        )
        cli = daily_sync_cli(file, CONCURRENCY, "--batch-size", str(BATCH_SIZE))
        print(f"  [3] completing the {tickers_n:,}-ticker date once...", flush=True)
        first = watched(sim, cli, env=env, cwd=where, what="case 3 first run")
        if first.requests != 2 * tickers_n:
            raise Failed(f"case 3: the first run made {first.requests} requests")
        result.add(
            "first run (completes the date)",
            f"{first.total:.1f}s, {first.requests:,} requests",
        )

        trivial: list[Sample] = []
        noop: list[Sample] = []
        imports: list[float] = []
        for rep in range(reps):
            order = ("imports", "noop", "trivial") if rep % 2 else ("trivial", "noop", "imports")
            for label in order:
                if label == "imports" and bench.quick:
                    continue
                if label == "imports":
                    timed = require(
                        run_timed(bench_module("import_cost"), env=env, cwd=where), "imports"
                    )
                    imports.append(json.loads(timed.stdout.strip().splitlines()[-1])["beyond"])
                    continue
                if label == "trivial":
                    sample = watched(
                        sim, bench_module("trivial_flow"), env=env, cwd=where, what="trivial"
                    )
                    trivial.append(sample)
                else:
                    sample = watched(sim, cli, env=env, cwd=where, what="case 3 rerun")
                    if "already complete" not in sample.timed.stdout:
                        raise Failed(f"case 3: the rerun did not skip:\n{sample.timed.tail()}")
                    noop.append(sample)
                print(
                    f"  [3] rep {rep + 1}/{reps} {label:<7} {sample.total:5.2f}s, "
                    f"{sample.requests} requests",
                    flush=True,
                )
        beyond = [n.total - t.total for n, t in zip(noop, trivial, strict=True)]
        requests = sum(s.requests for s in noop)
        result.add("bare Prefect flow run (start-up yardstick)", spread([s.total for s in trivial]))
        result.add("syncpoint rerun: requests (all reruns)", str(requests), "0", requests == 0)
        result.add("syncpoint rerun: whole command", spread([s.total for s in noop]))
        result.add(
            "syncpoint rerun: beyond Prefect start-up",
            spread(beyond),
            f"<= {TARGET_SECONDS:.0f}s",
            median(beyond) <= TARGET_SECONDS,
        )
        if imports:
            result.add(
                "importing the flow's modules beyond Prefect (measured apart)",
                spread(imports),
            )

        # The Prefect-only baseline.
        base_dir = bench.folder("prefect-cache")
        base_file = tickers_file(base_dir, sim.data.symbols[:cached_n])
        args = bench_module(
            "prefect_cache",
            "--base-url",
            sim.base_url,
            "--tickers-file",
            str(base_file),
            "--namespace",
            bench.workdir.name,
            "--date",
            DAY,
        )
        print(f"  [3] Prefect-only baseline: filling the cache of {cached_n:,} tasks...")
        fill = watched(sim, args, env=bench.env(), cwd=base_dir, what="prefect_cache fill")
        print(f"  [3] ...{fill.total:.1f}s; rerun...", flush=True)
        reruns = []
        for _ in range(1 if bench.quick else 2):
            again = watched(sim, args, env=bench.env(), cwd=base_dir, what="prefect_cache rerun")
            report = json.loads(again.timed.stdout.strip().splitlines()[-1])
            if report["cached"] != cached_n or again.requests:
                raise Failed(f"case 3: Prefect-only rerun not fully cached: {report}")
            reruns.append((again.total, report["flow_seconds"]))
        base_beyond = median([total for total, _ in reruns]) - median([s.total for s in trivial])
        per_item = base_beyond / cached_n
        in_flow = median([flow for _, flow in reruns]) / cached_n
        result.add(
            f"Prefect-only rerun of {cached_n:,} cached tasks: whole command, 0 requests",
            spread([total for total, _ in reruns]),
        )
        result.add(
            "Prefect-only rerun: beyond start-up, per item",
            f"{per_item * 1000:.1f} ms ({in_flow * 1000:.1f} ms inside the flow)",
        )
        label = "measured" if cached_n == tickers_n else f"extrapolated from {cached_n:,}"
        extrapolated = per_item * tickers_n
        result.add(
            f"Prefect-only rerun for {tickers_n:,} items, beyond start-up ({label})",
            f"{extrapolated:.1f}s",
        )
        ours = median(beyond)
        result.add(
            "Prefect-only / syncpoint, time beyond start-up",
            f"{extrapolated / ours:.0f}x" if ours > 0 else "n/a",
        )
        fill_note = f"Filling the Prefect-only cache took {fill.total:.1f}s for {cached_n:,} items."
    imported = median(imports) if imports else float("nan")
    result.notes.append(
        f"syncpoint settles a completed date from one row (its sync_runs status) before any "
        f"stage runs, so a rerun costs the same at any size: {ours:.2f}s beyond a bare flow "
        "run here. Where it goes: importing what the flow module needs beyond Prefect "
        f"(SQLAlchemy, prefect-sqlalchemy, httpx, the tasks) takes {imported:.2f}s measured "
        "on its own; the rest is the "
        "run's bookkeeping (opening the checkpoint, the summary, and one summary artifact "
        "on the run page, an API call). The two are measured in different processes, so "
        "on a noisy machine the parts need not add up to the whole. Skipping with "
        f"Prefect's cache instead costs {per_item * 1000:.0f} ms per item (a task run, a "
        f"cache lookup and a persisted-result read each): {extrapolated:.0f}s for "
        f"{tickers_n:,} items. {fill_note}"
    )
    if ours > TARGET_SECONDS:
        result.notes.append(
            f"Target missed by {ours - TARGET_SECONDS:.2f}s. What would reach it: the "
            "imports are most of it; import the stage machinery (syncpoint.engine.batch_map, "
            "the sources) inside the stages rather than at module import, so the no-op "
            "path does not pay for them. Rerun first: the yardstick is noisy."
        )
    return result
