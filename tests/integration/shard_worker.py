"""One worker of a sharded stage, as its own process: the multi-worker tests start three.

    python -m tests.integration.shard_worker --database URL --api URL --run RUN_ID
        --stage prices --start 2026-10-01 --end 2026-11-20 --batch-size 10

Runs syncpoint.engine.batch_map.map_shard inside a Prefect flow (PREFECT_API_URL from the
environment), as the shard flow will: it leases batches of the run's pending items until
none is left. The run and its items are registered by the test, as a parent flow would.
Prints one JSON line at the end: {"owner", "batches", "requests", "leases_lost"}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import date

from prefect import flow

from syncpoint.blocks.market_api import MarketApi
from syncpoint.core.db import Database
from syncpoint.core.interrupts import StopFlag
from syncpoint.core.ledger import Ledger, new_owner
from syncpoint.engine.batch_map import LeaseTerms, map_shard
from syncpoint.sources.market import PricesSource


@flow(name="shard-worker-test")
def work(args: argparse.Namespace) -> dict[str, object]:
    database = Database.from_url(args.database)
    ledger = Ledger(database.engine())
    owner = new_owner()
    api = MarketApi(base_url=args.api, concurrency=args.concurrency)
    ran = map_shard(
        ledger=ledger,
        data=database,
        checkpoints=database,
        run_id=args.run,
        stage=args.stage,
        source=PricesSource(api, date.fromisoformat(args.start), date.fromisoformat(args.end)),
        batch_size=args.batch_size,
        terms=LeaseTerms(owner, seconds=args.lease_seconds),
        stop=StopFlag(),
        on_progress=lambda p: print(json.dumps({"progress": p.processed_now}), flush=True),
        logger=logging.getLogger("shard-worker"),
        poll_seconds=0.5,
    )
    return {
        "owner": owner,
        "batches": ran.batches,
        "requests": ran.requests,
        "leases_lost": ran.leases_lost,
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.integration.shard_worker")
    for name in ("--database", "--api", "--run", "--stage", "--start", "--end"):
        parser.add_argument(name, required=True)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--lease-seconds", type=float, default=4.0)
    args = parser.parse_args()
    print(json.dumps(work(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
