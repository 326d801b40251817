"""The ledger's cost per batch at a given run size: planning, marking and status.

    python -m bench.ledger_scale --items 500000 --database /tmp/x.db [--batch 50]

One run with one stage of N items (registered as a universe is), then, for a sample of
batches spread over the run: plan the batch (read the next page of pending items),
mark it done (the store step's transaction), and answer status (what `syncpoint status`
and the run page ask). Prints JSON: the median milliseconds of each per batch, the time
to register the universe and to count the run, and the process's peak RSS.

No Prefect here: this is the ledger's own cost, the part that could grow with the run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

from syncpoint.core.db import Database
from syncpoint.core.ledger import ItemOutcome, Ledger, new_owner
from syncpoint.engine.batch_map import iter_batches
from syncpoint.engine.report import run_status

STAGE = "items"
SAMPLES = 60  # batches timed, spread over the run


def universe(n: int) -> list[str]:
    return [f"S{i:07d}" for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger_scale", description=__doc__)
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--database", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args(argv)
    ledger = Ledger(Database.from_url(f"sqlite:///{args.database}").engine())
    owner = new_owner()
    run = ledger.open(
        "ledger-scale", str(args.items), stages=[STAGE], params={}, fresh=True, owner=owner
    ).run

    began = time.perf_counter()
    ledger.add_items(run.run_id, STAGE, universe(args.items))
    register = time.perf_counter() - began

    # Mark all but the sampled tail done in bulk (untimed), so the samples meet a ledger
    # as full as the run's end would have it; then time SAMPLES batches one by one.
    batches = iter_batches(
        ledger.pending_pages(run.run_id, STAGE),
        run_id=run.run_id,
        stage=STAGE,
        batch_size=args.batch,
        first_number=1,
    )
    total = -(-args.items // args.batch)
    timed_from = max(0, total - SAMPLES)
    plan_total = 0.0  # planning reads a page every so many batches: judged as a mean
    mark_ms: list[float] = []
    status_ms: list[float] = []
    number = 0
    while True:
        began = time.perf_counter()
        batch = next(batches, None)
        planned = time.perf_counter() - began
        plan_total += planned
        if batch is None:
            break
        number += 1
        outcomes = [ItemOutcome.done(p.item) for p in batch.items]
        began = time.perf_counter()
        with ledger.engine.begin() as conn:
            ledger.mark(conn, run.run_id, STAGE, outcomes, batch.number)
        marked = time.perf_counter() - began
        if number > timed_from:
            mark_ms.append(1000 * marked)
            began = time.perf_counter()
            run_status(ledger, ledger.get(run.run_id))
            status_ms.append(1000 * (time.perf_counter() - began))
    began = time.perf_counter()
    counts = ledger.counts(run.run_id)
    count_s = time.perf_counter() - began
    ledger.release(owner)
    print(
        json.dumps(
            {
                "items": args.items,
                "batch": args.batch,
                "register_s": register,
                "plan_ms": 1000 * plan_total / max(1, number),
                "mark_ms": statistics.median(mark_ms),
                "status_ms": statistics.median(status_ms),
                "counts_s": count_s,
                "done": counts[STAGE].done,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
