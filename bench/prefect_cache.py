"""The Prefect-only way of skipping done work: one cached task per ticker.

Each task fetches a ticker's prices and valuation and persists the result
(`persist_result=True`) under a cache key of the ticker; a rerun of the flow finds every
task cached and makes no request, but still pays Prefect's per-task cost for each item.

    python -m bench.prefect_cache --base-url URL --tickers-file F --namespace NS

Prints JSON: the flow's own seconds, items, and how many tasks were served from cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
from prefect import flow, task, unmapped
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

CONCURRENCY = 32
_client: httpx.Client | None = None


def _http(base_url: str) -> httpx.Client:
    global _client
    if _client is None:
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
        _client = httpx.Client(base_url=base_url, limits=limits, timeout=30)
    return _client


def item_key(_context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return f"bench-item-{parameters['namespace']}-{parameters['ticker']}"


@task(name="fetch-item", cache_key_fn=item_key, persist_result=True)
def fetch_item(namespace: str, ticker: str, base_url: str, day: str) -> list[dict[str, Any]]:
    client = _http(base_url)
    end = date.fromisoformat(day)
    window = {"from": (end - timedelta(days=5)).isoformat(), "to": day}
    prices = client.get("/stable/historical-price-eod/full", params={"symbol": ticker, **window})
    dcf = client.get("/stable/discounted-cash-flow", params={"symbol": ticker})
    prices.raise_for_status()
    dcf.raise_for_status()
    return [*prices.json(), *dcf.json()]


# Thread pool of CONCURRENCY workers (Prefect's default would start a thread per task).
RUNNER = cast("TaskRunner[PrefectFuture[Any]]", ThreadPoolTaskRunner(max_workers=CONCURRENCY))


@flow(name="bench-prefect-cache", task_runner=RUNNER)
def cached_sync(namespace: str, tickers: list[str], base_url: str, day: str) -> dict[str, int]:
    futures = fetch_item.map(unmapped(namespace), tickers, unmapped(base_url), unmapped(day))
    futures.wait()
    states = [f.state for f in futures]
    cached = sum(1 for s in states if s.name == "Cached")
    completed = sum(1 for s in states if s.is_completed())
    return {"items": len(tickers), "completed": completed, "cached": cached}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prefect_cache", description=__doc__)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--tickers-file", required=True, type=Path)
    parser.add_argument("--namespace", required=True, help="cache-key prefix of this bench run")
    parser.add_argument("--date", default=date.today().isoformat())
    args = parser.parse_args(argv)
    tickers = [t.strip() for t in args.tickers_file.read_text().splitlines() if t.strip()]
    started = time.monotonic()
    result = cached_sync(args.namespace, tickers, args.base_url, args.date)
    print(json.dumps({**result, "flow_seconds": time.monotonic() - started}))
    return 0 if result["completed"] == len(tickers) else 1


if __name__ == "__main__":
    sys.exit(main())
