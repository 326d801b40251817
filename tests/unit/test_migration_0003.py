"""Revision 0003: sync_item_counts is created and filled from the items already there.

A database at revision 0002 holds runs with items in every state; after the upgrade the
ledger reads its counts from the new table, and they equal a count of the items.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic import command

from syncpoint.core.ledger import Ledger, StageCounts
from syncpoint.core.schema import alembic_config, current, head, upgrade
from syncpoint.core.tables import sync_item_counts
from tests.unit.test_schema import make_engine

# (run, stage, item, status, error_kind), as 0002's code left them.
COLUMNS = ("run", "stage", "item", "status", "kind")
ITEMS = [
    ("run-a", "prices", "AAA", "done", None),
    ("run-a", "prices", "BBB", "done", None),
    ("run-a", "prices", "CCC", "failed", "permanent"),
    ("run-a", "prices", "DDD", "failed", "transient"),
    ("run-a", "prices", "EEE", "pending", None),
    ("run-a", "dcf", "AAA", "pending", None),
    ("run-b", "prices", "ZZZ", "done", None),
]


@pytest.fixture
def at_0002(database_url: str) -> sa.Engine:
    engine = make_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0002")
        conn.execute(
            sa.text(
                "INSERT INTO sync_items (run_id, stage, item, status, error_kind, attempts) "
                "VALUES (:run, :stage, :item, :status, :kind, 1)"
            ),
            [
                dict(zip(("run", "stage", "item", "status", "kind"), row, strict=True))
                for row in ITEMS
            ],
        )
    return engine


def test_upgrade_counts_the_items_already_there(at_0002: sa.Engine) -> None:
    assert upgrade(at_0002) == ("0002", head())
    assert current(at_0002) == head()

    ledger = Ledger(at_0002)
    assert ledger.counts("run-a") == {
        "prices": StageCounts(5, done=2, failed=1, retrying=1, untouched=1),
        "dcf": StageCounts(1, untouched=1),
    }
    assert ledger.counts("run-b") == {"prices": StageCounts(1, done=1)}
    assert ledger.count_pending("run-a", "prices") == 2
    at_0002.dispose()


def test_downgrade_drops_the_table(at_0002: sa.Engine) -> None:
    upgrade(at_0002)
    with at_0002.begin() as conn:
        command.downgrade(alembic_config(conn), "0002")
    assert sync_item_counts.name not in sa.inspect(at_0002).get_table_names()
    at_0002.dispose()
