"""Storing: rows -> distinct tuples -> one upsert statement per batch.

Upserts on natural keys make a replayed batch harmless: at-least-once delivery,
exactly-once effect.

A batch whose rows the database refuses for what they hold (a value out of range, a
constraint), rather than for being unreachable, is stored again item by item: the items
whose rows are refused fail with the driver's reason and the rest are stored. One bad
row never costs its batch, and never leaves a fetched batch that fails the same way on
every rerun. A table that refuses every item's rows is the table's problem, not the
data's: that batch fails as a whole, as before.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from itertools import chain
from operator import itemgetter, ne
from typing import Any

from sqlalchemy import JSON, Column, Connection, Date, Dialect, Float, Table, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    StatementError,
)

from syncpoint.core.db import Database, storage_errors
from syncpoint.core.errors import StorageError
from syncpoint.core.gc_pace import fewer_collections
from syncpoint.core.ledger import ErrorKind, ItemOutcome
from syncpoint.core.redact import redact
from syncpoint.core.tables import dcf_valuations, dip_documents, stock_prices

# Which tables a batch may write, by the name a source declares.
TABLES: dict[str, Table] = {t.name: t for t in (stock_prices, dcf_valuations, dip_documents)}

# From this many rows a PostgreSQL upsert goes through COPY (see _copy_upsert).
COPY_FROM_ROWS = 1000


def distinct_rows(table: Table, rows: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Rows as tuples in the table's column order, one per key (the last one wins).

    A column a row lacks, and a float NaN, are None: what every DBAPI binds as NULL.
    Plain Python on purpose, and each step one call into C per row: a backfill batch is
    thousands of rows a few microseconds apart, and a DataFrame round trip cost more than
    the statement that stores them.
    """
    columns = [c.name for c in table.columns]
    whole = itemgetter(*columns)
    key = itemgetter(*(columns.index(c.name) for c in table.primary_key.columns))
    floats = [i for i, c in enumerate(table.columns) if isinstance(c.type, Float)]
    keyed: dict[Any, tuple[Any, ...]] = {}
    for row in rows:
        try:
            values = whole(row)
        except KeyError:  # a column this row lacks: None
            values = tuple(map(row.get, columns))
        keyed[key(values)] = values
    distinct = list(keyed.values())
    if floats and any(_has_nan(_column(distinct, i)) for i in floats):
        # NaN, the one value unequal to itself: rare enough to mend row by row.
        distinct = [
            tuple(None if i in floats and v != v else v for i, v in enumerate(values))
            for values in distinct
        ]
    return distinct


def _column(rows: list[tuple[Any, ...]], i: int) -> Iterator[Any]:
    return map(itemgetter(i), rows)


def _has_nan(values: Iterator[Any]) -> bool:
    """Whether any value is unequal to itself (a NaN), compared in C: ne(v, v) per value."""
    column = list(values)
    return any(map(ne, column, column))


# Tens of thousands of row tuples a call: see syncpoint.core.gc_pace.
@fewer_collections()
def upsert(conn: Connection, table_name: str, rows: Sequence[dict[str, Any]]) -> int:
    """Insert or update `rows` into `table_name` on its primary key; returns rows written."""
    if not rows:
        return 0
    table = TABLES[table_name]
    values = distinct_rows(table, rows)
    columns = tuple(c.name for c in table.columns)
    keys = [c.name for c in table.primary_key.columns]
    dialect = conn.dialect.name
    if dialect == "sqlite":
        _sqlite_upsert(conn, table, columns, values)
    elif dialect == "postgresql" and len(values) >= COPY_FROM_ROWS and _copyable(table):
        _copy_upsert(conn, table, list(columns), keys, values)
    elif dialect == "postgresql":
        pg = postgresql.insert(table)
        stmt = pg.on_conflict_do_update(
            index_elements=keys,
            set_={c: pg.excluded[c] for c in columns if c not in keys},
        )
        conn.execute(stmt, [dict(zip(columns, v, strict=True)) for v in values])
    else:  # pragma: no cover - Database.from_url refuses other backends
        raise ValueError(f"no upsert for {dialect}")
    return len(values)


