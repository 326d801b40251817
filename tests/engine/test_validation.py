"""Hostile payloads against the parsers: each is refused in the fetch step, with its reason.

A fetched batch is cached, so whatever a parser lets through must be a row the database
takes; one that it would refuse (or a parser that raises anything but ItemError) would
poison the batch on every rerun. Each case below is a payload an API could really send,
and the exact reason an operator reads for it in `syncpoint status`. No Prefect, no HTTP:
the payloads are what httpx's `response.json()` hands the parsers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from syncpoint.core.db import Database, dispose_engines
from syncpoint.core.errors import ConfigError, ItemError
from syncpoint.core.store import upsert
from syncpoint.sources.documents import parse_document, parse_timestamp
from syncpoint.sources.market import parse_prices, parse_valuation
from syncpoint.sources.universe import allow_file, readable_tickers_file

START, END = date(2026, 11, 16), date(2026, 11, 20)


def bar(**fields: Any) -> dict[str, Any]:
    return {
        "symbol": "AAPL",
        "date": "2026-11-20",
        "open": 10.0,
        "high": 12.5,
        "low": 9.5,
        "close": 11.0,
        "volume": 1200,
        **fields,
    }


def prices(*bars: dict[str, Any]) -> Callable[[], object]:
    """parse_prices over `bars` as the API's JSON text decodes, for the run's window."""
    payload = json.loads(json.dumps(list(bars)))
    return lambda: parse_prices("AAPL", payload, start=START, end=END)


def prices_text(text: str) -> Callable[[], object]:
    """parse_prices over a raw JSON body (for what json.dumps cannot write: 400 digits)."""
    payload = json.loads(text)
    return lambda: parse_prices("AAPL", payload, start=START, end=END)


def valuation(**fields: Any) -> Callable[[], object]:
    raw = {"symbol": "AAPL", "date": "2026-11-20", "dcf": 150.25, "Stock Price": 140.0}
    return lambda: parse_valuation("AAPL", [{**raw, **fields}])


def document(**fields: Any) -> Callable[[], object]:
    raw = {"id": 4711, "aktualisiert": "2026-11-20T10:15:00+01:00", **fields}
    return lambda: parse_document("vorgang", raw)


BAR_TEXT = json.dumps([bar()])
HUGE = "9" * 400

HOSTILE = [
    # numbers a Float column cannot hold, or that turn into inf at the first sum
    pytest.param(
        prices_text(BAR_TEXT.replace('"open": 10.0', f'"open": {HUGE}')),
        "AAPL: open is out of range: a 400-digit integer (at most 1e+300 in size)",
        id="price-400-digit-int",
    ),
    pytest.param(
        prices(bar(high=1e305)),
        "AAPL: high is out of range: 1e+305 (at most 1e+300 in size)",
        id="price-1e305",
    ),
    pytest.param(
        prices_text(BAR_TEXT.replace('"low": 9.5', '"low": NaN')),
        "AAPL: low is nan",
        id="price-bare-NaN-token",
    ),
    pytest.param(
        prices_text(BAR_TEXT.replace('"close": 11.0', '"close": -Infinity')),
        "AAPL: close is -inf",
        id="price-minus-Infinity-token",
    ),
    pytest.param(
        prices(bar(close="NaN")), "AAPL: close is not a number ('NaN')", id="price-NaN-string"
    ),
    pytest.param(prices(bar(open=False)), "AAPL: open is not a number (False)", id="price-bool"),
    pytest.param(
        prices(bar(open={"value": 10})),
        "AAPL: open is not a number (a JSON object)",
        id="price-object",
    ),
    pytest.param(
        prices(bar(open=[10.0])), "AAPL: open is not a number (a JSON array)", id="price-array"
    ),
    # volumes a BigInteger column cannot hold, or that are not a count of shares
    pytest.param(
        prices(bar(volume=1e19)),
        "AAPL: volume is out of range on 2026-11-20: 1e+19 (at most 2**63-1)",
        id="volume-1e19",
    ),
    pytest.param(
        prices(bar(volume=2**63)),
        "AAPL: volume is out of range on 2026-11-20: 9223372036854775808 (at most 2**63-1)",
        id="volume-2**63",
    ),
    pytest.param(
        prices_text(BAR_TEXT.replace('"volume": 1200', f'"volume": {HUGE}')),
        "AAPL: volume is out of range on 2026-11-20: a 400-digit integer (at most 2**63-1)",
        id="volume-400-digit-int",
    ),
    pytest.param(
        prices(bar(volume=1200.5)),
        "AAPL: volume is not a whole number on 2026-11-20: 1200.5",
        id="volume-fractional",
    ),
    pytest.param(
        prices_text(BAR_TEXT.replace('"volume": 1200', '"volume": NaN')),
        "AAPL: volume is nan",
        id="volume-NaN-token",
    ),
    pytest.param(
        prices(bar(volume="1200")), "AAPL: volume is not a number ('1200')", id="volume-string"
    ),
    pytest.param(prices(bar(volume=True)), "AAPL: volume is not a number (True)", id="volume-bool"),
    pytest.param(
        prices(bar(volume=-1.0)), "AAPL: negative volume on 2026-11-20", id="volume-negative"
    ),
    # dates: only YYYY-MM-DD (a time of day may follow), inside the window asked for
    pytest.param(
        prices(bar(date="2026-11-20garbage")),
        "AAPL: bad date '2026-11-20garbage'",
        id="date-trailing-garbage",
    ),
    pytest.param(prices(bar(date=20261120)), "AAPL: bad date 20261120", id="date-an-integer"),
    pytest.param(
        prices(bar(date="20261120")), "AAPL: bad date '20261120'", id="date-basic-iso-format"
    ),
    pytest.param(
        prices(bar(date="2026-11-20T00:00:00+99:00")),
        "AAPL: bad date '2026-11-20T00:00:00+99:00'",
        id="date-with-offset",
    ),
    pytest.param(
        prices(bar(date="\u0662\u0660\u0662\u0666-11-20")),
        "AAPL: bad date '\u0662\u0660\u0662\u0666-11-20'",
        id="date-arabic-indic-digits",
    ),
    pytest.param(prices(bar(date="2026-02-30")), "AAPL: bad date '2026-02-30'", id="date-feb-30"),
    pytest.param(
        prices(bar(date=["2026-11-20"])), "AAPL: bad date a JSON array", id="date-an-array"
    ),
    pytest.param(
        prices(bar(), bar(date="2026-11-21")),
        "AAPL: a bar dated 2026-11-21 is outside the requested 2026-11-16..2026-11-20",
        id="date-after-the-window",
    ),
    pytest.param(
        prices(bar(date="1970-01-01")),
        "AAPL: a bar dated 1970-01-01 is outside the requested 2026-11-16..2026-11-20",
        id="date-long-before-the-window",
    ),
    # one answer, two different bars for a day: which is right cannot be told
    pytest.param(
        prices(bar(), bar(close=11.5)),
        "AAPL: two different bars for 2026-11-20",
        id="duplicate-date-different-close",
    ),
    pytest.param(
        prices(bar(), bar(date="2026-11-20 00:00:00", volume=1201)),
        "AAPL: two different bars for 2026-11-20",
        id="duplicate-date-spelled-differently",
    ),
    # shape
    pytest.param(
        prices_text('{"historical": ' + BAR_TEXT + "}"),
        "AAPL: expected a JSON list of objects, got dict",
        id="object-where-a-list-belongs",
    ),
    pytest.param(
        prices_text("[[" + BAR_TEXT + "]]"),
        "AAPL: expected a JSON list of objects, got list",
        id="list-of-lists",
    ),
    pytest.param(prices_text('"ok"'), "AAPL: expected a JSON list of objects, got str", id="str"),
    # valuations
    pytest.param(
        valuation(dcf=int(HUGE)),
        "AAPL: dcf is out of range: a 400-digit integer (at most 1e+300 in size)",
        id="dcf-400-digit-int",
    ),
    pytest.param(
        valuation(**{"Stock Price": "140"}),
        "AAPL: Stock Price is not a number ('140')",
        id="dcf-price-a-string",
    ),
    pytest.param(
        valuation(date="2026-11-20garbage"),
        "AAPL: bad date '2026-11-20garbage'",
        id="dcf-date-trailing-garbage",
    ),
    pytest.param(valuation(date=20261120), "AAPL: bad date 20261120", id="dcf-date-an-integer"),
    # documents
    pytest.param(
        document(aktualisiert=20261120),
        "vorgang/4711: aktualisiert '20261120' is not a timestamp",
        id="document-timestamp-an-integer",
    ),
    pytest.param(
        document(aktualisiert="2026-11-20T10:15:00garbage"),
        "vorgang/4711: aktualisiert '2026-11-20T10:15:00garbage' is not a timestamp",
        id="document-timestamp-trailing-garbage",
    ),
    pytest.param(
        document(aktualisiert="0001-01-01T00:00:00+01:00"),
        "vorgang/4711: aktualisiert '0001-01-01T00:00:00+01:00' is out of range",
        id="document-timestamp-before-year-1-in-utc",
    ),
    pytest.param(
        document(aktualisiert="2026-11-20T10:15:00" + " " * 100),
        "vorgang/4711: aktualisiert '2026-11-20T10:15:00                     ' is not a timestamp",
        id="document-timestamp-padded",
    ),
    pytest.param(
        document(extra={"value": float("nan")}),
        "vorgang/4711: the record holds NaN or Infinity, not valid JSON",
        id="document-NaN-in-payload",
    ),
    pytest.param(document(id=True), "record has no usable id: 'True'", id="document-id-a-bool"),
    pytest.param(
        document(id={"nested": 1}),
        "record has no usable id: \"{'nested': 1}\"",
        id="document-id-an-object",
    ),
    pytest.param(
        document(id="47\x0011"), "record has no usable id: '47\\x0011'", id="document-id-NUL"
    ),
    pytest.param(
        document(id=int(HUGE)),
        "record has no usable id: 'a 400-digit integer'",
        id="document-id-400-digit-int",
    ),
]


@pytest.mark.parametrize(("parse", "reason"), HOSTILE)
def test_a_hostile_payload_is_an_item_error_with_its_reason(
    parse: Callable[[], object], reason: str
) -> None:
    with pytest.raises(ItemError) as caught:
        parse()

    assert type(caught.value) is ItemError
    assert str(caught.value) == reason


def test_values_at_the_edges_of_the_columns_are_accepted() -> None:
    rows = parse_prices(
        "AAPL",
        [
            bar(date="2026-11-16", volume=2**63 - 1, high=9.99e299),
            bar(date="2026-11-17T00:00:00", volume=0, open=1e-300, low=1e-300),
            bar(date="2026-11-18", volume=1e18),
        ],
        start=START,
        end=END,
    )

    assert [r["date"] for r in rows] == [date(2026, 11, 16), date(2026, 11, 17), date(2026, 11, 18)]
    assert [r["volume"] for r in rows] == [2**63 - 1, 0, 10**18]
    assert all(type(r["volume"]) is int for r in rows)


def test_a_repeated_identical_bar_is_kept_once() -> None:
    rows = parse_prices("AAPL", [bar(), bar(), bar(date="2026-11-19")], start=START, end=END)

    assert [r["date"] for r in rows] == [date(2026, 11, 20), date(2026, 11, 19)]


def test_what_the_parsers_accept_the_database_stores(tmp_path: Path) -> None:
    """The point of validating in the fetch step: the accepted edge values really store."""
    engine = Database.from_url(f"sqlite:///{tmp_path / 'edge.db'}").engine()
    rows = parse_prices(
        "AAPL",
        [bar(date="2026-11-16", volume=2**63 - 1, high=9.99e299), bar(volume=0)],
        start=START,
        end=END,
    )
    valuation_row = parse_valuation(
        "AAPL", [{"date": "2026-11-20", "dcf": -1e299, "Stock Price": 1}]
    )
    document_row = parse_document(
        "vorgang", {"id": 1, "aktualisiert": "9999-12-31T00:00:00", "titel": "a\x00b", "n": 10**300}
    )
    try:
        with engine.begin() as conn:
            upsert(conn, "stock_prices", rows)
            upsert(conn, "dcf_valuations", [valuation_row])
            upsert(conn, "dip_documents", [document_row])
        with engine.connect() as conn:
            volumes = conn.execute(sa.text("SELECT volume FROM stock_prices ORDER BY date")).all()
            titel = conn.execute(sa.text("SELECT titel FROM dip_documents")).scalar_one()
    finally:
        dispose_engines()
    assert [v for (v,) in volumes] == [2**63 - 1, 0]
    assert titel is None  # a NUL would be refused by PostgreSQL's text column: left out


def test_a_document_keeps_a_readable_datum_and_drops_the_rest() -> None:
    def datum(value: object) -> object:
        return parse_document("person", {"id": "p1", "aktualisiert": "2026-11-20", "datum": value})[
            "datum"
        ]

    assert datum("2026-11-19") == date(2026, 11, 19)
    assert datum("2026-11-19T08:00:00+01:00") == date(2026, 11, 19)
    assert datum("2026-11-19garbage") is None
    assert datum(20261119) is None
    assert datum("20261119") is None
    assert parse_timestamp("2026-11-20T10:15:00Z", "x") == datetime(
        2026, 11, 20, 10, 15, tzinfo=UTC
    )


# --- which tickers file a flow run may read ------------------------------------------


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """An allowed folder with a tickers file, and a folder beside it with a secret."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "sp.txt").write_text("AAPL\n")
    (outside / ".env").write_text("DB_PASSWORD=hunter2\n")
    return allowed, outside


