"""The sync_logs table: one row per stage attempt, written as the stage ends."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, insert

from syncpoint.core.tables import sync_logs


@dataclass
class StageLog:
    task_name: str
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def write(
        self,
        engine: Engine,
        *,
        status: str,
        rows_updated: int,
        error_message: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        completed = datetime.now(UTC)
        with engine.begin() as conn:
            conn.execute(
                insert(sync_logs).values(
                    task_name=self.task_name,
                    status=status,
                    rows_updated=rows_updated,
                    error_message=error_message,
                    started_at=self.started_at,
                    completed_at=completed,
                    duration_seconds=(completed - self.started_at).total_seconds(),
                    metadata=metadata or {},
                )
            )
