"""Alembic scripts for syncpoint's own tables, driven by syncpoint.core.schema.

There is no alembic.ini: `syncpoint.core.schema.alembic_config()` points Alembic here, and
env.py takes the connection the caller already opened (and locked). The version table is
`syncpoint_schema_version`, not `alembic_version`, so a user's own Alembic project in the
same database never sees our revisions, nor we theirs.

A schema change is a new revision, never an edit of an old one (databases out there are
stamped with it). With a database at head, after changing syncpoint/core/tables.py:

    from alembic import command
    from sqlalchemy import create_engine
    from syncpoint.core.schema import alembic_config

    with create_engine(URL).connect() as conn:
        command.revision(alembic_config(conn), "what changed", rev_id="0002",
                         autogenerate=True)

then review the file (on SQLite, alter tables inside `op.batch_alter_table`).
tests/unit/test_schema.py fails while tables.py and the head revision disagree.
"""

from __future__ import annotations

from pathlib import Path

SCRIPT_LOCATION = str(Path(__file__).resolve().parent)
VERSION_TABLE = "syncpoint_schema_version"
