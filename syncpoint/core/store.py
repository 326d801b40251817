"""Storing: rows -> pandas (dedupe, types) -> one upsert statement per batch.

Upserts on natural keys make a replayed batch harmless: at-least-once delivery,
exactly-once effect.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import JSON, Connection, Table, func, select
from sqlalchemy.dialects import postgresql, sqlite

from syncpoint.core.db import Database, storage_errors
from syncpoint.core.tables import dcf_valuations, dip_documents, stock_prices

if TYPE_CHECKING:
    import pandas as pd

# Which tables a batch may write, by the name a source declares.
TABLES: dict[str, Table] = {t.name: t for t in (stock_prices, dcf_valuations, dip_documents)}

# From this many rows a PostgreSQL upsert goes through COPY (see _copy_upsert).
COPY_FROM_ROWS = 1000


def to_frame(table: Table, rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a frame with the table's columns, one row per key (the last one wins)."""
    # Imported here: pandas is a third of what the flow modules cost to import, and a
    # rerun of a completed date never stores anything: a no-op rerun skips that cost.
    import pandas as pd

    columns = [c.name for c in table.columns]
    frame = pd.DataFrame.from_records(list(rows), columns=columns)
    keys = [c.name for c in table.primary_key.columns]
    return frame.drop_duplicates(subset=keys, keep="last")


def upsert(conn: Connection, table_name: str, rows: Sequence[dict[str, Any]]) -> int:
    """Insert or update `rows` into `table_name` on its primary key; returns rows written."""
    if not rows:
        return 0
    table = TABLES[table_name]
    frame = to_frame(table, rows)
    # to_dict turns numpy scalars into Python ones, which every DBAPI accepts.
    records = cast(
        list[dict[str, Any]],
        frame.astype(object).where(frame.notna(), None).to_dict(orient="records"),
    )
    keys = [c.name for c in table.primary_key.columns]
    dialect = conn.dialect.name
    if dialect == "postgresql" and len(records) >= COPY_FROM_ROWS and _copyable(table):
        _copy_upsert(conn, table, [str(c) for c in frame.columns], keys, records)
    elif dialect == "postgresql":
        pg = postgresql.insert(table)
        stmt = pg.on_conflict_do_update(
            index_elements=keys,
            set_={c: pg.excluded[c] for c in frame.columns if c not in keys},
        )
        conn.execute(stmt, records)
    elif dialect == "sqlite":
        # One parameterised statement through executemany: compiling a multi-row VALUES
        # statement per batch costs more than running it.
        lite = sqlite.insert(table)
        conn.execute(
            lite.on_conflict_do_update(
                index_elements=keys,
                set_={c: lite.excluded[c] for c in frame.columns if c not in keys},
            ),
            records,
        )
    else:  # pragma: no cover - Database.from_url refuses other backends
        raise ValueError(f"no upsert for {dialect}")
    return len(records)


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


def _copyable(table: Table) -> bool:
    # COPY's text format has no adapter for JSON documents; those go the INSERT way.
    return not any(isinstance(c.type, JSON) for c in table.columns)


def _copy_upsert(
    conn: Connection,
    table: Table,
    columns: list[str],
    keys: list[str],
    records: list[dict[str, Any]],
) -> None:
    """PostgreSQL bulk upsert: COPY into a temporary table, then one INSERT ... SELECT
    ... ON CONFLICT DO UPDATE. Several times faster than multi-row INSERTs for big
    batches (a backfill's 5 tickers x 5 years), in the caller's transaction."""
    stage = f"_syncpoint_stage_{table.name}"
    names = ", ".join(f'"{c}"' for c in columns)
    updates = ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in columns if c not in keys)
    conflict = ", ".join(f'"{k}"' for k in keys)
    driver = conn.connection.driver_connection
    with driver.cursor() as cur:  # type: ignore[union-attr]
        cur.execute(
            f'CREATE TEMP TABLE IF NOT EXISTS "{stage}" '
            f'(LIKE "{table.name}" INCLUDING DEFAULTS) ON COMMIT DROP'
        )
        cur.execute(f'TRUNCATE "{stage}"')  # an earlier chunk of this transaction
        with cur.copy(f'COPY "{stage}" ({names}) FROM STDIN') as copy:
            for record in records:
                copy.write_row([record[c] for c in columns])
        cur.execute(
            f'INSERT INTO "{table.name}" ({names}) SELECT {names} FROM "{stage}" '
            f"ON CONFLICT ({conflict}) DO UPDATE SET {updates}"
        )


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
