"""Fetching from the market API: one source object per dataset, payloads validated here.

Anything malformed in a payload is an ItemError: that ticker fails permanently with
the reason, the batch and the run go on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, ClassVar

from syncpoint.blocks.market_api import MarketApi
from syncpoint.core.errors import ItemError
from syncpoint.core.http import ApiClient

PRICES_PATH = "/stable/historical-price-eod/full"
DCF_PATH = "/stable/discounted-cash-flow"
SP500_PATH = "/stable/sp500-constituent"
STOCK_LIST_PATH = "/stable/stock-list"


@dataclass(frozen=True)
class PricesSource:
    """Daily OHLCV bars for [start, end] into stock_prices."""

    api: MarketApi
    start: date
    end: date
    table: ClassVar[str] = "stock_prices"

    @property
    def concurrency(self) -> int:
        return self.api.concurrency

    def cache_identity(self) -> str:
        return f"market-prices:{self.api.base_url}:{self.start}:{self.end}"

    def client(self) -> ApiClient:
        return self.api.client()

    async def fetch(self, client: ApiClient, ticker: str) -> list[dict[str, Any]]:
        payload = await client.get_json(
            PRICES_PATH,
            {"symbol": ticker, "from": self.start.isoformat(), "to": self.end.isoformat()},
        )
        return parse_prices(ticker, payload)


@dataclass(frozen=True)
class ValuationsSource:
    """The latest discounted-cash-flow valuation, one row per ticker, into dcf_valuations."""

    api: MarketApi
    table: ClassVar[str] = "dcf_valuations"

    @property
    def concurrency(self) -> int:
        return self.api.concurrency

    def cache_identity(self) -> str:
        return f"market-dcf:{self.api.base_url}"

    def client(self) -> ApiClient:
        return self.api.client()

    async def fetch(self, client: ApiClient, ticker: str) -> list[dict[str, Any]]:
        payload = await client.get_json(DCF_PATH, {"symbol": ticker})
        return [parse_valuation(ticker, payload)]


LISTS = {"sp500": SP500_PATH, "all": STOCK_LIST_PATH}


async def fetch_symbols(api: MarketApi, source: str) -> tuple[list[str], int]:
    """A ticker list the API publishes ("sp500" or "all") and the requests it took."""
    path = LISTS[source]
    async with api.client() as client:
        payload = await client.get_json(path)
    rows = _records(payload, path)
    return [str(_field(row, "symbol", path)) for row in rows], client.requests_sent


def parse_prices(ticker: str, payload: Any) -> list[dict[str, Any]]:
    records = _records(payload, ticker)
    if not records:
        # A known symbol with no bars at all in the window: say so rather than call it done.
        raise ItemError(f"{ticker}: the API has no prices in the requested window")
    rows = []
    for raw in records:
        day = _day(_field(raw, "date", ticker), ticker)
        bar = {k: _number(raw, k, ticker) for k in ("open", "high", "low", "close")}
        if any(v <= 0 for v in bar.values()):
            raise ItemError(f"{ticker}: non-positive price on {day}")
        if bar["high"] < bar["low"]:
            raise ItemError(f"{ticker}: high below low on {day}")
        volume = _number(raw, "volume", ticker)
        if volume < 0:
            raise ItemError(f"{ticker}: negative volume on {day}")
        rows.append({"ticker": ticker, "date": day, **bar, "volume": int(volume)})
    return rows


def parse_valuation(ticker: str, payload: Any) -> dict[str, Any]:
    records = _records(payload, ticker)
    if not records:
        raise ItemError(f"{ticker}: the API has no DCF valuation")
    raw = records[0]
    dcf = _number(raw, "dcf", ticker)
    price = _number(raw, "Stock Price", ticker)
    if price <= 0:
        raise ItemError(f"{ticker}: non-positive stock price {price}")
    return {
        "ticker": ticker,
        "date": _day(_field(raw, "date", ticker), ticker),
        "dcf": dcf,
        "stock_price": price,
        "updated_at": datetime.now(UTC),
    }


def _records(payload: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(payload, list) or not all(isinstance(r, dict) for r in payload):
        raise ItemError(f"{what}: expected a JSON list of objects, got {type(payload).__name__}")
    return payload


def _field(raw: dict[str, Any], name: str, what: str) -> Any:
    if raw.get(name) is None:
        raise ItemError(f"{what}: payload lacks {name!r}")
    return raw[name]


def _number(raw: dict[str, Any], name: str, what: str) -> float:
    value = _field(raw, name, what)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ItemError(f"{what}: {name} is not a number ({value!r:.40})")
    if not math.isfinite(value):
        raise ItemError(f"{what}: {name} is {value}")
    return float(value)


def _day(value: Any, what: str) -> date:
    try:
        return date.fromisoformat(str(value)[:10])
    except ValueError:
        raise ItemError(f"{what}: bad date {value!r:.40}") from None
