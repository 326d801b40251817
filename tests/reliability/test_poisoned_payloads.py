"""Poisoned answers: one bad payload costs its ticker, never its batch, the run or the date.

A small FMP-style API of our own on loopback serves normal data for most tickers and one
poisoned answer per bad ticker: numbers no column holds (1e19 shares, a 400-digit
integer), NaN as a string and as a bare token, a fractional volume, a bar outside the
window asked for, two different bars for one day, JSON nested 5,000 deep, a ticker
whose rows pass every check but the database refuses (a constraint of the operator's),
and a poisoned valuation. The real `syncpoint` command syncs them all into SQLite and
PostgreSQL: the run ends on its own, with no traceback; every normal ticker is stored
exactly as served; each bad one is listed with a readable reason; the valuations stage
runs; and the rerun completes without a request (before, the poisoned batch was cached
and failed identically on every rerun).

Below that, the two containment layers on their own: a fetch that raises what nobody
foresaw, and a batch whose upsert the database refuses for one item's rows.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa

from syncpoint.blocks.market_api import MarketApi
from syncpoint.core.db import Database, dispose_engines
from syncpoint.core.errors import StorageError
from syncpoint.core.http import ApiClient, ClientThread
from syncpoint.core.interrupts import StopFlag
from syncpoint.core.ledger import ErrorKind, ItemOutcome, Ledger, PendingItem
from syncpoint.core.request_slots import RequestSlots
from syncpoint.core.store import ItemRows, write_items_then_checkpoint
from syncpoint.core.tables import sync_items
from syncpoint.simulator import MarketSimulator
from syncpoint.sources.market import PricesSource
from syncpoint.tasks.batches import Batch, BatchGate, Halt, Window, fetch_window
from tests.conftest import cli_env, run_cli, table_rows, tickers_file
from tests.reliability.hostile_server import (
    DCF,
    PRICES,
    LoopbackApi,
    Request,
    served_bar,
    served_bars,
    served_prices,
    stored_prices,
)
from tests.reliability.hostile_server import dcf_body as served_dcf
from tests.reliability.hostile_server import run_status as status

DAY = date(2026, 11, 20)  # a Friday
PRICE_DAYS = 5  # the nightly default: 2026-11-15 .. 2026-11-20
START = DAY - timedelta(days=PRICE_DAYS)
HUGE = "9" * 400

# Poisoned ticker -> the reason `syncpoint status` gives for it (stage prices unless "DCFX").
REFUSED_BY_PARSER = {
    "VOLX": f"VOLX: volume is out of range on {DAY}: 1e+19 (at most 2**63-1)",
    "BIGI": "BIGI: open is out of range: a 400-digit integer (at most 1e+300 in size)",
    "NANS": "NANS: close is not a number ('NaN')",
    "NANT": "NANT: close is nan",
    "FRAC": f"FRAC: volume is not a whole number on {DAY}: 1200.5",
    "OUTR": f"OUTR: a bar dated {DAY + timedelta(days=1)} is outside the requested {START}..{DAY}",
    "DUPE": f"DUPE: two different bars for {DAY}",
}
NESTED = "NEST"  # JSON nested 5,000 deep: the decoder's RecursionError, or a bounded refusal
REFUSED_BY_DATABASE = "TRIG"  # passes every check; a constraint in the database refuses it
BAD_VALUATION = "DCFX"  # good prices, a 400-digit DCF
BAD_PRICES = [*REFUSED_BY_PARSER, NESTED, REFUSED_BY_DATABASE]
# A good ticker beside each bad one: the ledger batches items in name order, so with
# batches of 5 every batch holds both kinds.
GOOD = [f"{t}G" for t in [*BAD_PRICES, BAD_VALUATION]]


def prices_body(symbol: str, start: date, end: date) -> str:
    bars = served_bars(symbol, start, end)
    first = bars[0]
    if symbol == "VOLX":
        first["volume"] = 1e19
    elif symbol == "NANS":
        first["close"] = "NaN"
    elif symbol == "NANT":
        first["close"] = float("nan")  # json.dumps writes the bare token NaN
    elif symbol == "FRAC":
        first["volume"] = 1200.5
    elif symbol == "OUTR":
        bars.insert(0, served_bar(symbol, end + timedelta(days=1)))
    elif symbol == "DUPE":
        bars.append({**first, "close": first["close"] + 1})
    elif symbol == NESTED:
        return "[" * 5000 + "]" * 5000
    body = json.dumps(bars)
    if symbol == "BIGI":  # more digits than any float: json.dumps cannot write it
        body = body.replace(f'"open": {first["open"]}', f'"open": {HUGE}', 1)
    return body


def dcf_body(symbol: str) -> str:
    return served_dcf(symbol, DAY, HUGE if symbol == BAD_VALUATION else "123.5")


class PoisonedApi(LoopbackApi):
    """The FMP-style endpoints daily-sync reads, on loopback; counts requests per
    (path, symbol)."""

    def __init__(self) -> None:
        super().__init__(self._answer)

    @staticmethod
    def _answer(request: Request) -> None:
        if request.path == PRICES:
            start = date.fromisoformat(request.query["from"])
            end = date.fromisoformat(request.query["to"])
            request.reply(200, prices_body(request.symbol, start, end))
        elif request.path == DCF:
            request.reply(200, dcf_body(request.symbol))
        else:
            request.reply(404, '{"Error Message": "unknown endpoint"}')


@pytest.fixture
def poisoned_api() -> Iterator[PoisonedApi]:
    with PoisonedApi() as api:
        yield api


def refuse_ticker_in_database(url: str, ticker: str) -> None:
    """The operator's own rule in the data database: rows of `ticker` are refused. The
    schema is created first, as the first run would."""
    Database.from_url(url).engine()
    dispose_engines()
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(
                sa.text(
                    "CREATE TRIGGER refuse_ticker BEFORE INSERT ON stock_prices "
                    f"WHEN NEW.ticker = '{ticker}' "
                    "BEGIN SELECT RAISE(ABORT, 'ticker is on the refused list'); END"
                )
            )
        else:
            conn.execute(
                sa.text(
                    "ALTER TABLE stock_prices ADD CONSTRAINT ticker_not_refused "
                    f"CHECK (ticker <> '{ticker}')"
                )
            )
    engine.dispose()


def test_poisoned_answers_fail_their_tickers_and_everything_else_syncs(
    database_url: str, poisoned_api: PoisonedApi, prefect_api: str, tmp_path: Path
) -> None:
    refuse_ticker_in_database(database_url, REFUSED_BY_DATABASE)
    universe = sorted([*GOOD, *BAD_PRICES, BAD_VALUATION])
    env = cli_env(
        prefect_api, MARKET_API_URL=poisoned_api.base_url, SYNCPOINT_DATABASE_URL=database_url
    )
    args = ["run", "daily-sync", "--date", DAY.isoformat(), "--batch-size", "5", "--tickers-file"]
    args.append(str(tickers_file(tmp_path, universe)))

    began = time.monotonic()
    first = run_cli(args, env, tmp_path, timeout=180)
    took = time.monotonic() - began

    output = first.stdout + first.stderr
    assert first.returncode == 0, output  # completed: every item done or failed for good
    assert "Traceback" not in output
    assert took < 120, f"the run took {took:.0f}s"
    run = status(env, tmp_path)
    assert run["status"] == "completed"
    failures = {f["item"]: f for f in run["failures"]}
    assert set(failures) == {*BAD_PRICES, BAD_VALUATION}
    assert all(f["error_kind"] == "permanent" for f in failures.values()), failures
    for ticker, reason in REFUSED_BY_PARSER.items():
        assert (failures[ticker]["stage"], failures[ticker]["error"]) == ("prices", reason)
    assert failures[BAD_VALUATION]["stage"] == "valuations"
    assert failures[BAD_VALUATION]["error"] == (
        "DCFX: dcf is out of range: a 400-digit integer (at most 1e+300 in size)"
    )
    refused = failures[REFUSED_BY_DATABASE]
    assert refused["stage"] == "prices"
    assert refused["error"].startswith("the database refused its rows: "), refused
    assert ("refused list" in refused["error"]) or ("ticker_not_refused" in refused["error"])
    nested = failures[NESTED]
    assert nested["stage"] == "prices"
    # A readable line: the decoder's own refusal, or ours if the HTTP layer bounds nesting.
    assert "\n" not in nested["error"], nested
    assert len(nested["error"]) < 300, nested
    assert "Recursion" in nested["error"] or "nest" in nested["error"].lower(), nested
    for ticker in BAD_PRICES:
        assert f"prices/{ticker}: permanent" in first.stdout

    # Every normal ticker's prices are stored exactly as served; no poisoned ticker has any.
    assert stored_prices(database_url) == served_prices([*GOOD, BAD_VALUATION], START, DAY)
    # The valuations stage ran, for every ticker, poisoned prices or not.
    valued = {r[0]: r for r in table_rows(database_url, "dcf_valuations", "ticker, dcf")}
    assert set(valued) == set(universe) - {BAD_VALUATION}
    assert {r[1] for r in valued.values()} == {123.5}
    logs = table_rows(database_url, "sync_logs", "task_name, status")
    assert ("daily-sync.prices", "success") in logs
    assert ("daily-sync.valuations", "success") in logs
    # Each ticker was asked for once per stage: nothing was fetched twice.
    assert set(poisoned_api.requests.values()) == {1}
    assert len(poisoned_api.requests) == 2 * len(universe)

    poisoned_api.requests.clear()
    second = run_cli(args, env, tmp_path, timeout=180)

    assert second.returncode == 0, second.stdout + second.stderr
    assert "Traceback" not in second.stdout + second.stderr
    assert "already complete" in second.stdout.lower(), second.stdout
    assert sum(poisoned_api.requests.values()) == 0


# --- the fetch step: what nobody foresaw costs one item ----------------------------------


@dataclass(frozen=True)
class BuggySource:
    """The real prices source with a bug for one ticker: an exception no layer classifies."""

    inner: PricesSource
    buggy: str
    identity: str
    table: ClassVar[str] = "stock_prices"

    @property
    def concurrency(self) -> int:
        return self.inner.concurrency

    def cache_identity(self) -> str:
        return self.identity

    def client(self) -> ApiClient:
        return self.inner.client()

    async def fetch(self, client: ApiClient, item: str) -> list[dict[str, Any]]:
        rows = await self.inner.fetch(client, item)
        if item == self.buggy:
            return [{**rows[0], "extra": {}["missing"]}]  # a KeyError, as a bug would raise
        return rows


def test_an_unforeseen_exception_fails_its_item_not_the_batch(sync_env: MarketSimulator) -> None:
    tickers = list(sync_env.data.symbols[:4])
    source = BuggySource(
        PricesSource(MarketApi(base_url=sync_env.base_url), DAY - timedelta(days=4), DAY),
        buggy=tickers[1],
        identity=f"buggy-{uuid.uuid4()}",
    )
    batch = Batch("run-1", "prices", 1, tuple(PendingItem(t, 0) for t in tickers))

    window = Window.of([batch])
    with ClientThread(source.client()) as clients:
        # A real task run.
        fetch_window(
            source, window, RequestSlots(4), clients, BatchGate(1, 1, clients), Halt(StopFlag())
        )
    fetched = window.handoffs[0].take()
    assert fetched is not None
    outcome = fetched.outcome

    assert outcome.outcomes == [
        ItemOutcome.done(tickers[0]),
        ItemOutcome.failed(
            tickers[1], ErrorKind.PERMANENT, "unexpected error: KeyError: 'missing'"
        ),
        ItemOutcome.done(tickers[2]),
        ItemOutcome.done(tickers[3]),
    ]
    assert {r["ticker"] for r in outcome.rows} == {tickers[0], tickers[2], tickers[3]}
    assert outcome.row_counts == [5, 0, 5, 5]  # 16th..20th: five weekdays each
    assert [len(u.rows) for u in outcome.units()] == [5, 0, 5, 5]


# --- the store step: rows the database refuses cost their item ------------------------


def rows_of(ticker: str, days: int, volume: int = 100) -> list[dict[str, Any]]:
    return [
        {
            "ticker": ticker,
            "date": DAY - timedelta(days=i),
            "open": 1.0,
            "high": 2.0,
            "low": 0.5,
            "close": 1.5,
            "volume": volume,
        }
        for i in range(days)
    ]


@dataclass
class Stores:
    data: Database
    checkpoints: Database
    ledger: Ledger
    run_id: str

    def mark(self, conn: sa.Connection, outcomes: Any) -> None:
        self.ledger.mark(conn, self.run_id, "prices", outcomes, 1)

    def items(self) -> dict[str, tuple[str, str | None, int, str | None]]:
        with self.ledger.engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    sync_items.c.item,
                    sync_items.c.status,
                    sync_items.c.error_kind,
                    sync_items.c.attempts,
                    sync_items.c.last_error,
                ).where(sync_items.c.run_id == self.run_id)
            ).all()
        return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}

    def stored(self) -> Counter[str]:
        rows = table_rows(self._url(self.data), "stock_prices", "ticker, date")
        return Counter(r[0] for r in rows)

    @staticmethod
    def _url(db: Database) -> str:
        return db.url.get_secret_value()


@pytest.fixture(params=["shared", "separate"])
def stores(request: pytest.FixtureRequest, database_url: str, tmp_path: Path) -> Iterator[Stores]:
    """Data in each kind of database; checkpoints beside it, or in a SQLite file apart."""
    data = Database.from_url(database_url)
    if request.param == "shared":
        checkpoints = data
    else:
        checkpoints = Database.from_url(f"sqlite:///{tmp_path / 'checkpoints.db'}")
    ledger = Ledger(checkpoints.engine())
    owner = f"test:{uuid.uuid4()}"
    run = ledger.open(
        "daily-sync", "2026-11-20", stages=["prices"], params={}, fresh=False, owner=owner
    )
    data.engine()
    yield Stores(data, checkpoints, ledger, run.run.run_id)
    ledger.release(owner)
    dispose_engines()


@pytest.mark.parametrize("days", [pytest.param(5, id="insert"), pytest.param(250, id="copy")])
def test_a_refused_row_fails_its_item_and_the_rest_of_the_batch_is_stored(
    stores: Stores, days: int
) -> None:
    """`copy`: a batch of 1,250 rows takes PostgreSQL's COPY path, whose driver errors are
    wrapped like the INSERT path's; on SQLite both are the same INSERT."""
    items = ["AAA", "BAD", "CCC", "GONE", "DDD"]
    stores.ledger.add_items(stores.run_id, "prices", items)
    units = [
        ItemRows(rows_of("AAA", days), [ItemOutcome.done("AAA")]),
        # Past BigInteger: sqlite3 raises OverflowError, PostgreSQL "out of range".
        ItemRows(rows_of("BAD", days, volume=2**63), [ItemOutcome.done("BAD")]),
        ItemRows(rows_of("CCC", days), [ItemOutcome.done("CCC")]),
        ItemRows([], [ItemOutcome.failed("GONE", ErrorKind.PERMANENT, "404")]),
        ItemRows(rows_of("DDD", days), [ItemOutcome.done("DDD")]),
    ]

    written, marked = write_items_then_checkpoint(
        stores.data, stores.checkpoints, "stock_prices", units, stores.mark
    )

    assert written == 3 * days
    assert stores.stored() == {"AAA": days, "CCC": days, "DDD": days}
    assert [o.item for o in marked] == items
    bad = marked[1]
    assert (bad.status.value, bad.error_kind) == ("failed", ErrorKind.PERMANENT)
    assert bad.error is not None
    assert bad.error.startswith("the database refused its rows: ")
    assert "\n" not in bad.error
    assert ("too large" in bad.error) or ("out of range" in bad.error), bad.error
    items_now = stores.items()
    assert items_now == {
        "AAA": ("done", None, 1, None),
        "BAD": ("failed", "permanent", 1, bad.error),
        "CCC": ("done", None, 1, None),
        "GONE": ("failed", "permanent", 1, "404"),
        "DDD": ("done", None, 1, None),
    }