def _sqlite_upsert(
    conn: Connection, table: Table, columns: tuple[str, ...], values: list[tuple[Any, ...]]
) -> None:
    """INSERT ... ON CONFLICT DO UPDATE, many rows a statement (see _sqlite_rows_sql).

    Each column that has one goes through its type's own bind processor (a date becomes
    SQLAlchemy's text form, as everywhere else) and the rows go to the driver as tuples:
    SQLAlchemy's per-row parameter handling cost more than running the statement (a
    five-year backfill stores 6,300 rows a batch).

    Not one row a statement through executemany: the driver lets go of the GIL around
    every statement it steps, and while the stage's HTTP loop keeps another thread busy
    in Python, taking it back waits up to a switch interval (5 ms) each time. A 50-row
    batch took 60 ms of wall time that way for well under 1 ms of work, and the stage
    took no new batch meanwhile. As one statement it waits once.
    """
    sql, plan = _sqlite_statement(table, columns, conn.dialect)
    if any(plan):
        by_column: list[Sequence[Any]] = list(zip(*values, strict=True))
        changed = False
        for i, process in enumerate(plan):
            if process is not None:
                processed = _processed(by_column[i], process, table.columns[columns[i]])
                if processed is not None:
                    by_column[i], changed = processed, True
        if changed:
            values = list(zip(*by_column, strict=True))
    width = len(columns)
    per = _sqlite_rows_per_statement(width)
    whole = len(values) - len(values) % per
    if whole:
        conn.exec_driver_sql(
            _sqlite_rows_sql(sql, width, per),
            [tuple(chain.from_iterable(values[i : i + per])) for i in range(0, whole, per)],
        )
    if whole < len(values):
        # The rest in one statement of its own size: a stage's batches are mostly of one
        # size, so its text is mostly one the driver has prepared before.
        rest = values[whole:]
        conn.exec_driver_sql(
            _sqlite_rows_sql(sql, width, len(rest)), tuple(chain.from_iterable(rest))
        )


# Parameters one SQLite statement may have: 32,766 from SQLite 3.32, 999 before.
_SQLITE_PARAMETERS_AT_MOST = 32_766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999
# Rows a statement at most: enough that a backfill batch is a few statements, few
# enough that a statement's text (and its compiled program) stays small.
_SQLITE_ROWS_AT_MOST = 512


