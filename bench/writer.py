"""One bulk writer in its own process, so its peak memory is its own.

    python -m bench.writer --method upsert|to_sql --url URL --rows N [--chunk 50000]
                           [--max-seconds S]

Writes N synthetic daily price rows into `stock_prices` of an empty database, chunk by
chunk, each chunk in its own transaction (as the engine stores one batch per transaction),
or stops after the chunk that brings its write time past S seconds (the time budget of a
slow writer; the report says how many rows it wrote):

- upsert: `syncpoint.core.store.upsert(conn, "stock_prices", rows)`, syncpoint's store step;
- to_sql: `pandas.DataFrame.to_sql("stock_prices", conn, if_exists="append", index=False,
  method="multi", chunksize=1000)` into the identical table;
- executemany: a reference, not product code: one parameterised `INSERT ... ON CONFLICT DO
  UPDATE` run with all the chunk's rows (SQLAlchemy executemany), the shape case 5's notes
  recommend for syncpoint's SQLite upsert.

Both start from the same list of row dicts (what a fetch batch holds); building the
DataFrame is part of to_sql's time as building its frame is part of upsert's. Generating
a chunk is not timed. Prints JSON: seconds, rows/s, per-chunk rates, and the process's
peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import Connection, func, select
from sqlalchemy.dialects import postgresql, sqlite

from syncpoint.core.db import Database
from syncpoint.core.store import upsert
from syncpoint.core.tables import stock_prices

DAYS_PER_TICKER = 250  # about a trading year per ticker
FIRST_DAY = date(2020, 1, 1)


def chunk_rows(start: int, count: int, seed: int = 7) -> list[dict[str, Any]]:
    """Rows start..start+count-1 of the synthetic set: unique (ticker, date) keys."""
    rng = random.Random(seed * 1_000_003 + start)
    rows = []
    for n in range(start, start + count):
        ticker, day = divmod(n, DAYS_PER_TICKER)
        base = 10.0 + rng.random() * 490.0
        rows.append(
            {
                "ticker": f"T{ticker:06d}",
                "date": FIRST_DAY + timedelta(days=day),
                "open": round(base, 4),
                "high": round(base * 1.02, 4),
                "low": round(base * 0.98, 4),
                "close": round(base * (0.99 + rng.random() * 0.02), 4),
                "volume": rng.randrange(1_000, 50_000_000),
            }
        )
    return rows


def executemany_upsert(conn: Connection, rows: list[dict[str, Any]]) -> None:
    table = stock_prices
    keys = [c.name for c in table.primary_key.columns]
    insert = sqlite.insert(table) if conn.dialect.name == "sqlite" else postgresql.insert(table)
    stmt = insert.on_conflict_do_update(
        index_elements=keys,
        set_={c.name: insert.excluded[c.name] for c in table.columns if c.name not in keys},
    )
    conn.execute(stmt, rows)


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.writer", description=__doc__)
    parser.add_argument("--method", choices=["upsert", "to_sql", "executemany"], required=True)
    parser.add_argument("--url", required=True, help="SQLAlchemy URL of an empty database")
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--chunk", type=int, default=50_000)
    parser.add_argument("--max-seconds", type=float, default=None)
    args = parser.parse_args(argv)

    engine = Database.from_url(args.url).engine()  # the product's engine: pragmas, schema
    rss_before = peak_rss_mib()
    rates: list[float] = []
    seconds = 0.0
    written = 0
    for start in range(0, args.rows, args.chunk):
        if args.max_seconds is not None and seconds >= args.max_seconds:
            break
        rows = chunk_rows(start, min(args.chunk, args.rows - start))
        began = time.perf_counter()
        with engine.begin() as conn:
            if args.method == "upsert":
                upsert(conn, stock_prices.name, rows)
            elif args.method == "executemany":
                executemany_upsert(conn, rows)
            else:
                frame = pd.DataFrame.from_records(rows)
                frame.to_sql(
                    stock_prices.name,
                    conn,
                    if_exists="append",
                    index=False,
                    method="multi",
                    chunksize=1000,
                )
        took = time.perf_counter() - began
        seconds += took
        rates.append(len(rows) / took)
        written += len(rows)
        del rows
    with engine.connect() as conn:
        stored = int(conn.execute(select(func.count()).select_from(stock_prices)).scalar_one())
    engine.dispose()
    report = {
        "method": args.method,
        "dialect": engine.dialect.name,
        "rows": written,
        "asked": args.rows,
        "stored": stored,
        "seconds": seconds,
        "rows_per_second": written / seconds if seconds else 0.0,
        "chunk_rates": rates,
        "rss_before_mib": rss_before,
        "peak_rss_mib": peak_rss_mib(),
    }
    print(json.dumps(report))
    return 0 if stored == written else 1


if __name__ == "__main__":
    sys.exit(main())
