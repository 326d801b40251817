"""Case 9: half a million items in one run: the ledger's cost per batch, memory, a no-op
rerun and `syncpoint status`, at 500,000 items against 5,000 (and 50,000).

Two parts, each in its own process:

- `python -m bench.ledger_scale --items N`: the ledger alone (no Prefect), one stage of N
  items; the median cost of planning, marking and answering status per batch of 50, timed
  on the run's last batches, when the ledger is as full as it gets. Judged: each at
  500,000 items within 1.2x of its cost at 5,000.
- `python -m bench.synthetic_run --items N`: a real flow run (JobRun, the batch map, the
  store) over N items of a synthetic source answering after 1 ms with one row each, batch
  1,000, 64 in flight; then the same command again, the no-op rerun of a completed run,
  paired with a bare Prefect flow (`python -m bench.trivial_flow`); then `syncpoint status`
  on its database. Judged: peak RSS <= 400 MiB at 500,000 items and within 1.25x of the
  50,000-item run's; the rerun <= 5 s beyond the bare flow; status <= 1 s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.harness import (
    Bench,
    CaseResult,
    Failed,
    bench_module,
    median,
    require,
    run_timed,
    spread,
    syncpoint_cli,
)

LEDGER_RATIO = 1.2
RSS_LIMIT_MIB = 400
RSS_RATIO = 1.25
RERUN_SECONDS = 5.0
STATUS_SECONDS = 1.0


def _json(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise Failed(f"no JSON in the output: {stdout[-500:]}")
    return dict(json.loads(lines[-1]))


def _items_run(bench: Bench, module: str, n: int, db: Path) -> dict[str, Any]:
    """`python -m bench.<module> --items n --database db`: its JSON line and wall time."""
    timed = require(
        run_timed(
            bench_module(module, "--items", str(n), "--database", str(db)),
            env=bench.env(),
            cwd=db.parent,
            timeout=3600,
        ),
        f"case 9 {module} {n:,}",
    )
    figures = {**_json(timed.stdout), "wall": timed.total}
    print(f"  [9] {module} at {n:,} items: {figures}", flush=True)
    return figures


def run(bench: Bench) -> CaseResult:
    small, mid, large = (500, 5_000, 50_000) if bench.quick else (5_000, 50_000, 500_000)
    reps = bench.reps(2)
    result = CaseResult(
        9,
        "Half a million items",
        setup=(
            f"`python -m bench.ledger_scale --items N` (N = {small:,}, {large:,}; the ledger "
            "alone, batches of 50, the last 60 batches timed) and `python -m "
            f"bench.synthetic_run --items N` (N = {mid:,}, {large:,}: a flow run over a "
            "synthetic source answering after 1 ms, batch 1,000, 64 in flight, SQLite), then "
            f"the same command again (the no-op rerun, {reps} time(s), each paired with `python "
            "-m bench.trivial_flow`), then `syncpoint status` on the run's database."
        ),
        command="scripts/bench --case 9" + (" --quick" if bench.quick else ""),
    )
    folder = bench.folder("scale")

    ledger = {
        n: _items_run(bench, "ledger_scale", n, folder / f"ledger-{n}.db") for n in (small, large)
    }
    for what, key in (("planning", "plan_ms"), ("marking", "mark_ms"), ("status", "status_ms")):
        ratio = ledger[large][key] / ledger[small][key]
        result.add(
            f"ledger: {what} per batch, {large:,} / {small:,} items",
            f"{ratio:.2f}x ({ledger[large][key]:.2f} ms / {ledger[small][key]:.2f} ms)",
            f"<= {LEDGER_RATIO}x",
            ratio <= LEDGER_RATIO,
        )
    result.add(
        f"ledger: registering {large:,} items",
        f"{ledger[large]['register_s']:.1f}s ({ledger[small]['register_s']:.2f}s for {small:,})",
    )

    runs = {
        n: _items_run(bench, "synthetic_run", n, folder / f"synthetic-{n}.db") for n in (mid, large)
    }
    for n, figures in runs.items():
        if figures["done"] != n:
            raise Failed(f"case 9: the run of {n:,} items settled {figures['done']:,}")
    rss_large, rss_mid = runs[large]["peak_rss_mib"], runs[mid]["peak_rss_mib"]
    result.add(
        f"run of {large:,} items: whole command",
        f"{runs[large]['wall']:.1f}s ({large / runs[large]['wall']:,.0f} items/s; "
        f"{runs[mid]['wall']:.1f}s for {mid:,})",
    )
    result.add(
        f"run of {large:,} items: peak RSS",
        f"{rss_large:.0f} MiB",
        f"<= {RSS_LIMIT_MIB} MiB",
        rss_large <= RSS_LIMIT_MIB,
    )
    result.add(
        f"peak RSS, {large:,} / {mid:,} items",
        f"{rss_large / rss_mid:.2f}x ({rss_mid:.0f} MiB at {mid:,})",
        f"<= {RSS_RATIO}x",
        rss_large / rss_mid <= RSS_RATIO,
    )

    beyond: list[float] = []
    db = folder / f"synthetic-{large}.db"
    for rep in range(reps):
        pair = ("rerun", "trivial") if rep % 2 == 0 else ("trivial", "rerun")
        walls: dict[str, float] = {}
        for label in pair:
            args = (
                bench_module("synthetic_run", "--items", str(large), "--database", str(db))
                if label == "rerun"
                else bench_module("trivial_flow")
            )
            timed = require(
                run_timed(args, env=bench.env(), cwd=folder), f"case 9 {label} {rep + 1}"
            )
            walls[label] = timed.total
        beyond.append(walls["rerun"] - walls["trivial"])
        print(f"  [9] no-op rerun {rep + 1}/{reps}: {walls}", flush=True)
    result.add(
        f"no-op rerun of the {large:,}-item run, beyond a bare Prefect flow",
        spread(beyond),
        f"<= {RERUN_SECONDS:.0f}s",
        median(beyond) <= RERUN_SECONDS,
    )

    status_env = bench.env(SYNCPOINT_DATABASE_URL=f"sqlite:///{db}")
    status = [
        require(
            run_timed(syncpoint_cli("status", "--json"), env=status_env, cwd=folder),
            "case 9 status",
        ).total
        for _ in range(3)
    ]
    result.add(
        f"`syncpoint status` on the {large:,}-item run, whole command",
        spread(status),
        f"<= {STATUS_SECONDS:.0f}s",
        median(status) <= STATUS_SECONDS,
    )
    result.notes.append(
        "The ledger keeps each stage's counts as items change (sync_item_counts), so status "
        "reads a few rows at any size; pending items are planned a page at a time by keyset "
        "and marked by primary key, so neither grows with the run. Memory holds a page of "
        f"pending items and the batches in flight; the universe list the stage registers "
        f"({large:,} names) is the part that grows."
    )
    return result
