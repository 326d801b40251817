"""One worker of a sharded stage, as its own process: the multi-worker tests start three.

    python -m tests.integration.shard_worker --database URL --api URL --run RUN_ID
        --start 2026-10-01 --end 2026-11-20 --batch-size 10

Runs the product's shard flow (syncpoint.flows.shard) in this process, on the Prefect
API of the environment, as a worker runs a child of the shard deployment: it leases
batches of a fill-cache run's history stage until none is left. The run and its items
are registered by the test, as the parent flow does. Prints the shard's report (one JSON
line) at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.integration.shard_worker")
    for name in ("--database", "--api", "--run", "--start", "--end"):
        parser.add_argument(name, required=True)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--lease-seconds", type=float, default=4.0)
    parser.add_argument(
        "--go",
        help="a file to wait for after start-up (prints 'ready' first), so that "
        "workers started together begin leasing together however slowly each one imports",
    )
    args = parser.parse_args()
    # The worker's environment, as a deployment's worker has it.
    os.environ.update(
        SYNCPOINT_DATABASE_URL=args.database, MARKET_API_URL=args.api, SYNCPOINT_FLOW_RETRIES="0"
    )
    from syncpoint.flows.shard import shard

    if args.go:
        print("ready", flush=True)
        while not os.path.exists(args.go):
            time.sleep(0.02)
    report = shard(
        job="fill-cache",
        run_key="shards",
        run_id=args.run,
        stage="history",
        lease_seconds=args.lease_seconds,
        parameters={
            "start": args.start,
            "end": args.end,
            "batch_size": args.batch_size,
            "concurrency": args.concurrency,
        },
    )
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
