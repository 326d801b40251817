"""sync_items.lease_owner / lease_until: batch leases for runs shared by several workers.

A sharded run's workers take batches of pending items under a lease that expires: a
worker that dies loses its batches to the others after the lease, and a worker whose
lease has run out can no longer mark (syncpoint.core.ledger.Ledger.lease and mark). Both
columns are empty for every existing item: nothing is leased.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("sync_items", sa.Column("lease_owner", sa.String(200), nullable=True))
    op.add_column("sync_items", sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sync_items") as batch:
        batch.drop_column("lease_until")
        batch.drop_column("lease_owner")
