"""Every table syncpoint owns, in one MetaData so one `create_all` builds the schema.

Data tables hold what the jobs sync; ledger tables hold the checkpoints. They live in
one database by default so a batch's upsert and its item marks share a transaction.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Date,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect

metadata = MetaData()


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp kept as its UTC instant, read back aware (UTC) on every backend.

    PostgreSQL's timestamptz stores instants anyway. SQLite has no such type: SQLAlchemy's
    DateTime(timezone=True) writes the wall time of whatever offset the value carries and
    drops the offset, so "2022-10-30T02:30:00+02:00" and "...+01:00" would become the same
    text. Converted to UTC first, the text is the instant, and its order is time order.
    A naive value is taken as UTC, syncpoint's own convention.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        moment: datetime = value
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        moment: datetime = value
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# --- data -------------------------------------------------------------------------------

stock_prices = Table(
    "stock_prices",
    metadata,
    Column("ticker", String(32), primary_key=True),
    Column("date", Date, primary_key=True),
    Column("open", Float, nullable=False),
    Column("high", Float, nullable=False),
    Column("low", Float, nullable=False),
    Column("close", Float, nullable=False),
    Column("volume", BigInteger, nullable=False),
)

dcf_valuations = Table(
    "dcf_valuations",
    metadata,
    Column("ticker", String(32), primary_key=True),
    Column("date", Date, nullable=False),
    Column("dcf", Float, nullable=False),
    Column("stock_price", Float, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# The sync log: one row per stage per attempt, for humans and dashboards.
sync_logs = Table(
    "sync_logs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("task_name", String(100), nullable=False),
    Column("status", String(20), nullable=False),
    Column("rows_updated", Integer, nullable=False, default=0),
    Column("error_message", Text),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("completed_at", DateTime(timezone=True)),
    Column("duration_seconds", Float),
    Column("metadata", JSON),
    Index("idx_sync_logs_task_name", "task_name"),
    Index("idx_sync_logs_completed_at", "completed_at"),
)

# Documents of a DIP-style API (document-sync), one row per (entity, id): a record updated
# upstream is updated here, never duplicated.
dip_documents = Table(
    "dip_documents",
    metadata,
    Column("entity", String(32), primary_key=True),
    Column("id", String(64), primary_key=True),
    # Instants: UTC text on SQLite, timestamptz on PostgreSQL (revision 0002).
    Column("aktualisiert", UtcDateTime, nullable=False),
    Column("datum", Date),
    Column("titel", Text),
    Column("payload", JSON, nullable=False),
    Column("synced_at", UtcDateTime, nullable=False),
    Index("idx_dip_documents_aktualisiert", "entity", "aktualisiert"),
)

# --- checkpoint ledger ------------------------------------------------------------------

# One row per run attempt-chain: (job, run_key) resumes the newest unfinished one.
sync_runs = Table(
    "sync_runs",
    metadata,
    Column("run_id", String(36), primary_key=True),
    Column("job", String(64), nullable=False),
    Column("run_key", String(128), nullable=False),
    Column("status", String(16), nullable=False),
    Column("version", Integer, nullable=False),
    # Validated on every load; see syncpoint.core.ledger.RunState.
    Column("state", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    # host:pid:token of the process working on it; with heartbeat_at, the run's lock.
    Column("owner", String(200)),
    # One checkpoint per (job, run key): two starts of the same date race on this.
    UniqueConstraint("job", "run_key", name="uq_sync_runs_job_key"),
)

# The item ledger: one row per (run, stage, item), never arrays (an array column is
# rewritten whole on every update). Pending = status 'pending' or a transient failure.
sync_items = Table(
    "sync_items",
    metadata,
    Column("run_id", String(36), primary_key=True),
    Column("stage", String(32), primary_key=True),
    Column("item", String(255), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("error_kind", String(16)),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text),
    Column("batch_no", Integer),
    Column("updated_at", DateTime(timezone=True)),
    # A sharded run's batch lease (Ledger.lease): who fetches the item now, and until when.
    # An expired lease is anyone's to take; a mark by anyone else is refused (fencing).
    Column("lease_owner", String(200)),
    Column("lease_until", DateTime(timezone=True)),
    Index("idx_sync_items_run_stage_status", "run_id", "stage", "status"),
)

# How many of a stage's items are in each bucket (untouched, done, failed, retrying), kept
# in the same transactions that change sync_items: `syncpoint status`, the run page and
# the planner read four rows instead of counting a stage of half a million items. One more
# row, bucket 'leased_batches', holds a sharded stage's last leased batch number.
sync_item_counts = Table(
    "sync_item_counts",
    metadata,
    Column("run_id", String(36), primary_key=True),
    Column("stage", String(32), primary_key=True),
    Column("bucket", String(16), primary_key=True),
    Column("n", BigInteger, nullable=False, default=0),
)
