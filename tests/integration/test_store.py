"""Upserts on real SQLite and PostgreSQL: replays never duplicate, updates win, big batches
take PostgreSQL's COPY path with the same result."""

from __future__ import annotations

import math
from datetime import date, timedelta
from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError

from syncpoint.core.db import Database
from syncpoint.core.store import COPY_FROM_ROWS, cached_tickers, upsert
from tests.conftest import table_rows


def bars(tickers: list[str], days: int, bump: float = 0.0) -> list[dict[str, Any]]:
    start = date(2025, 1, 1)
    return [
        {
            "ticker": t,
            "date": start + timedelta(days=d),
            "open": 10.0 + d + bump,
            "high": 11.0 + d + bump,
            "low": 9.0 + d + bump,
            "close": 10.5 + d + bump,
            "volume": 1000 + d,
        }
        for t in tickers
        for d in range(days)
    ]


@pytest.mark.parametrize("rows_per_batch", [10, COPY_FROM_ROWS * 3], ids=["insert", "bulk"])
def test_upsert_replays_and_updates(database_url: str, rows_per_batch: int) -> None:
    tickers = [f"T{i}" for i in range(10)]
    days = rows_per_batch // len(tickers)
    engine = Database.from_url(database_url).engine()
    first = bars(tickers, days)
    with engine.begin() as conn:
        assert upsert(conn, "stock_prices", first) == len(first)
    with engine.begin() as conn:  # a replayed batch (crash between store and mark)
        upsert(conn, "stock_prices", first)
    assert len(table_rows(database_url, "stock_prices")) == len(first)

    changed = bars(tickers, days, bump=100.0)
    with engine.begin() as conn:  # two chunks of one batch in the same transaction
        upsert(conn, "stock_prices", changed[: len(changed) // 2])
        upsert(conn, "stock_prices", changed[len(changed) // 2 :])
    rows = table_rows(database_url, "stock_prices", "ticker, date, close, volume")
    assert len(rows) == len(first)
    offset = [(date.fromisoformat(str(r[1])) - date(2025, 1, 1)).days for r in rows]
    assert all(math.isclose(r[2], 110.5 + d) for r, d in zip(rows, offset, strict=True))


def test_duplicates_within_a_batch_keep_the_last(database_url: str) -> None:
    engine = Database.from_url(database_url).engine()
    rows = bars(["DUP"], 1) + bars(["DUP"], 1, bump=1.0)
    with engine.begin() as conn:
        assert upsert(conn, "stock_prices", rows) == 1
    ((close, _volume),) = table_rows(database_url, "stock_prices", "close, volume")
    assert close == 11.5


def test_cached_tickers_cover_the_range(database_url: str) -> None:
    engine = Database.from_url(database_url).engine()
    with engine.begin() as conn:
        upsert(conn, "stock_prices", bars(["FULL"], 60) + bars(["HALF"], 30))
    with engine.connect() as conn:
        got = cached_tickers(conn, ["FULL", "HALF", "NONE"], date(2025, 1, 1), date(2025, 3, 1))
    assert got == {"FULL"}


@pytest.mark.parametrize("rows_per_batch", [1, COPY_FROM_ROWS], ids=["insert", "bulk"])
@pytest.mark.parametrize("gap", ["nan", "missing"])
def test_a_missing_value_or_nan_is_null(database_url: str, rows_per_batch: int, gap: str) -> None:
    """A column a row lacks and a float NaN both reach the database as NULL on every
    path, so a NOT NULL column refuses them: a NaN is never stored as PostgreSQL's NaN."""
    engine = Database.from_url(database_url).engine()
    rows = bars(["GAP"], rows_per_batch)
    if gap == "nan":
        rows[-1]["open"] = math.nan
    else:
        del rows[-1]["volume"]
    with pytest.raises(IntegrityError, match=r"(?i)null"), engine.begin() as conn:
        upsert(conn, "stock_prices", rows)
    assert table_rows(database_url, "stock_prices") == []


def test_values_the_bind_processors_convert_are_stored_as_their_type_says(
    database_url: str,
) -> None:
    """A whole number or a Decimal in a Float column is stored as a float (a column of
    floats alone skips the conversion), and a day an earlier batch already wrote is
    written the same way again (the date texts are remembered across batches)."""
    from decimal import Decimal

    engine = Database.from_url(database_url).engine()
    first, second = bars(["ONE"], 3), bars(["TWO"], 3)
    second[0]["open"], second[1]["close"] = 12, Decimal("10.25")
    for batch in (first, second):
        with engine.begin() as conn:
            upsert(conn, "stock_prices", batch)
    rows = table_rows(database_url, "stock_prices", "ticker, date, open, close")
    by_key = {(t, str(d)): (o, c) for t, d, o, c in rows}
    assert by_key[("TWO", "2025-01-01")] == (12.0, 10.5)
    assert by_key[("TWO", "2025-01-02")] == (11.0, 10.25)
    assert {str(d) for _t, d, _o, _c in rows} == {"2025-01-01", "2025-01-02", "2025-01-03"}
    assert all(type(o) is float and type(c) is float for _t, _d, o, c in rows)