def test_a_file_inside_the_allowed_folder_is_readable(folders: tuple[Path, Path]) -> None:
    allowed, _ = folders
    assert readable_tickers_file("sp.txt", allowed) == (allowed / "sp.txt").resolve()
    assert readable_tickers_file(str(allowed / "sp.txt"), allowed) == (allowed / "sp.txt").resolve()
    assert readable_tickers_file("./x/../sp.txt", allowed) == (allowed / "sp.txt").resolve()


@pytest.mark.parametrize(
    "where",
    [
        pytest.param(lambda a, o: str(o / ".env"), id="absolute-outside"),
        pytest.param(lambda a, o: "../outside/.env", id="dot-dot"),
        pytest.param(lambda a, o: str(a / ".." / "outside" / ".env"), id="absolute-dot-dot"),
        pytest.param(lambda a, o: "link-to-env", id="symlink-to-a-file-outside"),
        pytest.param(lambda a, o: "link-to-outside/.env", id="symlinked-folder"),
        pytest.param(lambda a, o: "/etc/passwd", id="system-file"),
    ],
)
def test_a_path_that_leaves_the_allowed_folder_is_refused(
    folders: tuple[Path, Path], where: Callable[[Path, Path], str]
) -> None:
    allowed, outside = folders
    os.symlink(outside / ".env", allowed / "link-to-env")
    os.symlink(outside, allowed / "link-to-outside")
    path = where(allowed, outside)

    with pytest.raises(ConfigError) as caught:
        readable_tickers_file(path, allowed)

    assert str(caught.value) == (
        f"tickers_file {path!r} is refused: it is not inside SYNCPOINT_TICKERS_DIR ({allowed})"
    )


def test_without_an_allowed_folder_only_files_the_cli_was_given_are_readable(
    folders: tuple[Path, Path],
) -> None:
    allowed, _ = folders
    path = str(allowed / "sp.txt")
    with pytest.raises(ConfigError) as caught:
        readable_tickers_file(path, None)
    assert str(caught.value) == (
        f"tickers_file {path!r} is refused: a flow run reads tickers files only from "
        "SYNCPOINT_TICKERS_DIR, which is not set where it runs (the syncpoint command's "
        "--tickers-file reads any file you name)"
    )

    given = allow_file(allowed / "x" / ".." / "sp.txt")  # what `syncpoint run` does

    assert given == (allowed / "sp.txt").resolve()
    assert readable_tickers_file(str(given), None) == given
    # The CLI's file stays readable with a folder set elsewhere, and only that file.
    assert readable_tickers_file(str(given), allowed / "elsewhere") == given
    with pytest.raises(ConfigError):
        readable_tickers_file(str(allowed / "other.txt"), None)
