"""The payload and input validators: what a good payload becomes, and why a bad one is refused.

A malformed market or document payload is an ItemError (that item fails permanently with
the reason, the run goes on); a malformed tickers file is a ConfigError (exit 2, one
line). The reasons are what an operator reads in `syncpoint status`, so the table below
pins each one exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from syncpoint.core.errors import ConfigError, ItemError
from syncpoint.sources.documents import parse_document, parse_timestamp
from syncpoint.sources.market import parse_prices, parse_valuation
from syncpoint.sources.universe import (
    Universe,
    check_symbol,
    read_tickers_file,
    tickers_from_file,
    validate,
)

DAY = "2026-11-20"


def bar(**fields: Any) -> dict[str, Any]:
    """One good daily bar, with `fields` changed (None removes nothing: it is a null)."""
    return {
        "symbol": "AAPL",
        "date": DAY,
        "open": 10.0,
        "high": 12.5,
        "low": 9.5,
        "close": 11.0,
        "volume": 1200,
        **fields,
    }


def dcf(**fields: Any) -> dict[str, Any]:
    return {"symbol": "AAPL", "date": DAY, "dcf": 150.25, "Stock Price": 140.0, **fields}


def written(tmp: Path, content: str | bytes, name: str = "tickers.txt") -> Path:
    path = tmp / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


# --- good payloads ------------------------------------------------------------------------


def test_prices_become_one_row_per_bar() -> None:
    payload = [
        bar(),
        bar(date="2026-11-19 00:00:00", open=9, high=10, low=9, close=9.5, volume=1e3, vwap=9.7),
    ]

    rows = parse_prices("AAPL", payload)

    assert rows == [
        {
            "ticker": "AAPL",
            "date": date(2026, 11, 20),
            "open": 10.0,
            "high": 12.5,
            "low": 9.5,
            "close": 11.0,
            "volume": 1200,
        },
        {
            "ticker": "AAPL",
            "date": date(2026, 11, 19),
            "open": 9.0,
            "high": 10.0,
            "low": 9.0,
            "close": 9.5,
            "volume": 1000,
        },
    ]
    assert all(type(r[k]) is float for r in rows for k in ("open", "high", "low", "close"))
    assert all(type(r["volume"]) is int for r in rows)


def test_a_valuation_becomes_one_row_stamped_now() -> None:
    before = datetime.now(UTC)

    row = parse_valuation("AAPL", [dcf(dcf=-3)])  # a negative DCF is a valuation, not an error

    stamped = row.pop("updated_at")
    assert row == {"ticker": "AAPL", "date": date(2026, 11, 20), "dcf": -3.0, "stock_price": 140.0}
    assert before <= stamped <= datetime.now(UTC)


def test_a_document_becomes_its_row() -> None:
    raw = {
        "id": 4711,
        "aktualisiert": "2026-11-20T10:15:00+01:00",
        "datum": "2026-11-19",
        "titel": "Antrag",
        "typ": "Vorgang",
    }

    row = parse_document("vorgang", raw)

    synced = row.pop("synced_at")
    assert row == {
        "entity": "vorgang",
        "id": "4711",
        "aktualisiert": datetime(2026, 11, 20, 10, 15, tzinfo=timezone(timedelta(hours=1))),
        "datum": date(2026, 11, 19),
        "titel": "Antrag",
        "payload": raw,
    }
    assert synced.tzinfo is UTC


def test_a_document_without_usable_date_or_title_still_is_one() -> None:
    row = parse_document(
        "person", {"id": "p1", "aktualisiert": "2026-11-20", "datum": "bald", "titel": 7}
    )

    assert (row["id"], row["datum"], row["titel"]) == ("p1", None, None)
    assert row["aktualisiert"] == datetime(2026, 11, 19, 23, tzinfo=UTC)  # Berlin midnight


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Without an offset DIP means Berlin time (CET in November).
        pytest.param(
            "2026-11-20T10:15:00", datetime(2026, 11, 20, 9, 15, tzinfo=UTC), id="naive-is-berlin"
        ),
        pytest.param(
            "2026-07-20T10:15:00", datetime(2026, 7, 20, 8, 15, tzinfo=UTC), id="naive-summer"
        ),
        pytest.param("2026-11-20T10:15:00Z", datetime(2026, 11, 20, 10, 15, tzinfo=UTC), id="zulu"),
        pytest.param(
            "2026-11-20T10:15:00+02:00",
            datetime(2026, 11, 20, 8, 15, tzinfo=UTC),
            id="offset-kept",
        ),
    ],
)
def test_timestamps_are_utc_instants(text: str, expected: datetime) -> None:
    parsed = parse_timestamp(text, "person/1")
    assert parsed == expected
    # UTC, so that SQLite (which stores no offset) keeps the instant, not a wall time.
    assert parsed.tzinfo is UTC


def test_validate_normalises_deduplicates_and_rejects() -> None:
    universe = validate(
        [" aapl ", "MSFT", "AAPL", "", "  ", "../x", "brk.b", "^GSPC", "BF-B", "A" * 2000]
    )

    assert universe == Universe(
        tickers=["AAPL", "MSFT", "BRK.B", "^GSPC", "BF-B"],
        rejected={
            "../X": "malformed symbol: only A-Z, 0-9 and one '.' or '-' class suffix are allowed",
            "A" * 40 + "...": "malformed symbol: 2000 characters (at most 16)",
        },
        duplicates=1,
    )


@pytest.mark.parametrize(
    "symbol", ["A", "AAPL", "BRK.B", "BF-B", "^GSPC", "0700.HK", "X" * 10 + ".ABCDE"]
)
def test_check_symbol_accepts_real_tickers(symbol: str) -> None:
    assert check_symbol(symbol) is None


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(
            "# S&P sample\nAAPL\n\n msft \nBRK.B\n",
            [(2, "AAPL"), (4, "msft"), (5, "BRK.B")],
            id="one-per-line",
        ),
        pytest.param(
            "symbol,name\nAAPL,Apple\nMSFT,Microsoft\n",
            [(2, "AAPL"), (3, "MSFT")],
            id="csv-symbol",
        ),
        pytest.param(
            "Name,Ticker\nApple, AAPL\nNobody,\nShort\n",
            [(2, "AAPL"), (3, ""), (4, "")],
            id="csv-ticker",
        ),
        pytest.param("\ufeffsymbol\nAAPL\n", [(2, "AAPL")], id="bom-and-header"),
        pytest.param("AAPL\r\nMSFT\rIBM\n", [(1, "AAPL"), (2, "MSFT"), (3, "IBM")], id="crlf-cr"),
        pytest.param(
            "AAPL\fMSFT\nIBM\n", [(1, "AAPL\fMSFT"), (2, "IBM")], id="form-feed-is-no-line-end"
        ),
    ],
)
def test_read_tickers_file(tmp_path: Path, content: str, expected: list[tuple[int, str]]) -> None:
    assert read_tickers_file(written(tmp_path, content)) == expected


def test_tickers_from_file_reports_rejected_lines_by_number_not_text(tmp_path: Path) -> None:
    universe = tickers_from_file(written(tmp_path, "aapl\nAAPL\n\n../etc\nDB_PASSWORD=hunter2\n"))

    assert (universe.tickers, universe.duplicates, universe.rejected) == (
        ["AAPL"],
        1,
        {"line 4": SUFFIX_RULE, "line 5": "malformed symbol: 19 characters (at most 16)"},
    )


# --- malformed input: one table -----------------------------------------------------------


@dataclass(frozen=True)
class Malformed:
    call: Callable[[Path], object]  # given a scratch folder
    error: type[Exception]
    message: str  # exact; "{dir}" stands for the scratch folder
    exact: bool = True  # False: the message starts with `message` (an OS error follows)


MALFORMED = [
    # parse_prices
    pytest.param(
        Malformed(
            lambda _: parse_prices("AAPL", {"Error Message": "x"}),
            ItemError,
            "AAPL: expected a JSON list of objects, got dict",
        ),
        id="prices-not-a-list",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_prices("AAPL", [bar(), "bar"]),
            ItemError,
            "AAPL: expected a JSON list of objects, got list",
        ),
        id="prices-list-of-non-objects",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_prices("AAPL", None),
            ItemError,
            "AAPL: expected a JSON list of objects, got NoneType",
        ),
        id="prices-null",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_prices("AAPL", []),
            ItemError,
            "AAPL: the API has no prices in the requested window",
        ),
        id="prices-empty",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_prices("AAPL", [{k: v for k, v in bar().items() if k != "date"}]),
            ItemError,
            "AAPL: payload lacks 'date'",
        ),
        id="prices-no-date",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_prices("AAPL", [bar(volume=None)]),
            ItemError,
            "AAPL: payload lacks 'volume'",
        ),
        id="prices-null-volume",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_prices("AAPL", [bar(date="20/11/2026")]),
            ItemError,
            "AAPL: bad date '20/11/2026'",
        ),
        id="prices-bad-date",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_prices("AAPL", [bar(open="10.0")]),
            ItemError,
            "AAPL: open is not a number ('10.0')",
        ),
        id="prices-price-a-string",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_prices("AAPL", [bar(close="9" * 100)]),
            ItemError,
            "AAPL: close is not a number ('" + "9" * 39 + ")",
        ),
        id="prices-long-garbage-cut-to-40",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_prices("AAPL", [bar(high=True)]),
            ItemError,
            "AAPL: high is not a number (True)",
        ),
        id="prices-price-a-bool",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_prices("AAPL", [bar(low=float("nan"))]), ItemError, "AAPL: low is nan"
        ),
        id="prices-nan",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_prices("AAPL", [bar(high=float("inf"))]), ItemError, "AAPL: high is inf"
        ),
        id="prices-inf",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_prices("AAPL", [bar(), bar(date="2026-11-21", open=0)]),
            ItemError,
            "AAPL: non-positive price on 2026-11-21",
        ),
        id="prices-zero-price",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_prices("AAPL", [bar(close=-1)]),
            ItemError,
            "AAPL: non-positive price on 2026-11-20",
        ),
        id="prices-negative-price",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_prices("AAPL", [bar(high=9, low=10)]),
            ItemError,
            "AAPL: high below low on 2026-11-20",
        ),
        id="prices-high-below-low",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_prices("AAPL", [bar(volume=-5)]),
            ItemError,
            "AAPL: negative volume on 2026-11-20",
        ),
        id="prices-negative-volume",
    ),
    # parse_valuation
    pytest.param(
        Malformed(
            lambda _: parse_valuation("AAPL", []), ItemError, "AAPL: the API has no DCF valuation"
        ),
        id="dcf-empty",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_valuation("AAPL", "<html>"),
            ItemError,
            "AAPL: expected a JSON list of objects, got str",
        ),
        id="dcf-not-json-list",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_valuation("AAPL", [dcf(dcf=None)]),
            ItemError,
            "AAPL: payload lacks 'dcf'",
        ),
        id="dcf-no-dcf",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_valuation("AAPL", [dcf(dcf=float("nan"))]),
            ItemError,
            "AAPL: dcf is nan",
        ),
        id="dcf-nan",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_valuation("AAPL", [dcf(**{"Stock Price": 0})]),
            ItemError,
            "AAPL: non-positive stock price 0.0",
        ),
        id="dcf-zero-stock-price",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_valuation("AAPL", [dcf(date="soon")]),
            ItemError,
            "AAPL: bad date 'soon'",
        ),
        id="dcf-bad-date",
    ),
    # parse_document / parse_timestamp
    pytest.param(
        Malformed(
            lambda _: parse_document("vorgang", ["id", 1]),
            ItemError,
            "record is not an object: list",
        ),
        id="document-not-an-object",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_document("vorgang", {"aktualisiert": "2026-11-20"}),
            ItemError,
            "record has no usable id: 'None'",
        ),
        id="document-no-id",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_document("vorgang", {"id": "  ", "aktualisiert": DAY}),
            ItemError,
            "record has no usable id: '  '",
        ),
        id="document-blank-id",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_document("vorgang", {"id": "x" * 65, "aktualisiert": DAY}),
            ItemError,
            f"record has no usable id: '{'x' * 40}'",
        ),
        id="document-id-too-long",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_document("vorgang", {"id": 17, "aktualisiert": "gestern"}),
            ItemError,
            "vorgang/17: aktualisiert 'gestern' is not a timestamp",
        ),
        id="document-bad-timestamp",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_document("vorgang", {"id": 17}),
            ItemError,
            "vorgang/17: aktualisiert 'None' is not a timestamp",
        ),
        id="document-no-timestamp",
    ),
    pytest.param(
        Malformed(
            lambda _: parse_timestamp("2026-13-01T00:00:00", "person/3"),
            ItemError,
            "person/3: aktualisiert '2026-13-01T00:00:00' is not a timestamp",
        ),
        id="timestamp-month-13",
    ),
    # tickers files
    pytest.param(
        Malformed(
            lambda d: read_tickers_file(d / "missing.txt"),
            ConfigError,
            "tickers file not found: {dir}/missing.txt",
        ),
        id="tickers-file-missing",
    ),
    pytest.param(
        Malformed(lambda d: read_tickers_file(d), ConfigError, "tickers file {dir} is not a file"),
        id="tickers-file-a-folder",
    ),
    pytest.param(
        Malformed(
            lambda d: read_tickers_file(written(d, "")),
            ConfigError,
            "tickers file {dir}/tickers.txt is empty",
        ),
        id="tickers-file-empty",
    ),
    pytest.param(
        Malformed(
            lambda d: read_tickers_file(written(d, "# only a comment\n\n   \n")),
            ConfigError,
            "tickers file {dir}/tickers.txt is empty",
        ),
        id="tickers-file-only-comments",
    ),
    pytest.param(
        Malformed(
            lambda d: read_tickers_file(written(d, "name,isin\nApple,US0378331005\n")),
            ConfigError,
            "tickers file {dir}/tickers.txt looks like CSV but has no 'symbol' or 'ticker' column",
        ),
        id="tickers-csv-without-symbol-column",
    ),
    pytest.param(
        Malformed(
            lambda d: read_tickers_file(written(d, b"AAPL\n\xff\xfeMSFT\n")),
            ConfigError,
            "cannot read tickers file {dir}/tickers.txt: 'utf-8' codec can't decode",
            exact=False,
        ),
        id="tickers-file-not-utf8",
    ),
    pytest.param(
        Malformed(
            lambda d: tickers_from_file(written(d, "../x\nA'; DROP TABLE t\n")),
            ConfigError,
            "tickers file {dir}/tickers.txt has no valid tickers",
        ),
        id="tickers-file-nothing-valid",
    ),
]


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_input_is_refused_with_its_reason(tmp_path: Path, case: Malformed) -> None:
    with pytest.raises(case.error) as caught:
        case.call(tmp_path)

    assert type(caught.value) is case.error
    expected = case.message.replace("{dir}", str(tmp_path))
    if case.exact:
        assert str(caught.value) == expected
    else:
        assert str(caught.value).startswith(expected)


SUFFIX_RULE = "malformed symbol: only A-Z, 0-9 and one '.' or '-' class suffix are allowed"


@pytest.mark.parametrize(
    ("symbol", "reason"),
    [
        pytest.param("../X", SUFFIX_RULE, id="path"),
        pytest.param("A'; DROP TABLE T", SUFFIX_RULE, id="sql"),
        pytest.param("A B", SUFFIX_RULE, id="space"),
        pytest.param("BRK.B.C", SUFFIX_RULE, id="two-suffixes"),
        pytest.param("aapl", SUFFIX_RULE, id="lower-case-unnormalised"),
        pytest.param("^", SUFFIX_RULE, id="caret-alone"),
        pytest.param("ABCDEFGHIJK", SUFFIX_RULE, id="11-character-root"),
        pytest.param("A" * 17, "malformed symbol: 17 characters (at most 16)", id="17-characters"),
        pytest.param("ÄPFEL", "malformed symbol: non-ASCII characters", id="non-ascii"),
        pytest.param("A\u200bB", "malformed symbol: non-ASCII characters", id="zero-width-space"),
    ],
)
def test_check_symbol_says_why_a_symbol_is_refused(symbol: str, reason: str) -> None:
    assert check_symbol(symbol) == reason
