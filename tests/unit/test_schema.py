"""Schema versioning: empty databases build themselves, old ones wait for `db upgrade`.

The legacy database is built from a frozen copy of the tables as of commit a953648 (the
last schema made by `metadata.create_all`), never from the live tables.py, which will
move on. Every test runs on SQLite and, marked `postgres`, on PostgreSQL.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from syncpoint.core import schema
from syncpoint.core.db import sqlite_pragmas
from syncpoint.core.errors import ConfigError
from syncpoint.core.migrations import VERSION_TABLE
from syncpoint.core.schema import (
    BASELINE,
    SchemaOutdated,
    SchemaTooNew,
    alembic_config,
    current,
    ensure_current,
    head,
    upgrade,
)
from syncpoint.core.tables import metadata
from tests.conftest import _fresh_pg_database

TABLES = {
    "stock_prices",
    "dcf_valuations",
    "sync_logs",
    "dip_documents",
    "sync_runs",
    "sync_items",
    "sync_item_counts",
}
T0 = datetime(2026, 11, 20, 22, 0, tzinfo=UTC)


def a953648_metadata() -> sa.MetaData:
    """syncpoint/tables.py as of a953648, frozen: what pre-migration databases hold."""
    md = sa.MetaData()
    sa.Table(
        "stock_prices",
        md,
        sa.Column("ticker", sa.String(32), primary_key=True),
        sa.Column("date", sa.Date, primary_key=True),
        sa.Column("open", sa.Float, nullable=False),
        sa.Column("high", sa.Float, nullable=False),
        sa.Column("low", sa.Float, nullable=False),
        sa.Column("close", sa.Float, nullable=False),
        sa.Column("volume", sa.BigInteger, nullable=False),
    )
    sa.Table(
        "dcf_valuations",
        md,
        sa.Column("ticker", sa.String(32), primary_key=True),
        sa.Column("date", sa.Date, nullable=False),
        sa.Column("dcf", sa.Float, nullable=False),
        sa.Column("stock_price", sa.Float, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    sa.Table(
        "sync_logs",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("task_name", sa.String(100), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("rows_updated", sa.Integer, nullable=False, default=0),
        sa.Column("error_message", sa.Text),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True)),
        sa.Column("duration_seconds", sa.Float),
        sa.Column("metadata", sa.JSON),
        sa.Index("idx_sync_logs_task_name", "task_name"),
        sa.Index("idx_sync_logs_completed_at", "completed_at"),
    )
    sa.Table(
        "dip_documents",
        md,
        sa.Column("entity", sa.String(32), primary_key=True),
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("aktualisiert", sa.DateTime(timezone=True), nullable=False),
        sa.Column("datum", sa.Date),
        sa.Column("titel", sa.Text),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("synced_at", sa.DateTime(timezone=True), nullable=False),
        sa.Index("idx_dip_documents_aktualisiert", "entity", "aktualisiert"),
    )
    sa.Table(
        "sync_runs",
        md,
        sa.Column("run_id", sa.String(36), primary_key=True),
        sa.Column("job", sa.String(64), nullable=False),
        sa.Column("run_key", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("owner", sa.String(200)),
        sa.UniqueConstraint("job", "run_key", name="uq_sync_runs_job_key"),
    )
    sa.Table(
        "sync_items",
        md,
        sa.Column("run_id", sa.String(36), primary_key=True),
        sa.Column("stage", sa.String(32), primary_key=True),
        sa.Column("item", sa.String(255), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error_kind", sa.String(16)),
        sa.Column("attempts", sa.Integer, nullable=False, default=0),
        sa.Column("last_error", sa.Text),
        sa.Column("batch_no", sa.Integer),
        sa.Column("updated_at", sa.DateTime(timezone=True)),
        sa.Index("idx_sync_items_run_stage_status", "run_id", "stage", "status"),
    )
    return md


LEGACY_ROWS: dict[str, list[dict[str, Any]]] = {
    "stock_prices": [
        {
            "ticker": "AAPL",
            "date": date(2026, 11, 20),
            "open": 1.0,
            "high": 2.0,
            "low": 0.5,
            "close": 1.5,
            "volume": 10_000_000_000,
        },
        {
            "ticker": "MSFT",
            "date": date(2026, 11, 20),
            "open": 3.0,
            "high": 4.0,
            "low": 2.5,
            "close": 3.5,
            "volume": 7,
        },
    ],
    "dcf_valuations": [
        {
            "ticker": "AAPL",
            "date": date(2026, 11, 20),
            "dcf": 9.5,
            "stock_price": 1.5,
            "updated_at": T0,
        },
    ],
    "sync_logs": [
        {
            "task_name": "prices",
            "status": "completed",
            "rows_updated": 2,
            "started_at": T0,
            "completed_at": T0,
            "duration_seconds": 0.25,
            "metadata": {"batch": 1},
        },
    ],
    "dip_documents": [
        {
            "entity": "vorgang",
            "id": "42",
            "aktualisiert": T0,
            "datum": date(2026, 11, 19),
            "titel": "Gesetz",
            "payload": {"id": "42", "titel": "Gesetz"},
            "synced_at": T0,
        },
    ],
    "sync_runs": [
        {
            "run_id": "r1",
            "job": "daily-sync",
            "run_key": "2026-11-20",
            "status": "partial",
            "version": 3,
            "state": '{"v": 1}',
            "created_at": T0,
            "updated_at": T0,
            "heartbeat_at": T0,
            "finished_at": None,
            "owner": "host:1:tok",
        },
    ],
    "sync_items": [
        # Same keys in every row: an executemany takes its columns from the first.
        {
            "run_id": "r1",
            "stage": "prices",
            "item": "AAPL",
            "status": "done",
            "error_kind": None,
            "attempts": 1,
            "last_error": None,
            "batch_no": 1,
            "updated_at": T0,
        },
        {
            "run_id": "r1",
            "stage": "prices",
            "item": "MSFT",
            "status": "failed",
            "error_kind": "transient",
            "attempts": 2,
            "last_error": "HTTP 503",
            "batch_no": 1,
            "updated_at": T0,
        },
    ],
}


def make_engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30})
        # As syncpoint.core.db sets connections up, so locking behaves as in production.
        sa.event.listen(engine, "connect", sqlite_pragmas)
        return engine
    return sa.create_engine(url)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'schema.db'}"
    return _fresh_pg_database(request.getfixturevalue("pg_root_url"))


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def legacy(engine: sa.Engine) -> sa.Engine:
    """A database as a953648 left it: create_all's tables, rows in each, no version."""
    md = a953648_metadata()
    md.create_all(engine)
    with engine.begin() as conn:
        for name, rows in LEGACY_ROWS.items():
            conn.execute(md.tables[name].insert(), rows)
    return engine


