"""Fetching from the market API: one source object per dataset, payloads validated here.

Anything malformed in a payload is an ItemError: that ticker fails permanently with
the reason, the batch and the run go on. Validation happens here, in the fetch step,
because the fetch task's result is cached: a row that passes these checks must be one
the database will take, or a poisoned answer would fail the same way on every rerun.
"""

from __future__ import annotations

import math
import re
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

# Any finite double fits a Float column, but a value near the top of the range turns into
# inf under the first sum or difference a reader computes; no price comes anywhere near.
FLOAT_LIMIT = 1e300
# BigInteger is a signed 64-bit integer in SQLite and PostgreSQL alike.
BIGINT_LIMIT = 2**63
# A day, optionally with a time of day (FMP sends both); nothing before or after it.
_DATE = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})(?:[T ][0-9]{2}:[0-9]{2}:[0-9]{2})?")


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
        return parse_prices(ticker, payload, start=self.start, end=self.end)


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


def parse_prices(
    ticker: str, payload: Any, *, start: date | None = None, end: date | None = None
) -> list[dict[str, Any]]:
    """One row per bar; ItemError for anything stock_prices would not take as it is.

    A bar dated outside [start, end] is an error, not dropped: an answer that ignores
    the window asked for is not trusted for the days inside it either. Two bars for one
    day are kept once if they agree and refused if they differ: which one is right
    cannot be told from here.
    """
    records = _records(payload, ticker)
    if not records:
        # A known symbol with no bars at all in the window: say so rather than call it done.
        raise ItemError(f"{ticker}: the API has no prices in the requested window")
    first, last = start or date.min, end or date.max
    rows: dict[date, dict[str, Any]] = {}
    for raw in records:
        text = raw.get("date")
        day = _DAYS.get(text) if isinstance(text, str) else None
        if day is None:
            day = _day(_field(raw, "date", ticker), ticker)
            _remember_day(str(text), day)  # a str: _day refuses anything else
        if not first <= day <= last:
            raise ItemError(f"{ticker}: a bar dated {day} is outside the requested {start}..{end}")
        get = raw.get
        o, h, lo, c, v = get("open"), get("high"), get("low"), get("close"), get("volume")
        # The common bar in one test (a backfill has millions): four floats in range, low
        # <= high, a volume that is a plain int in range. NaN fails every comparison, so
        # anything unusual takes the way below, which says what is wrong with it.
        if not (
            type(o) is float
            and type(h) is float
            and type(lo) is float
            and type(c) is float
            and type(v) is int
            and 0.0 < lo <= h < FLOAT_LIMIT
            and 0.0 < o < FLOAT_LIMIT
            and 0.0 < c < FLOAT_LIMIT
            and 0 <= v < BIGINT_LIMIT
        ):
            o, h, lo, c, v = _checked_bar(raw, ticker, day)
        row = {
            "ticker": ticker,
            "date": day,
            "open": o,
            "high": h,
            "low": lo,
            "close": c,
            "volume": v,
        }
        kept = rows.setdefault(day, row)
        if kept is not row and kept != row:
            raise ItemError(f"{ticker}: two different bars for {day}")
    return list(rows.values())


# The days bars are dated with, by their text, shared by every answer: a backfill's
# answers repeat the same few thousand days, so each is parsed once, and the rows of a
# batch hold one date object per day, which the fetch cache's pickler writes once (a
# third of the time of a date object per row). Bounded: emptied when full.
_DAYS: dict[str, date] = {}
_DAYS_AT_MOST = 100_000


def _remember_day(text: str, day: date) -> None:
    if len(_DAYS) >= _DAYS_AT_MOST:
        _DAYS.clear()
    _DAYS[text] = day


def _checked_bar(
    raw: dict[str, Any], ticker: str, day: date
) -> tuple[float, float, float, float, int]:
    """A bar's prices and volume the long way: each checked on its own, and the first
    thing wrong with them raised as the item's reason."""
    o, h, lo, c = (_number(raw, k, ticker) for k in ("open", "high", "low", "close"))
    if min(o, h, lo, c) <= 0:
        raise ItemError(f"{ticker}: non-positive price on {day}")
    if h < lo:
        raise ItemError(f"{ticker}: high below low on {day}")
    return o, h, lo, c, _volume(raw, ticker, day)


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
    """A finite float a Float column stores and arithmetic on it keeps finite."""
    value = _field(raw, name, what)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ItemError(f"{what}: {name} is not a number ({_shown(value)})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ItemError(f"{what}: {name} is {value}")
    # Compared before float(): an int compares with a float exactly, while float() of
    # one past the double range raises OverflowError.
    if not -FLOAT_LIMIT < value < FLOAT_LIMIT:
        raise ItemError(
            f"{what}: {name} is out of range: {_shown(value)} (at most {FLOAT_LIMIT:g} in size)"
        )
    return float(value)


def _volume(raw: dict[str, Any], what: str, day: date) -> int:
    """A whole number of shares a BigInteger column stores: 0 <= volume < 2**63.

    A fractional volume is refused rather than truncated: the API meant something else.
    """
    value = _field(raw, "volume", what)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ItemError(f"{what}: volume is not a number ({_shown(value)})")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ItemError(f"{what}: volume is {value}")
        if not value.is_integer():
            raise ItemError(f"{what}: volume is not a whole number on {day}: {_shown(value)}")
    if value < 0:
        raise ItemError(f"{what}: negative volume on {day}")
    if value >= BIGINT_LIMIT:
        raise ItemError(
            f"{what}: volume is out of range on {day}: {_shown(value)} (at most 2**63-1)"
        )
    return int(value)


def _day(value: Any, what: str) -> date:
    """A calendar day from a `YYYY-MM-DD` string (a time of day may follow); an integer
    or a date with anything else around it is not one."""
    match = _DATE.fullmatch(value) if isinstance(value, str) else None
    try:
        if match is not None:
            return date.fromisoformat(match.group(1))
    except ValueError:
        pass
    raise ItemError(f"{what}: bad date {_shown(value)}")


def _shown(value: Any) -> str:
    """A payload value as a reason quotes it: short, never a huge number in full."""
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        if -(10**21) < value < 10**21:
            return str(value)
        # str() of an int costs time quadratic in its length (and refuses past 4300
        # digits): count the digits from its bit length beyond that.
        bits = abs(value).bit_length()
        digits = len(str(abs(value))) if bits < 10_000 else int(bits * math.log10(2)) + 1
        return f"a {digits}-digit integer"
    if isinstance(value, str):
        return repr(value[:40])[:40]
    if isinstance(value, dict | list):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    return type(value).__name__
