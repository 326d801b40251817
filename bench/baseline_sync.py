"""The hand-written baseline: plain asyncio + httpx, no Prefect, no checkpoint.

One httpx.AsyncClient, a semaphore of `--concurrency`, prices then valuations for every
ticker, and one bulk insert at the end (sqlite3 executemany). A kill loses everything; a
rerun starts over. With `--rate-limit N` requests are spaced evenly at N per minute and a
429 waits for its Retry-After, as a careful hand-written client would do.

    python -m bench.baseline_sync --base-url URL --tickers-file F --database out.db
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

PRICES_PATH = "/stable/historical-price-eod/full"
DCF_PATH = "/stable/discounted-cash-flow"
RETRIABLE = frozenset({429, 500, 502, 503, 504})

SCHEMA = """
CREATE TABLE IF NOT EXISTS stock_prices (
    ticker VARCHAR(32) NOT NULL, date DATE NOT NULL, open FLOAT NOT NULL, high FLOAT NOT NULL,
    low FLOAT NOT NULL, close FLOAT NOT NULL, volume BIGINT NOT NULL,
    PRIMARY KEY (ticker, date));
CREATE TABLE IF NOT EXISTS dcf_valuations (
    ticker VARCHAR(32) NOT NULL PRIMARY KEY, date DATE NOT NULL, dcf FLOAT NOT NULL,
    stock_price FLOAT NOT NULL, updated_at DATETIME NOT NULL);
"""


class Pace:
    """Evenly spaced request slots: the usual hand-written limiter."""

    def __init__(self, per_minute: float | None) -> None:
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self.next = 0.0

    async def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        slot = max(now, self.next)
        self.next = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)


async def sync(
    base_url: str,
    tickers: list[str],
    day: date,
    days: int,
    concurrency: int,
    pace: Pace,
    with_valuations: bool = True,
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], dict[str, int]]:
    gate = asyncio.Semaphore(concurrency)
    statuses: dict[str, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:

        async def get(path: str, params: dict[str, str]) -> Any:
            async with gate:
                for attempt in range(5):
                    await pace.wait()
                    response = await client.get(path, params=params)
                    key = str(response.status_code)
                    statuses[key] = statuses.get(key, 0) + 1
                    if response.status_code not in RETRIABLE or attempt == 4:
                        response.raise_for_status()
                        return response.json()
                    retry_after = response.headers.get("Retry-After")
                    await asyncio.sleep(float(retry_after) if retry_after else 0.5 * 2**attempt)
            raise AssertionError("unreachable")

        window = {"from": (day - timedelta(days=days)).isoformat(), "to": day.isoformat()}
        price_payloads = await asyncio.gather(
            *(get(PRICES_PATH, {"symbol": t, **window}) for t in tickers)
        )
        dcf_payloads = (
            await asyncio.gather(*(get(DCF_PATH, {"symbol": t}) for t in tickers))
            if with_valuations
            else [[] for _ in tickers]
        )
    prices = [
        (t, r["date"], r["open"], r["high"], r["low"], r["close"], int(r["volume"]))
        for t, payload in zip(tickers, price_payloads, strict=True)
        for r in payload
    ]
    now = datetime.now(UTC).isoformat()
    valuations = [
        (t, p[0]["date"][:10], p[0]["dcf"], p[0]["Stock Price"], now)
        for t, p in zip(tickers, dcf_payloads, strict=True)
        if p
    ]
    return prices, valuations, statuses


def store(database: Path, prices: list[tuple[Any, ...]], valuations: list[tuple[Any, ...]]) -> None:
    """One bulk insert at the end: the only write of the run."""
    with sqlite3.connect(database) as conn:
        conn.executescript(SCHEMA)
        conn.executemany("INSERT OR REPLACE INTO stock_prices VALUES (?,?,?,?,?,?,?)", prices)
        conn.executemany("INSERT OR REPLACE INTO dcf_valuations VALUES (?,?,?,?,?)", valuations)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_sync", description=__doc__)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--tickers-file", required=True, type=Path)
    parser.add_argument("--database", required=True, type=Path)
    parser.add_argument("--date", default=date.today().isoformat())
    parser.add_argument("--days", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate-limit", type=float, default=None, help="requests per minute")
    parser.add_argument(
        "--prices-only", action="store_true", help="no valuations: a backfill of price history"
    )
    args = parser.parse_args(argv)
    tickers = [t.strip() for t in args.tickers_file.read_text().splitlines() if t.strip()]
    started = time.monotonic()
    prices, valuations, statuses = asyncio.run(
        sync(
            args.base_url,
            tickers,
            date.fromisoformat(args.date),
            args.days,
            args.concurrency,
            Pace(args.rate_limit),
            with_valuations=not args.prices_only,
        )
    )
    fetched = time.monotonic()
    store(args.database, prices, valuations)
    report = {
        "fetch_seconds": fetched - started,
        "store_seconds": time.monotonic() - fetched,
        "rows": len(prices) + len(valuations),
        "statuses": statuses,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