def table_names(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def schema_diff(engine: sa.Engine, target: sa.MetaData) -> list[Any]:
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE, "compare_type": True}
        )
        return list(compare_metadata(context, target))


def test_empty_database_is_built_at_head(engine: sa.Engine) -> None:
    assert current(engine) is None
    ensure_current(engine)
    assert current(engine) == head()
    assert table_names(engine) == TABLES | {VERSION_TABLE}


def test_head_is_what_tables_py_declares(engine: sa.Engine) -> None:
    # Fails when tables.py changes without a revision (or a revision without tables.py).
    upgrade(engine)
    assert schema_diff(engine, metadata) == []


def test_baseline_builds_exactly_what_create_all_built(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), BASELINE)
    assert schema_diff(engine, a953648_metadata()) == []
    assert {uc["name"] for uc in sa.inspect(engine).get_unique_constraints("sync_runs")} == {
        "uq_sync_runs_job_key"
    }


def test_legacy_database_is_refused_with_the_command(legacy: sa.Engine) -> None:
    with pytest.raises(SchemaOutdated) as caught:
        ensure_current(legacy)
    message = str(caught.value)
    assert "\n" not in message
    assert "`syncpoint db upgrade`" in message
    assert "none" in message
    assert head() in message
    assert isinstance(caught.value, ConfigError)
    assert VERSION_TABLE not in table_names(legacy)  # refused means untouched


def test_upgrade_adopts_a_legacy_database_and_keeps_every_row(legacy: sa.Engine) -> None:
    assert upgrade(legacy) == (None, head())
    assert current(legacy) == head()
    ensure_current(legacy)
    with legacy.connect() as conn:
        for name, rows in LEGACY_ROWS.items():
            count = conn.execute(sa.text(f"SELECT count(*) FROM {name}")).scalar_one()
            assert count == len(rows), name
        prices = metadata.tables["stock_prices"]
        volume = conn.execute(
            sa.select(prices.c.volume).where(prices.c.ticker == "AAPL")
        ).scalar_one()
        assert volume == 10_000_000_000
        runs = metadata.tables["sync_runs"]
        run = conn.execute(sa.select(runs).where(runs.c.run_id == "r1")).mappings().one()
        assert (run["status"], run["owner"], run["state"]) == ("partial", "host:1:tok", '{"v": 1}')
        docs = metadata.tables["dip_documents"]
        assert conn.execute(sa.select(docs.c.payload)).scalar_one() == {
            "id": "42",
            "titel": "Gesetz",
        }
        items = metadata.tables["sync_items"]
        assert (
            conn.execute(sa.select(items.c.last_error).where(items.c.item == "MSFT")).scalar_one()
            == "HTTP 503"
        )
    assert upgrade(legacy) == (head(), head())  # a second upgrade is a no-op