def test_rows_that_cannot_be_told_apart_are_fetched_again_not_failed(stores: Stores) -> None:
    """A batch cached by a syncpoint that did not record whose rows are whose: refused,
    its items are marked transient (an attempt more: a new cache key), to be refetched."""
    stores.ledger.add_items(stores.run_id, "prices", ["AAA", "BAD", "GONE"])
    mixed = ItemRows(
        [*rows_of("AAA", 3), *rows_of("BAD", 3, volume=2**63)],
        [
            ItemOutcome.done("AAA"),
            ItemOutcome.done("BAD"),
            ItemOutcome.failed("GONE", ErrorKind.PERMANENT, "404"),
        ],
    )

    written, marked = write_items_then_checkpoint(
        stores.data, stores.checkpoints, "stock_prices", [mixed], stores.mark
    )

    assert written == 0
    assert stores.stored() == {}
    assert [(o.item, o.error_kind) for o in marked] == [
        ("AAA", ErrorKind.TRANSIENT),
        ("BAD", ErrorKind.TRANSIENT),
        ("GONE", ErrorKind.PERMANENT),
    ]
    assert all(
        status == "failed" and attempts == 1 for status, _, attempts, _ in stores.items().values()
    )
    assert stores.ledger.pending(stores.run_id, "prices") == [
        PendingItem("AAA", 1),
        PendingItem("BAD", 1),
    ]


