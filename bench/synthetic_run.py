"""One syncpoint run over N synthetic items: the engine at scale, without an API's limits.

    python -m bench.synthetic_run --items 500000 --database /tmp/x.db [--batch-size 1000]

A Prefect flow run (the same JobRun, batch map, ledger and store a daily sync uses) of one
stage whose source answers every item after `--latency-ms` (1 ms) with one stock_prices
row, no HTTP involved: what is measured is syncpoint's cost per item and per batch as the
run grows. Prints JSON: the items the run settled, its wall time and the process's peak
RSS. Run it again on the same database for the no-op rerun of a completed run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, ClassVar

from prefect import flow, get_run_logger

from syncpoint.blocks.checkpoint import CheckpointStore
from syncpoint.core.db import Database
from syncpoint.core.http import ApiClient
from syncpoint.engine.job_run import JobRun

JOB = "synthetic"
DAY = date(2026, 11, 20)


@dataclass(frozen=True)
class SyntheticSource:
    """Answers every item after `latency` seconds with one price row; never fails."""

    items: int
    latency: float
    concurrency: int
    table: ClassVar[str] = "stock_prices"

    def cache_identity(self) -> str:
        return f"synthetic:{self.items}:{self.latency}"

    def client(self) -> ApiClient:
        # The stage opens one; this source never sends a request through it.
        return ApiClient("http://127.0.0.1:9", concurrency=self.concurrency)

    async def fetch(self, client: ApiClient, item: str) -> list[dict[str, Any]]:
        await asyncio.sleep(self.latency)
        return [
            {
                "ticker": item,
                "date": DAY,
                "open": 1.0,
                "high": 2.0,
                "low": 0.5,
                "close": 1.5,
                "volume": 100,
            }
        ]


def universe(n: int) -> list[str]:
    return [f"S{i:07d}" for i in range(n)]


@flow(name="bench-synthetic", log_prints=False)
def synthetic(
    items: int, database_url: str, batch_size: int, concurrency: int, latency_ms: float
) -> dict[str, Any]:
    data = Database.from_url(database_url)
    source = SyntheticSource(items, latency_ms / 1000, concurrency)
    with JobRun(
        JOB,
        f"n{items}",
        data=data,
        store=CheckpointStore(),
        stages=("items",),
        params={"items": items},
        fresh=False,
        logger=get_run_logger(),
        resume_command="python -m bench.synthetic_run",
    ) as run:
        if run.already_complete:
            return run.publish(run.summary())
        run.map_stage("items", source, items=lambda: universe(items), batch_size=batch_size)
        return run.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.synthetic_run", description=__doc__)
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--database", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=1.0)
    args = parser.parse_args(argv)
    started = time.monotonic()
    summary = synthetic(
        args.items,
        f"sqlite:///{args.database}",
        args.batch_size,
        args.concurrency,
        args.latency_ms,
    )
    print(
        json.dumps(
            {
                "items": args.items,
                "status": summary["status"],
                "done": summary["totals"].get("items", {}).get("done", 0),
                "requests": summary["requests"],
                "seconds": time.monotonic() - started,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
