"""The schema as syncpoint.core.tables defined it before migrations (commit a953648).

Written by hand, frozen: databases created by `metadata.create_all` back then are stamped
at this revision without running it, so it must build exactly what create_all built.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "stock_prices",
        sa.Column("ticker", sa.String(32), primary_key=True),
        sa.Column("date", sa.Date(), primary_key=True),
        sa.Column("open", sa.Float(), nullable=False),
        sa.Column("high", sa.Float(), nullable=False),
        sa.Column("low", sa.Float(), nullable=False),
        sa.Column("close", sa.Float(), nullable=False),
        sa.Column("volume", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "dcf_valuations",
        sa.Column("ticker", sa.String(32), primary_key=True),
        sa.Column("date", sa.Date(), nullable=False),
        sa.Column("dcf", sa.Float(), nullable=False),
        sa.Column("stock_price", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "sync_logs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("task_name", sa.String(100), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("rows_updated", sa.Integer(), nullable=False),
        sa.Column("error_message", sa.Text()),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True)),
        sa.Column("duration_seconds", sa.Float()),
        sa.Column("metadata", sa.JSON()),
    )
    op.create_index("idx_sync_logs_task_name", "sync_logs", ["task_name"])
    op.create_index("idx_sync_logs_completed_at", "sync_logs", ["completed_at"])
    op.create_table(
        "dip_documents",
        sa.Column("entity", sa.String(32), primary_key=True),
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("aktualisiert", sa.DateTime(timezone=True), nullable=False),
        sa.Column("datum", sa.Date()),
        sa.Column("titel", sa.Text()),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("synced_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("idx_dip_documents_aktualisiert", "dip_documents", ["entity", "aktualisiert"])
    op.create_table(
        "sync_runs",
        sa.Column("run_id", sa.String(36), primary_key=True),
        sa.Column("job", sa.String(64), nullable=False),
        sa.Column("run_key", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("owner", sa.String(200)),
        sa.UniqueConstraint("job", "run_key", name="uq_sync_runs_job_key"),
    )
    op.create_table(
        "sync_items",
        sa.Column("run_id", sa.String(36), primary_key=True),
        sa.Column("stage", sa.String(32), primary_key=True),
        sa.Column("item", sa.String(255), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error_kind", sa.String(16)),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text()),
        sa.Column("batch_no", sa.Integer()),
        sa.Column("updated_at", sa.DateTime(timezone=True)),
    )
    op.create_index("idx_sync_items_run_stage_status", "sync_items", ["run_id", "stage", "status"])


def downgrade() -> None:
    op.drop_index("idx_sync_items_run_stage_status", table_name="sync_items")
    op.drop_table("sync_items")
    op.drop_table("sync_runs")
    op.drop_index("idx_dip_documents_aktualisiert", table_name="dip_documents")
    op.drop_table("dip_documents")
    op.drop_index("idx_sync_logs_completed_at", table_name="sync_logs")
    op.drop_index("idx_sync_logs_task_name", table_name="sync_logs")
    op.drop_table("sync_logs")
    op.drop_table("dcf_valuations")
    op.drop_table("stock_prices")
