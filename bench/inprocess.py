"""Case 6's worker: one `daily_sync` flow run in this process, item marks on or off.

    python -m bench.inprocess --marks on|off --tickers-file F --batch-size B --concurrency C

MARKET_API_URL, SYNCPOINT_DATABASE_URL and PREFECT_API_URL come from the environment.
With `--marks off`, `Ledger.mark` is a no-op for the mapped stages (prices, valuations),
in this process only: the store step upserts the rows but records no checkpoint. The
universe stage keeps its marks, because the later stages read their items from them.
With `--marks on` the time spent inside those marks is added up (a timer around the call),
and in both modes the time inside syncpoint.core.store.upsert. Prints JSON: the flow call's
wall and CPU seconds, the marks' and upserts' seconds, the run's status and requests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection

from syncpoint.core.ledger import ItemOutcome, Lease, Ledger

MARK_SECONDS = [0.0]
UPSERT_SECONDS = [0.0]


def time_upserts() -> None:
    """The time the store step spends in syncpoint.core.store.upsert (marks on or off)."""
    import syncpoint.core.store as store

    original = store.upsert

    def upsert(conn: Connection, table_name: str, rows: Sequence[dict[str, Any]]) -> int:
        began = time.perf_counter()
        try:
            return original(conn, table_name, rows)
        finally:
            UPSERT_SECONDS[0] += time.perf_counter() - began

    store.upsert = upsert


def time_checkpoint_writes() -> None:
    """Marks on, and the time spent in them (prices and valuations) added up."""
    original = Ledger.mark

    def mark(
        self: Ledger,
        conn: Connection,
        run_id: str,
        stage: str,
        outcomes: Sequence[ItemOutcome],
        batch_no: int | None = None,
        lease: Lease | None = None,
    ) -> None:
        began = time.perf_counter()
        original(self, conn, run_id, stage, outcomes, batch_no, lease)
        if stage != "universe":
            MARK_SECONDS[0] += time.perf_counter() - began

    Ledger.mark = mark  # type: ignore[method-assign]


def checkpoint_writes_off() -> None:
    original = Ledger.mark

    def mark(
        self: Ledger,
        conn: Connection,
        run_id: str,
        stage: str,
        outcomes: Sequence[ItemOutcome],
        batch_no: int | None = None,
        lease: Lease | None = None,
    ) -> None:
        if stage == "universe":
            original(self, conn, run_id, stage, outcomes, batch_no, lease)

    Ledger.mark = mark  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inprocess", description=__doc__)
    parser.add_argument("--marks", choices=["on", "off"], required=True)
    parser.add_argument("--tickers-file", required=True)
    parser.add_argument("--date", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    args = parser.parse_args(argv)
    if args.marks == "off":
        checkpoint_writes_off()
    else:
        time_checkpoint_writes()
    time_upserts()

    from syncpoint.flows.daily_sync import daily_sync

    started, cpu_started = time.perf_counter(), time.process_time()
    summary: dict[str, Any] = daily_sync(
        run_date=args.date,
        tickers_file=args.tickers_file,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
    )
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_started  # every thread of this process
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": cpu,
                "status": summary["status"],
                "requests": summary["requests"],
                "rows_written": summary["rows_written"],
                "mark_seconds": MARK_SECONDS[0],
                "upsert_seconds": UPSERT_SECONDS[0],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
