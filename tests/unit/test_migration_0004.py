"""Revision 0004: sync_items gains lease_owner and lease_until, empty for every item.

A database at 0003 with a run part done upgrades; its pending items are free to lease
and its done ones are not. Downgrading drops the two columns again.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic import command

from syncpoint.core.ledger import Ledger, new_owner
from syncpoint.core.schema import alembic_config, current, head, upgrade
from tests.unit.test_schema import make_engine

ITEMS = [("AAA", "done"), ("BBB", "pending"), ("CCC", "pending")]


@pytest.fixture
def at_0003(database_url: str) -> sa.Engine:
    engine = make_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0003")
    return engine


def test_upgrade_leaves_every_item_free_to_lease(at_0003: sa.Engine) -> None:
    ledger = Ledger(at_0003)
    owner = new_owner()
    run = ledger.open("fill-cache", "k", stages=["history"], params={}, fresh=False, owner=owner)
    with at_0003.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO sync_items (run_id, stage, item, status, attempts) "
                "VALUES (:run, 'history', :item, :status, 0)"
            ),
            [{"run": run.run.run_id, "item": i, "status": s} for i, s in ITEMS],
        )
    assert upgrade(at_0003) == ("0003", head())
    assert current(at_0003) == head()
    with at_0003.connect() as conn:
        leases = conn.execute(sa.text("SELECT lease_owner, lease_until FROM sync_items")).all()
    assert leases == [(None, None)] * len(ITEMS)

    lease = ledger.lease(run.run.run_id, "history", owner, 10, 60)
    assert lease is not None
    assert [p.item for p in lease.items] == ["BBB", "CCC"]
    ledger.release(owner)
    at_0003.dispose()


def test_downgrade_drops_the_lease_columns(at_0003: sa.Engine) -> None:
    upgrade(at_0003)
    with at_0003.begin() as conn:
        command.downgrade(alembic_config(conn), "0003")
    columns = {c["name"] for c in sa.inspect(at_0003).get_columns("sync_items")}
    assert not columns & {"lease_owner", "lease_until"}
    at_0003.dispose()
