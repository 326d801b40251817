"""The version of syncpoint's own tables in a database, and the one way to change it.

Why: `metadata.create_all` creates missing tables but never alters an existing one, so a
release that changes a table would fail at runtime on every database made before it. Each
change is now an Alembic revision (syncpoint/core/migrations/versions) and the database
records its revision in `syncpoint_schema_version`.

Policy: an empty database is built at head on first use, so the zero-setup demo needs no
step. An existing database is only changed by `syncpoint db upgrade`, on purpose: altering
a production database behind a scheduled run's back is how data goes missing, and a
human should take a backup first. A run on an outdated schema stops before it writes,
with one line naming the command.

Databases made before migrations existed (the tables, no version table) are adopted by
`upgrade`: stamped at revision 0001, which is exactly what create_all built then, and
upgraded from there. Their rows are not touched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import OperationalError, ProgrammingError

from syncpoint.core.errors import ConfigError
from syncpoint.core.migrations import SCRIPT_LOCATION, VERSION_TABLE
from syncpoint.core.tables import metadata

log = logging.getLogger(__name__)

UPGRADE_COMMAND = "syncpoint db upgrade"
# The revision a pre-migration database is adopted at, and the tables it had then.
BASELINE = "0001"
_BASELINE_TABLES = frozenset(
    {"stock_prices", "dcf_valuations", "sync_logs", "dip_documents", "sync_runs", "sync_items"}
)
# Present in every database the old create_all touched: its presence means "adopt".
_LEGACY_MARKER = "sync_runs"
# Any constant works, as long as every syncpoint process uses the same one.
_PG_LOCK_KEY = 0x73796E63_706F696E  # "syncpoin"


class SchemaOutdated(ConfigError):
    """The database's schema is older than this code's: run `syncpoint db upgrade`."""

    def __init__(self, database: str, found: str | None, expected: str) -> None:
        shown = found or "none (tables from before schema versioning)"
        super().__init__(
            f"database {database} has schema revision {shown}, this syncpoint needs "
            f"{expected}: back it up, then run `{UPGRADE_COMMAND}`"
        )
        self.database, self.found, self.expected = database, found, expected


class SchemaTooNew(ConfigError):
    """The database was upgraded by a newer syncpoint: this code cannot read it safely."""

    def __init__(self, database: str, found: str, expected: str) -> None:
        super().__init__(
            f"database {database} has schema revision {found}, newer than this syncpoint "
            f"knows (its newest is {expected}): upgrade syncpoint"
        )
        self.database, self.found, self.expected = database, found, expected


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for syncpoint's scripts, no alembic.ini involved.

    With `connection`, env.py migrates over it (inside the caller's transaction, if any).
    """
    config = Config()
    # ConfigParser interpolates '%': a path containing one must not break the lookup.
    config.set_main_option("script_location", SCRIPT_LOCATION.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    """The newest revision this code knows: what `upgrade` brings a database to."""
    newest = _scripts().get_current_head()  # raises on a branched history: a packaging bug
    assert newest is not None, "syncpoint ships no schema revisions"
    return newest


def current(engine: Engine) -> str | None:
    """The database's revision; None if it has no version table (empty or pre-migration)."""
    with engine.connect() as conn:
        return _revision(conn)


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the database to head in one transaction, adopting a pre-migration one.

    Returns (revision before, revision after); before is None for an empty or a
    pre-migration database. Safe to run while another process does the same: the second
    waits for the first's transaction and then finds nothing to do.
    """
    with engine.connect() as conn:
        return _upgrade(conn, database=_describe(engine), only_if_empty=False)


def ensure_current(engine: Engine) -> None:
    """Check the database is at head before a run uses it; build it if it is empty.

    One query when the schema is current, which is every run but the first after an
    upgrade. Raises SchemaOutdated (run `syncpoint db upgrade`) or SchemaTooNew (upgrade
    syncpoint) rather than touch a database that holds data.
    """
    newest = head()
    database = _describe(engine)
    with engine.connect() as conn:
        if _quick_revision(conn) == newest:
            return
        state = _state(conn)
        conn.rollback()
        if state.empty:
            before, after = _upgrade(conn, database=database, only_if_empty=True)
            if before != after:
                log.info("created syncpoint's tables in %s at revision %s", database, after)
            return
        _refuse_unless_current(state, database)


# --- internals --------------------------------------------------------------------------


@dataclass(frozen=True)
class _State:
    revision: str | None
    tables: frozenset[str]  # syncpoint's table names present in the database

    @property
    def empty(self) -> bool:
        return self.revision is None and not self.tables

    @property
    def legacy(self) -> bool:
        return self.revision is None and _LEGACY_MARKER in self.tables


def _describe(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _revision(conn: Connection) -> str | None:
    context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def _quick_revision(conn: Connection) -> str | None:
    """The version row in one SELECT, or None when that is not conclusive."""
    try:
        rows = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
    except (OperationalError, ProgrammingError):
        # No version table (or worse: _state asks again, and says so). On PostgreSQL the
        # failed statement aborted the transaction: start over.
        conn.rollback()
        return None
    return str(rows[0]) if len(rows) == 1 else None


def _state(conn: Connection) -> _State:
    ours = _BASELINE_TABLES | set(metadata.tables)
    present = frozenset(inspect(conn).get_table_names()) & ours
    return _State(revision=_revision(conn), tables=present)


def _known(revision: str) -> bool:
    return any(script.revision == revision for script in _scripts().walk_revisions())


def _refuse_unless_current(state: _State, database: str) -> None:
    newest = head()
    if state.revision == newest:
        return
    if state.revision is not None and not _known(state.revision):
        raise SchemaTooNew(database, state.revision, newest)
    if state.revision is None and not state.legacy:
        raise _not_ours(state, database)
    raise SchemaOutdated(database, state.revision, newest)


def _not_ours(state: _State, database: str) -> ConfigError:
    return ConfigError(
        f"database {database} has tables named like syncpoint's "
        f"({', '.join(sorted(state.tables))}) but no syncpoint schema version and no "
        "sync_runs table: point syncpoint at an empty database or one it created"
    )


def _lock(conn: Connection) -> None:
    """Begin the transaction the whole upgrade runs in, excluding other upgraders."""
    if conn.in_transaction():
        conn.rollback()
    conn.begin()
    if conn.dialect.name == "postgresql":
        # Held to commit/rollback; a second upgrader waits here, then re-reads the state.
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    elif conn.dialect.name == "sqlite":
        # pysqlite defers BEGIN to the first INSERT/UPDATE and would run the DDL outside
        # any transaction. BEGIN IMMEDIATE takes the write lock now (other writers wait on
        # busy_timeout) and makes CREATE/ALTER part of the transaction.
        dbapi = conn.connection.dbapi_connection
        if not getattr(dbapi, "in_transaction", False):
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def _upgrade(conn: Connection, *, database: str, only_if_empty: bool) -> tuple[str | None, str]:
    newest = head()
    _lock(conn)
    # Read again under the lock: another process may have upgraded while we waited.
    state = _state(conn)
    if only_if_empty and not state.empty:
        conn.rollback()
        _refuse_unless_current(state, database)
        return newest, newest
    if state.revision is not None and not _known(state.revision):
        raise SchemaTooNew(database, state.revision, newest)
    if state.revision is None and state.tables:
        if not state.legacy:
            raise _not_ours(state, database)
        missing = _BASELINE_TABLES - state.tables
        if missing:
            raise ConfigError(
                f"database {database} predates syncpoint's schema revision {BASELINE} "
                f"(no {', '.join(sorted(missing))}): it cannot be adopted; start from an "
                "empty database"
            )
        log.info("adopting %s: its tables match revision %s", database, BASELINE)
        command.stamp(alembic_config(conn), BASELINE)
    command.upgrade(alembic_config(conn), "head")
    after = _revision(conn)
    assert after == newest, f"upgrade stopped at {after}, not {newest}"
    conn.commit()
    if state.revision != after:
        log.info("upgraded %s from revision %s to %s", database, state.revision, after)
    return state.revision, after