def _sqlite_rows_per_statement(width: int) -> int:
    """Rows of `width` columns in one statement: up to _SQLITE_ROWS_AT_MOST, within
    SQLite's limit on parameters."""
    return max(1, min(_SQLITE_ROWS_AT_MOST, _SQLITE_PARAMETERS_AT_MOST // width))


@functools.lru_cache(maxsize=256)
def _sqlite_rows_sql(sql: str, width: int, rows: int) -> str:
    """The one-row statement `sql` with `rows` rows in its VALUES list."""
    one = "(" + ", ".join(["?"] * width) + ")"
    if sql.count(one) != 1:
        raise RuntimeError(f"no single VALUES row of {width} parameters in {sql!r}")
    return sql.replace(one, ", ".join([one] * rows))


_NONE = type(None)


def _processed(
    column: Sequence[Any], process: Callable[[Any], Any], of: Column[Any]
) -> list[Any] | None:
    """A column through its bind processor, or None where that changes nothing: a Float
    column that holds only floats (its processor is float()). A date column goes through
    it once per day (SQLAlchemy formats a date in Python), remembered across batches: a
    backfill's batches hold the same few thousand days."""
    if isinstance(of.type, Float) and set(map(type, column)) <= {float, _NONE}:
        return None
    if isinstance(of.type, Date):
        texts = _DATE_TEXTS.setdefault(process, {})
        if len(texts) > _DATE_TEXTS_AT_MOST:
            texts.clear()
        for day in set(column).difference(texts):
            texts[day] = process(day)
        return list(map(texts.__getitem__, column))
    return list(map(process, column))


# Dates as each bind processor writes them, by processor (a DATE with its own storage
# format has its own), each bounded.
_DATE_TEXTS: dict[Callable[[Any], Any], dict[Any, Any]] = {}
_DATE_TEXTS_AT_MOST = 100_000


_SqliteStatement = tuple[str, tuple[Callable[[Any], Any] | None, ...]]
_sqlite_statements: dict[tuple[str, tuple[str, ...]], _SqliteStatement] = {}


def _sqlite_statement(table: Table, columns: tuple[str, ...], dialect: Dialect) -> _SqliteStatement:
    """The statement's text and, in its parameters' order, each one's bind processor."""
    key = (table.name, columns)
    found = _sqlite_statements.get(key)
    if found is not None:
        return found
    keys = [c.name for c in table.primary_key.columns]
    lite = sqlite.insert(table)
    stmt = lite.on_conflict_do_update(
        index_elements=keys,
        set_={c: lite.excluded[c] for c in columns if c not in keys},
    )
    compiled = stmt.compile(dialect=dialect, column_keys=list(columns))
    # The VALUES list follows the columns given; the tuples are built in that order.
    if list(compiled.positiontup or []) != list(columns):
        raise RuntimeError(f"{table.name}: parameters out of column order")
    processors = tuple(
        table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in columns
    )
    found = _sqlite_statements[key] = (str(compiled), processors)
    return found


def write_then_checkpoint(
    data: Database,
    checkpoints: Database,
    table: str,
    rows: list[dict[str, Any]],
    checkpoint: Callable[[Connection], None],
) -> int:
    """Upsert `rows`, then record progress with `checkpoint`: one transaction when data
    and checkpoints share a database, else data first, so progress never runs ahead."""
    if data.same_as(checkpoints):
        with storage_errors(data.describe()), data.engine().begin() as conn:
            written = upsert(conn, table, rows)
            checkpoint(conn)
        return written
    with storage_errors(data.describe()), data.engine().begin() as conn:
        written = upsert(conn, table, rows)
    with storage_errors(checkpoints.describe()), checkpoints.engine().begin() as conn:
        checkpoint(conn)
    return written


@dataclass(frozen=True)
class ItemRows:
    """Rows to store and the outcomes they settle: one item's, normally; several items'
    when it is not known which rows are whose (a batch fetched by an older syncpoint)."""

    rows: Sequence[dict[str, Any]]
    outcomes: Sequence[ItemOutcome]


Mark = Callable[[Connection, Sequence[ItemOutcome]], None]


def write_items_then_checkpoint(
    data: Database,
    checkpoints: Database,
    table: str,
    units: Sequence[ItemRows],
    mark: Mark,
) -> tuple[int, list[ItemOutcome]]:
    """Upsert every unit's rows, then `mark` every outcome, in write_then_checkpoint's
    order; the rows written and the outcomes as marked.

    If the data database refuses the rows for what they hold (refuses_rows), nothing of
    the batch is kept and it is stored unit by unit, each unit's rows and marks in their
    own transaction. A unit whose rows are refused is marked failed with the driver's
    reason: for good if it is one item's, transiently (fetched again, alone) if it mixes
    several items'. Every outcome gets its mark either way, and marks bump attempts,
    which the fetch cache key holds: a refused batch is never served from the cache again.

    Unless the database refuses every unit (two or more) alike: then the table refuses
    the batch, not one item's data (a constraint or a column changed under the run), and
    the batch fails as a whole, unmarked, as any refused write did before: once the table
    is fixed, the rerun stores the batch fetched now instead of fetching it again.
    """
    outcomes = [o for unit in units for o in unit.outcomes]
    try:
        rows = [row for unit in units for row in unit.rows]
        return _write_unit(data, checkpoints, table, rows, outcomes, mark), outcomes
    except _Refused:
        pass
    written = 0
    marked: dict[str, ItemOutcome] = {}
    later: list[ItemOutcome] = []  # nothing of theirs to store: marked together at the end
    refusals: list[BaseException] = []
    for unit in units:
        if not unit.rows:
            later.extend(unit.outcomes)
            continue
        try:
            written += _write_unit(data, checkpoints, table, unit.rows, unit.outcomes, mark)
            marked.update((o.item, o) for o in unit.outcomes)
        except _Refused as refused:
            refusals.append(refused.cause)
            later.extend(_refused(unit, refused.cause))
    if len(refusals) > 1 and not marked:
        raise StorageError(
            f"database {data.describe()} refused every row of the batch "
            f"({_reason(refusals[0])}). The batch was not stored; fix the cause and rerun "
            "to continue."
        )
    if later:
        with storage_errors(checkpoints.describe()), checkpoints.engine().begin() as conn:
            mark(conn, later)
        marked.update((o.item, o) for o in later)
    return written, [marked[o.item] for o in outcomes]


def refuses_rows(exc: BaseException) -> bool:
    """True if `exc` is the database refusing particular rows (a value out of range, a
    constraint, a value the driver cannot bind), not one that is down or broken: storing
    the rows one item at a time then saves every other item's."""
    if isinstance(exc, OperationalError | InterfaceError) or getattr(
        exc, "connection_invalidated", False
    ):
        return False
    if isinstance(exc, DataError | IntegrityError | OverflowError):
        return True  # OverflowError: sqlite3 binding an int past 64 bits, unwrapped
    # A StatementError that is not a driver's: a value SQLAlchemy could not bind.
    return isinstance(exc, StatementError) and not isinstance(exc, DBAPIError)


class _Refused(Exception):
    """The rows were refused (refuses_rows); `cause` says why."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


@contextmanager
def _refusals() -> Iterator[None]:
    # Inside storage_errors: a refusal passes it as _Refused, anything else becomes the
    # StorageError it always was.
    try:
        yield
    except Exception as exc:
        if refuses_rows(exc):
            raise _Refused(exc) from exc
        raise


def _write_unit(
    data: Database,
    checkpoints: Database,
    table: str,
    rows: Sequence[dict[str, Any]],
    outcomes: Sequence[ItemOutcome],
    mark: Mark,
) -> int:
    """write_then_checkpoint for `rows` and their `outcomes`; _Refused if refused."""
    same = data.same_as(checkpoints)
    with storage_errors(data.describe()), _refusals(), data.engine().begin() as conn:
        written = upsert(conn, table, rows)
        if same:
            mark(conn, outcomes)
    if not same:
        with storage_errors(checkpoints.describe()), checkpoints.engine().begin() as conn:
            mark(conn, outcomes)
    return written


def _reason(cause: BaseException) -> str:
    """The driver's one line: its exception's type and first line, redacted."""
    driver = getattr(cause, "orig", None) or cause
    lines = str(driver).strip().splitlines()
    return redact(f"{type(driver).__name__}: {lines[0] if lines else ''}")


def _refused(unit: ItemRows, cause: BaseException) -> list[ItemOutcome]:
    """The unit's outcomes once the database refused its rows."""
    why = _reason(cause)
    if len(unit.outcomes) == 1:
        (outcome,) = unit.outcomes
        return [
            ItemOutcome.failed(
                outcome.item, ErrorKind.PERMANENT, f"the database refused its rows: {why}"
            )
        ]
    # Several items' rows, mixed: whose were refused cannot be told, so each is fetched
    # again on its own (an attempt more changes its cache key) rather than failed for good.
    return [
        o
        if o.error_kind is not None
        else ItemOutcome.failed(
            o.item,
            ErrorKind.TRANSIENT,
            f"the database refused its batch's rows ({why}); fetched again on its own",
        )
        for o in unit.outcomes
    ]


def _copyable(table: Table) -> bool:
    # COPY's text format has no adapter for JSON documents; those go the INSERT way.
    return not any(isinstance(c.type, JSON) for c in table.columns)


def _copy_upsert(
    conn: Connection,
    table: Table,
    columns: list[str],
    keys: list[str],
    values: list[tuple[Any, ...]],
) -> None:
    """PostgreSQL bulk upsert: COPY into a temporary table, then one INSERT ... SELECT
    ... ON CONFLICT DO UPDATE. Several times faster than multi-row INSERTs for big
    batches (a backfill's 5 tickers x 5 years), in the caller's transaction."""
    stage = f"_syncpoint_stage_{table.name}"
    names = ", ".join(f'"{c}"' for c in columns)
    updates = ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in columns if c not in keys)
    conflict = ", ".join(f'"{k}"' for k in keys)
    driver = conn.connection.driver_connection
    dbapi = conn.dialect.loaded_dbapi
    # The driver's own cursor raises the driver's errors, which SQLAlchemy has not seen:
    # wrapped the way it wraps them, a refused row and a lost connection read the same
    # here as on the INSERT path (storage_errors, refuses_rows).
    with _wrapped_driver_errors(conn, dbapi), driver.cursor() as cur:  # type: ignore[union-attr]
        cur.execute(
            f'CREATE TEMP TABLE IF NOT EXISTS "{stage}" '
            f'(LIKE "{table.name}" INCLUDING DEFAULTS) ON COMMIT DROP'
        )
        cur.execute(f'TRUNCATE "{stage}"')  # an earlier chunk of this transaction
        with cur.copy(f'COPY "{stage}" ({names}) FROM STDIN') as copy:
            for row in values:
                copy.write_row(row)
        cur.execute(
            f'INSERT INTO "{table.name}" ({names}) SELECT {names} FROM "{stage}" '
            f"ON CONFLICT ({conflict}) DO UPDATE SET {updates}"
        )


@contextmanager
def _wrapped_driver_errors(conn: Connection, dbapi: Any) -> Iterator[None]:
    try:
        yield
    except dbapi.Error as exc:
        raise DBAPIError.instance(
            "COPY upsert", None, exc, dbapi.Error, dialect=conn.dialect
        ) from exc


# A range counts as cached when the stored history reaches within this many days of both
# ends: weekends and market holidays mean the exact first and last days may have no bar.
CACHED_EDGE_DAYS = 4
_IN_CHUNK = 500


def cached_tickers(conn: Connection, tickers: Sequence[str], start: date, end: date) -> set[str]:
    """The tickers whose stock_prices history already covers [start, end]."""
    covered: set[str] = set()
    lo, hi = start + timedelta(days=CACHED_EDGE_DAYS), end - timedelta(days=CACHED_EDGE_DAYS)
    for i in range(0, len(tickers), _IN_CHUNK):
        chunk = list(tickers[i : i + _IN_CHUNK])
        rows = conn.execute(
            select(
                stock_prices.c.ticker,
                func.min(stock_prices.c.date),
                func.max(stock_prices.c.date),
            )
            .where(
                stock_prices.c.ticker.in_(chunk),
                stock_prices.c.date.between(start, end),
            )
            .group_by(stock_prices.c.ticker)
        ).all()
        covered.update(t for t, first, last in rows if first <= lo and last >= hi)
    return covered