# A revision after the shipped head, whichever that is, so these tests outlive new ones.
LATER = "9999"
REVISION_LATER = '''"""A later change, for the tests: a nullable column."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "9999"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sync_runs", sa.Column("note", sa.Text()))


def downgrade() -> None:
    with op.batch_alter_table("sync_runs") as batch:
        batch.drop_column("note")
'''


@pytest.fixture
def code_at_later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This code plus a later revision, so that a database at head is one behind."""
    shipped = head()
    scripts = tmp_path / "migrations"
    shutil.copytree(schema.SCRIPT_LOCATION, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "9999_note.py").write_text(REVISION_LATER.format(head=shipped))
    monkeypatch.setattr(schema, "SCRIPT_LOCATION", str(scripts))
    schema._scripts.cache_clear()
    yield
    schema._scripts.cache_clear()


@pytest.mark.usefixtures("code_at_later")
def test_older_revision_is_refused_then_upgraded(legacy: sa.Engine) -> None:
    assert head() == LATER
    with legacy.begin() as conn:
        command.stamp(alembic_config(conn), BASELINE)
    with pytest.raises(SchemaOutdated) as caught:
        ensure_current(legacy)
    assert (caught.value.found, caught.value.expected) == (BASELINE, LATER)
    assert f"revision 0001, this syncpoint needs {LATER}" in str(caught.value)
    assert "`syncpoint db upgrade`" in str(caught.value)

    assert upgrade(legacy) == (BASELINE, LATER)
    ensure_current(legacy)
    with legacy.connect() as conn:
        rows = conn.execute(sa.text("SELECT run_id, owner, note FROM sync_runs")).all()
        items = conn.execute(sa.text("SELECT count(*) FROM sync_items")).scalar_one()
    assert [tuple(r) for r in rows] == [("r1", "host:1:tok", None)]
    assert items == len(LEGACY_ROWS["sync_items"])


@pytest.mark.usefixtures("code_at_later")
def test_legacy_database_is_adopted_and_upgraded_past_the_baseline(legacy: sa.Engine) -> None:
    assert upgrade(legacy) == (None, LATER)
    assert "note" in {c["name"] for c in sa.inspect(legacy).get_columns("sync_runs")}
    with legacy.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM sync_runs")).scalar_one() == 1


def test_newer_revision_is_refused_by_both_entry_points(engine: sa.Engine) -> None:
    upgrade(engine)
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    for call in (ensure_current, upgrade):
        with pytest.raises(SchemaTooNew) as caught:
            call(engine)
        assert "9999" in str(caught.value)
        assert head() in str(caught.value)
        assert "upgrade syncpoint" in str(caught.value)
    assert current(engine) == "9999"


def test_current_database_costs_one_read(engine: sa.Engine) -> None:
    ensure_current(engine)
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    ensure_current(engine)
    assert statements == [f"SELECT version_num FROM {VERSION_TABLE}"]


def test_tables_without_a_version_or_ledger_are_not_adopted(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE stock_prices (ticker VARCHAR(8) PRIMARY KEY)"))
    for call in (ensure_current, upgrade):
        with pytest.raises(ConfigError, match="stock_prices"):
            call(engine)
    assert VERSION_TABLE not in table_names(engine)


def test_a_failed_upgrade_leaves_nothing_behind(engine: sa.Engine) -> None:
    # A user's table owns the name of 0001's last index: the upgrade fails at its end.
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE user_table (a INTEGER, b INTEGER, c INTEGER)"))
        conn.execute(sa.text("CREATE INDEX idx_sync_items_run_stage_status ON user_table (a)"))
    with pytest.raises(sa.exc.SQLAlchemyError):
        ensure_current(engine)
    assert table_names(engine) == {"user_table"}


def test_concurrent_first_use_builds_once(db_url: str) -> None:
    engines = [make_engine(db_url) for _ in range(4)]
    start = threading.Barrier(len(engines))
    errors: list[BaseException] = []

    def first_use(engine: sa.Engine) -> None:
        start.wait()
        try:
            ensure_current(engine)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=first_use, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert errors == []
        assert current(engines[0]) == head()
        with engines[0].connect() as conn:
            versions = conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).all()
        assert len(versions) == 1
    finally:
        for e in engines:
            e.dispose()
