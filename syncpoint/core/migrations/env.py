"""Alembic's environment for syncpoint's schema: run by syncpoint.core.schema, not by hand.

The caller passes an open connection in `config.attributes["connection"]`, normally inside
the transaction (holding the lock) it wants the migrations to run in. Alembic then neither
begins nor commits: a stamp and the upgrades after it land in that one transaction, and
the caller commits or rolls back all of it.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from syncpoint.core.migrations import VERSION_TABLE
from syncpoint.core.tables import metadata


def _ours(name: str | None, type_: str, _parent_names: object) -> bool:
    # Autogenerate must never propose dropping a user's own tables in the same database.
    return type_ != "table" or name in metadata.tables


def run() -> None:
    connection = context.config.attributes.get("connection")
    if not isinstance(connection, Connection):
        raise RuntimeError(
            "syncpoint migrations run through syncpoint.core.schema (or `syncpoint db "
            "upgrade`), which passes config.attributes['connection']"
        )
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        include_name=_ours,
        compare_type=True,
        # SQLite cannot ALTER most things: autogenerate renders batch (copy-and-move) ops.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


run()
