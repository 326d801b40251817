"""sync_item_counts: a stage's items per bucket, kept as they change, not counted on read.

`syncpoint status`, the run page and every stage start counted sync_items with a GROUP BY:
375 ms for a run of 500,000 items on SQLite, growing with the run. The ledger now keeps
the counts in the transaction that changes the items (syncpoint.core.ledger); this
revision creates the table and fills it from the items already there.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The buckets as syncpoint.core.ledger.bucket() derives them from status and error_kind.
BUCKET = """
    CASE
        WHEN status = 'done' THEN 'done'
        WHEN status = 'pending' THEN 'untouched'
        WHEN error_kind = 'transient' THEN 'retrying'
        ELSE 'failed'
    END
"""


def upgrade() -> None:
    op.create_table(
        "sync_item_counts",
        sa.Column("run_id", sa.String(36), primary_key=True),
        sa.Column("stage", sa.String(32), primary_key=True),
        sa.Column("bucket", sa.String(16), primary_key=True),
        sa.Column("n", sa.BigInteger(), nullable=False),
    )
    op.execute(
        f"INSERT INTO sync_item_counts (run_id, stage, bucket, n) "
        f"SELECT run_id, stage, {BUCKET}, COUNT(*) FROM sync_items "
        f"GROUP BY run_id, stage, {BUCKET}"
    )


def downgrade() -> None:
    op.drop_table("sync_item_counts")