def test_a_table_that_refuses_every_item_fails_the_batch_unmarked(stores: Stores) -> None:
    """Every item's rows refused alike: the table's doing (a constraint added, a column
    changed), not one item's data. The batch fails as a whole and stays unmarked, so the
    rerun stores what was fetched once the table is fixed, instead of failing every item."""
    stores.ledger.add_items(stores.run_id, "prices", ["AAA", "BBB", "GONE"])
    units = [
        ItemRows(rows_of("AAA", 3, volume=2**63), [ItemOutcome.done("AAA")]),
        ItemRows([], [ItemOutcome.failed("GONE", ErrorKind.PERMANENT, "404")]),
        ItemRows(rows_of("BBB", 3, volume=2**63), [ItemOutcome.done("BBB")]),
    ]

    with pytest.raises(StorageError) as caught:
        write_items_then_checkpoint(
            stores.data, stores.checkpoints, "stock_prices", units, stores.mark
        )

    assert "refused every row of the batch" in str(caught.value)
    assert stores.stored() == {}
    assert {item: row[0] for item, row in stores.items().items()} == dict.fromkeys(
        ["AAA", "BBB", "GONE"], "pending"
    )


def test_a_database_that_fails_as_a_whole_is_still_a_storage_error(stores: Stores) -> None:
    """Not a refusal of rows (here the table is gone): nothing is failed item by item,
    the batch stays unmarked for the rerun."""
    stores.ledger.add_items(stores.run_id, "prices", ["AAA"])
    with stores.data.engine().begin() as conn:
        conn.execute(sa.text("ALTER TABLE stock_prices RENAME TO stock_prices_moved"))

    with pytest.raises(StorageError):
        write_items_then_checkpoint(
            stores.data,
            stores.checkpoints,
            "stock_prices",
            [ItemRows(rows_of("AAA", 2), [ItemOutcome.done("AAA")])],
            stores.mark,
        )

    assert stores.items() == {"AAA": ("pending", None, 0, None)}
