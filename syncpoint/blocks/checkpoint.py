"""Where syncpoint keeps its checkpoints: a SQL database, by default the data database."""

from __future__ import annotations

from prefect.blocks.core import Block
from prefect_sqlalchemy import SqlAlchemyConnector
from pydantic import Field, HttpUrl, SecretStr

from syncpoint.blocks.form import optional
from syncpoint.core.db import Database
from syncpoint.core.ledger import STALE_AFTER_SECONDS, Ledger


class CheckpointStore(Block):
    """The checkpoint ledger's database and how long finished checkpoints are kept.

    Keep it in the same database as the synced data (the default): a batch's rows and
    its item marks then commit in one transaction. Point it elsewhere and the rows
    commit first, the marks after, so a crash between them only replays that batch.

    Example:
        ```python
        from syncpoint.blocks.checkpoint import CheckpointStore
        from syncpoint.core.db import Database

        store = CheckpointStore.load("BLOCK_NAME")
        ledger = store.ledger(fallback=Database.from_url("sqlite:///syncpoint.db"))
        print(ledger.runs("daily-sync"))
        ```
    """

    _block_type_name = "Syncpoint Checkpoint Store"
    _block_type_slug = "syncpoint-checkpoint-store"
    _description = "Database and retention for syncpoint's resumable run checkpoints."
    _documentation_url = HttpUrl("https://github.com/syncpoint/syncpoint#how-resume-works")

    database: SqlAlchemyConnector | None = optional(
        title="Database",
        description=(
            "A SqlAlchemy Connector block for the checkpoint tables. Empty: the URL below, "
            "else the data database."
        ),
    )
    database_url: SecretStr | None = optional(
        title="Database URL",
        description=(
            "SQLAlchemy URL of the checkpoint database, used when no connector is set; it may "
            "hold a password, so it is masked. Empty: the data database."
        ),
    )
    retention_days: int = Field(
        default=30,
        ge=1,
        description="Completed checkpoints older than this many days are removed.",
    )
    stale_after_seconds: float = Field(
        default=STALE_AFTER_SECONDS,
        gt=0,
        description=(
            "A run left 'running' whose heartbeat is older than this is presumed dead and "
            "taken over (on the same host a dead process is recognised at once)."
        ),
    )

    def target(self, fallback: Database) -> Database:
        """The database holding checkpoints; `fallback` (the data database) if unset."""
        if self.database is not None:
            return Database.from_connector(self.database)
        if self.database_url is not None:
            return Database.from_url(self.database_url.get_secret_value())
        return fallback

    def ledger(self, fallback: Database) -> Ledger:
        return Ledger(self.target(fallback).engine())
