"""dip_documents.aktualisiert holds instants: SQLite rows converted to UTC.

Before this revision a record's `aktualisiert` ("2022-03-29T21:19:02+02:00") reached SQLite
as the wall time of its own offset ("2022-03-29 21:19:02"), the offset dropped: Berlin
local time, ambiguous for an hour every October and out of order with `synced_at` (UTC).
The code now stores UTC (syncpoint.core.tables.UtcDateTime); this revision rewrites the
rows already there, re-deriving each instant from the original string in the row's payload
(a string without an offset is Berlin time, as DIP means it). A row whose payload has no
usable string keeps its stored wall time, read as Berlin time.

On PostgreSQL the column is timestamptz and held the instant all along, except for a string
without an offset, which the old code read as UTC: only those rows are rewritten there.
`synced_at` was written in UTC all along and is unchanged. No DDL changes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BERLIN = ZoneInfo("Europe/Berlin")
# SQLAlchemy's text form of a DateTime on SQLite.
STORED = "%Y-%m-%d %H:%M:%S.%f"
# Rows per read and per executemany: memory stays flat however large the table is.
CHUNK = 5000
# A string that ends in an offset (or Z): PostgreSQL stored its instant correctly.
HAS_OFFSET = r"(Z|[+-][0-9]{2}(:?[0-9]{2})?)$"


def upgrade() -> None:
    _rewrite(upgrading=True)


def downgrade() -> None:
    _rewrite(upgrading=False)


def _rewrite(*, upgrading: bool) -> None:
    bind = op.get_bind()
    sqlite = bind.dialect.name == "sqlite"
    # PostgreSQL: only the rows whose string has no offset can be wrong.
    only = "" if sqlite else "AND NOT ((payload ->> 'aktualisiert') ~ :offset) "
    select = sa.text(
        "SELECT entity, id, aktualisiert, payload FROM dip_documents "
        f"WHERE (entity > :entity OR (entity = :entity AND id > :id)) {only}"
        "ORDER BY entity, id LIMIT :limit"
    )
    update = sa.text("UPDATE dip_documents SET aktualisiert = :at WHERE entity = :e AND id = :i")
    after = ("", "")
    while True:
        # Keyset pages: never a cursor open on the table while it is being updated.
        params = {"entity": after[0], "id": after[1], "limit": CHUNK, "offset": HAS_OFFSET}
        rows = bind.execute(select, params).all()
        if not rows:
            return
        changes = []
        for entity, rid, stored, payload in rows:
            original = _original(payload)
            if sqlite:
                wall = datetime.strptime(stored, STORED)
                value: Any = _sqlite_value(original, wall, upgrading).strftime(STORED)
            elif original is not None:
                # 0001 read the offset-less string as UTC; 0002 reads it as Berlin time.
                value = original.astimezone(UTC) if upgrading else original.replace(tzinfo=UTC)
            else:
                continue
            changes.append({"at": value, "e": entity, "i": rid})
        if changes:
            bind.execute(update, changes)
        after = (rows[-1][0], rows[-1][1])


def _sqlite_value(original: datetime | None, wall: datetime, upgrading: bool) -> datetime:
    """The value to store: 0002's UTC instant, or (downgrading) 0001's wall time, which was
    the string's own wall time whatever its offset."""
    if upgrading:
        known = original if original is not None else wall.replace(tzinfo=BERLIN)
        return known.astimezone(UTC)
    if original is not None:
        return original
    return wall.replace(tzinfo=UTC).astimezone(BERLIN)


def _original(payload: Any) -> datetime | None:
    """The record's own `aktualisiert` from its stored JSON, aware (no offset: Berlin
    time, as DIP means it); None if there is no usable string."""
    try:
        document = json.loads(payload) if isinstance(payload, str | bytes) else payload
        value = document.get("aktualisiert") if isinstance(document, dict) else None
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None
    if parsed is None:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=BERLIN)
