"""Deterministic synthetic market data: symbols, company facts, daily bars and DCF values.

Every number is derived from SHA-256 of the symbol (and date), never from Python's
``hash()``, so two processes, two machines and two runs agree byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterator
from datetime import date, timedelta
from functools import cache
from typing import Any

SP500_SIZE = 500
DEFAULT_STOCK_LIST_SIZE = 6000

_SECTORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Information Technology", ("Semiconductors", "Application Software", "IT Consulting")),
    ("Health Care", ("Pharmaceuticals", "Health Care Equipment", "Biotechnology")),
    ("Financials", ("Diversified Banks", "Asset Management", "Property & Casualty Insurance")),
    ("Consumer Discretionary", ("Restaurants", "Automobile Manufacturers", "Apparel Retail")),
    ("Communication Services", ("Interactive Media & Services", "Movies & Entertainment")),
    ("Industrials", ("Aerospace & Defense", "Railroads", "Industrial Machinery")),
    ("Consumer Staples", ("Packaged Foods & Meats", "Household Products", "Soft Drinks")),
    ("Energy", ("Integrated Oil & Gas", "Oil & Gas Exploration & Production")),
    ("Utilities", ("Electric Utilities", "Multi-Utilities")),
    ("Real Estate", ("Industrial REITs", "Retail REITs", "Data Center REITs")),
    ("Materials", ("Specialty Chemicals", "Construction Materials", "Gold")),
)
_HEADQUARTERS = (
    "New York City, New York",
    "San Jose, California",
    "Seattle, Washington",
    "Chicago, Illinois",
    "Boston, Massachusetts",
    "Houston, Texas",
    "Dallas, Texas",
    "Atlanta, Georgia",
    "Denver, Colorado",
    "Minneapolis, Minnesota",
    "Charlotte, North Carolina",
    "Pittsburgh, Pennsylvania",
    "Columbus, Ohio",
    "Phoenix, Arizona",
    "Miami, Florida",
    "Dublin, Ireland",
)
_SYLLABLES = (
    "ar", "bel", "cor", "dex", "en", "fal", "gen", "hol", "ix", "jun", "kor", "lum",
    "mar", "nov", "or", "pax", "qu", "ron", "sol", "tek", "ul", "ver", "wex", "zan",
)  # fmt: skip
_SUFFIXES = ("Inc.", "Corp.", "Holdings Inc.", "Group", "Technologies Inc.", "plc", "Co.")
# Anchors the slow price cycles so the curve does not depend on when the server started.
_EPOCH = date(2020, 1, 1).toordinal()


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


_WORDS = struct.Struct(">8I")


def _units(digest: bytes) -> tuple[float, ...]:
    """The 8 uniforms in [0, 1) packed in a SHA-256 digest."""
    return tuple(w * 2.0**-32 for w in _WORDS.unpack(digest))


def _unit(digest: bytes, index: int) -> float:
    return _units(digest)[index]


def generate_symbols(count: int) -> list[str]:
    """``count`` distinct tickers of 2-5 uppercase letters, in generation order.

    Generation order (not alphabetical) makes every universe a prefix of a larger one, so
    the S&P 500 (the first 500) is the same set whatever the stock list size.
    """
    symbols: list[str] = []
    seen: set[str] = set()
    i = 0
    while len(symbols) < count:
        d = _digest(f"syncpoint-symbol:{i}")
        i += 1
        # Mostly 3-4 letters, like real listings; 2-letter space (676) is small anyway.
        length = (2, 3, 3, 4, 4, 4, 5, 5)[d[0] % 8]
        symbol = "".join(chr(65 + b % 26) for b in d[1 : 1 + length])
        if symbol not in seen:
            seen.add(symbol)
            symbols.append(symbol)
    return symbols


def company_name(symbol: str) -> str:
    d = _digest(f"name:{symbol}")
    stem = "".join(_SYLLABLES[b % len(_SYLLABLES)] for b in d[: 2 + d[2] % 2])
    return f"{stem.capitalize()} {_SUFFIXES[d[3] % len(_SUFFIXES)]}"


def constituent(symbol: str) -> dict[str, str]:
    d = _digest(f"constituent:{symbol}")
    sector, sub_sectors = _SECTORS[d[0] % len(_SECTORS)]
    added = date(1957, 3, 4) + timedelta(days=int(_unit(d, 1) * 24_000))
    founded = min(added.year, 1850 + int(_unit(d, 2) * 170))
    return {
        "symbol": symbol,
        "name": company_name(symbol),
        "sector": sector,
        "subSector": sub_sectors[d[1] % len(sub_sectors)],
        "headQuarter": _HEADQUARTERS[d[2] % len(_HEADQUARTERS)],
        "dateFirstAdded": added.isoformat(),
        "cik": f"{int(_unit(d, 3) * 2_000_000):010d}",
        "founded": str(founded),
    }


@cache
def _price_params(symbol: str) -> tuple[float, ...]:
    d = _digest(f"params:{symbol}")
    u = _units(d)
    log_base = math.log(10) + u[0] * math.log(40)  # base price 10..400, log-uniform
    drift = -0.10 + 0.35 * u[1]  # log-return per year
    # Angular frequencies of a slow (200-800 day) and a fast (20-60 day) cycle.
    slow_amp, slow_freq, slow_phase = 0.05 + 0.2 * u[2], 2 * math.pi / (200 + 600 * u[3]), u[4]
    fast_amp, fast_freq = 0.01 + 0.04 * u[5], 2 * math.pi / (20 + 40 * u[6])
    log_volume = math.log(1e5) + u[7] * math.log(500)  # 100k..50M shares
    return (
        log_base,
        drift,
        slow_amp,
        slow_freq,
        2 * math.pi * slow_phase,
        fast_amp,
        fast_freq,
        math.exp(log_volume),
    )


def daily_bar(symbol: str, day: date) -> dict[str, Any]:
    """One OHLCV bar; a pure function of (symbol, day) so any window can be served alone."""
    log_base, drift, slow_amp, slow_freq, slow_phase, fast_amp, fast_freq, volume_base = (
        _price_params(symbol)
    )
    t = day.toordinal()
    iso = day.isoformat()
    u0, u1, u2, u3, u4, _, _, _ = _units(_digest(f"{symbol}|{iso}"))
    log_close = (
        log_base
        + drift * (t - _EPOCH) / 365.25
        + slow_amp * math.sin(slow_freq * t + slow_phase)
        + fast_amp * math.sin(fast_freq * t)
        + 0.02 * (u0 - 0.5)
    )
    close = max(0.01, round(math.exp(log_close), 2))
    open_ = max(0.01, round(close * math.exp(0.02 * (u1 - 0.5)), 2))
    # Rounding is monotonic, so high/low computed from already-rounded prices stay outside them.
    high = round(max(open_, close) * (1 + 0.015 * u2), 2)
    low = max(0.01, round(min(open_, close) * (1 - 0.015 * u3), 2))
    return {
        "symbol": symbol,
        "date": iso,
        "open": open_,
        "high": high,
        "low": low,
        "close": close,
        "volume": int(volume_base * (0.5 + u4)) + 1,
    }


def weekdays_desc(start: date, end: date) -> Iterator[date]:
    """Mon-Fri dates in [start, end], newest first (holidays are not modelled)."""
    day = end
    one = timedelta(days=1)
    while day >= start:
        if day.weekday() < 5:
            yield day
        day -= one


def latest_weekday(on_or_before: date) -> date:
    return on_or_before - timedelta(days=max(0, on_or_before.weekday() - 4))


def dcf_entry(symbol: str, as_of: date) -> dict[str, Any]:
    day = latest_weekday(as_of)
    price = daily_bar(symbol, day)["close"]
    d = _digest(f"dcf:{symbol}|{day.isoformat()}")
    return {
        "symbol": symbol,
        "date": day.isoformat(),
        "dcf": round(price * (0.8 + 0.4 * _unit(d, 0)), 4),
        "Stock Price": price,
    }


class MarketData:
    """The symbol universe, precomputed once because benchmarks ask for it constantly."""

    def __init__(self, stock_list_size: int = DEFAULT_STOCK_LIST_SIZE) -> None:
        if stock_list_size < SP500_SIZE:
            raise ValueError(f"stock_list_size must be >= {SP500_SIZE}, got {stock_list_size}")
        generated = generate_symbols(stock_list_size)
        self.symbols: tuple[str, ...] = tuple(sorted(generated))
        self.sp500_symbols: tuple[str, ...] = tuple(sorted(generated[:SP500_SIZE]))
        self._known = frozenset(generated)
        self.stock_list: list[dict[str, Any]] = [
            {"symbol": s, "companyName": company_name(s)} for s in self.symbols
        ]
        self.sp500: list[dict[str, Any]] = [constituent(s) for s in self.sp500_symbols]
        self.stock_list_json = json.dumps(self.stock_list).encode()
        self.sp500_json = json.dumps(self.sp500).encode()

    def is_known(self, symbol: str) -> bool:
        return symbol in self._known

    def eod(self, symbol: str, start: date, end: date) -> list[dict[str, Any]]:
        return [daily_bar(symbol, day) for day in weekdays_desc(start, end)]
