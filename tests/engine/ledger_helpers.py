"""Small helpers the engine tests share: open a run, mark a batch, read or edit a row.

Reading and editing rows goes straight to the real tables: that is how a test sees what
the ledger wrote, and how it puts a checkpoint into a state (old, corrupt) on purpose.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from syncpoint.core.ledger import ErrorKind, ItemOutcome, Ledger, Run
from syncpoint.core.tables import sync_items, sync_runs

JOB = "daily-sync"
KEY = "2026-11-20"


def open_run(
    ledger: Ledger,
    owner: str,
    *,
    job: str = JOB,
    key: str = KEY,
    stages: Sequence[str] = ("prices", "dcf"),
    params: dict[str, Any] | None = None,
) -> Run:
    """A new run, claimed by `owner`."""
    claim = ledger.open(job, key, stages=stages, params=params or {}, fresh=False, owner=owner)
    assert not claim.resumed
    return claim.run


def mark(
    ledger: Ledger,
    run_id: str,
    stage: str,
    outcomes: Sequence[ItemOutcome],
    batch_no: int | None = None,
) -> None:
    """Record outcomes in their own transaction, as store-batch does after its rows."""
    with ledger.engine.begin() as conn:
        ledger.mark(conn, run_id, stage, outcomes, batch_no)


def done(*items: str) -> list[ItemOutcome]:
    return [ItemOutcome.done(item) for item in items]


def permanent(item: str, error: str = "404 not found") -> ItemOutcome:
    return ItemOutcome.failed(item, ErrorKind.PERMANENT, error)


def transient(item: str, error: str = "503 unavailable") -> ItemOutcome:
    return ItemOutcome.failed(item, ErrorKind.TRANSIENT, error)


def item_row(ledger: Ledger, run_id: str, stage: str, item: str) -> dict[str, Any]:
    with ledger.engine.connect() as conn:
        row = conn.execute(
            select(sync_items).where(
                sync_items.c.run_id == run_id,
                sync_items.c.stage == stage,
                sync_items.c.item == item,
            )
        ).one()
    return dict(row._mapping)


def item_rows(ledger: Ledger, run_id: str) -> int:
    """How many item rows the run has, over all its stages."""
    with ledger.engine.connect() as conn:
        return len(
            conn.execute(select(sync_items.c.item).where(sync_items.c.run_id == run_id)).all()
        )


def run_column(ledger: Ledger, run_id: str, column: str) -> Any:
    with ledger.engine.connect() as conn:
        return conn.execute(
            select(sync_runs.c[column]).where(sync_runs.c.run_id == run_id)
        ).scalar_one()


def set_run_columns(ledger: Ledger, run_id: str, **values: Any) -> None:
    with ledger.engine.begin() as conn:
        conn.execute(update(sync_runs).where(sync_runs.c.run_id == run_id).values(**values))


def ago(**delta: float) -> datetime:
    return datetime.now(UTC) - timedelta(**delta)
