"""The checkpointed cursor stream: read pages, store them, save the cursor, repeat.

The counterpart of the batch map for sources paged by cursor and date (document-sync).
A checkpoint is written every `max_records` records or `max_seconds` seconds, whichever
comes first, in the same transaction as the records it covers: a crash replays at most
one segment, and upserts on (entity, id) make the replay harmless.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Any, cast

from syncpoint.blocks.dip_api import DipApi
from syncpoint.core.db import Database
from syncpoint.core.errors import CheckpointError
from syncpoint.core.interrupts import StopFlag
from syncpoint.core.ledger import reset_command
from syncpoint.engine.batch_map import StageRun
from syncpoint.engine.job_run import JobRun
from syncpoint.sources.documents import Window
from syncpoint.tasks.segments import Segment, fetch_segment, store_segment

FRESH, RESUME, RETRY = "fresh start", "checkpoint resume", "retry"


@dataclass
class StreamPosition:
    """Where an entity's stream stands; stored as RunState.stream and validated on load."""

    window_start: str | None
    window_end: str
    cursor: str | None = None
    finished: bool = False
    records: int = 0  # stored in this window
    pages: int = 0
    checkpoints: int = 0
    newest: str | None = None  # the newest 'aktualisiert' stored in this window
    watermark: str | None = None  # end of the last completed window: the next start
    total_records: int = 0
    guard: str | None = None  # why the loop guard ended the window, if it did
    rejected: int = 0  # records in this window that were not usable

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamPosition:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown or not isinstance(data.get("window_end"), str):
            raise ValueError(f"stream position has unknown or missing fields {sorted(unknown)}")
        position = cls(**data)
        for name in ("records", "pages", "checkpoints", "total_records", "rejected"):
            if not isinstance(getattr(position, name), int) or getattr(position, name) < 0:
                raise ValueError(f"stream position {name} is not a count")
        return position

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_window(
    previous: StreamPosition | None, *, resume: bool, since: str | None, end: str
) -> tuple[StreamPosition, str]:
    """This run's window and which recovery applies: fresh, resume or retry."""
    if previous is not None and not previous.finished:
        if resume and previous.cursor:
            return previous, RESUME
        # Without --resume an interrupted stream restarts its window: no gap, and the
        # records it stored already are overwritten with the same values.
        restarted = StreamPosition(
            window_start=since or previous.window_start,
            window_end=end,
            watermark=previous.watermark,
            total_records=previous.total_records,
        )
        return restarted, RETRY
    watermark = previous.watermark if previous else None
    start = since or watermark
    return StreamPosition(start, end, watermark=watermark, total_records=_total(previous)), FRESH


def stream(
    *,
    api: DipApi,
    entity: str,
    position: StreamPosition,
    data: Database,
    checkpoints: Database,
    run_id: str,
    stop: StopFlag,
    max_records: int,
    max_seconds: float,
    on_checkpoint: Callable[[StreamPosition, Segment], None],
) -> StageRun:
    """Read the window from the position's cursor to its end (or a stop), checkpointing."""
    ran = StageRun()
    seen: set[str] = {position.cursor} if position.cursor else set()
    last_ids: list[str] = []
    window = Window(position.window_start, position.window_end)
    while not position.finished and not position.guard and not stop.requested:
        segment = cast(
            Segment,
            fetch_segment.submit(
                api,
                entity,
                window,
                position.cursor,
                frozenset(seen),
                last_ids,
                position.records + position.rejected,
                max_records,
                max_seconds,
                stop,
            ).result(),
        )
        seen.update(segment.cursors)
        last_ids = segment.last_ids
        position.cursor = segment.cursor
        position.pages += segment.pages
        position.records += len(segment.rows)
        position.rejected += segment.rejected
        position.total_records += len(segment.rows)
        position.checkpoints += 1
        newest = max((r["aktualisiert"] for r in segment.rows), default=None)
        if newest is not None:
            stamp = newest.astimezone(UTC).isoformat()
            position.newest = max(position.newest or stamp, stamp)
        if segment.stuck:
            # Ends this window without moving the watermark: the next run reads it again.
            position.guard = segment.stuck
        elif segment.done:
            # The window is complete: the next run starts where this one ended.
            position.finished, position.watermark, position.cursor = True, window.end, None
        ran.requests += segment.requests
        ran.rows_written += store_segment.submit(
            data, checkpoints, run_id, entity, segment.rows, position.to_dict()
        ).result()
        ran.items_processed += len(segment.rows)
        on_checkpoint(position, segment)
    return ran


def run_stream(
    run: JobRun,
    api: DipApi,
    entity: str,
    *,
    resume: bool,
    since: str | None,
    end: str,
    max_records: int,
    max_seconds: float,
) -> dict[str, Any]:
    """One entity's stream inside its JobRun: plan the window, read it, report."""
    previous = load_position(run.run.state.stream, run.job, entity, run.run_id)
    position, mode = plan_window(previous, resume=resume, since=since, end=end)
    cursor_note = f", from its cursor after {position.records} records" if mode == RESUME else ""
    run.logger.info(
        "%s: %s, records updated %s .. %s%s",
        entity,
        mode,
        position.window_start or "ever",
        position.window_end,
        cursor_note,
    )

    def progress(pos: StreamPosition, seg: Segment) -> None:
        found = seg.num_found if seg.num_found is not None else "?"
        run.logger.info(
            "%s: checkpoint %d: %d records of %s this window, %d pages",
            entity,
            pos.checkpoints,
            pos.records,
            found,
            pos.pages,
        )
        if seg.stuck:
            run.logger.warning("%s: the loop guard ended the stream: %s", entity, seg.stuck)

    run.stage(
        "stream",
        lambda: stream(
            api=api,
            entity=entity,
            position=position,
            data=run.data,
            checkpoints=run.checkpoints,
            run_id=run.run_id,
            stop=run.stop,
            max_records=max_records,
            max_seconds=max_seconds,
            on_checkpoint=progress,
        ),
    )
    summary = run.finish(incomplete=f"loop guard: {position.guard}" if position.guard else None)
    return {**summary, "recovery": mode, "stream": position.to_dict()}


def load_position(
    raw: dict[str, Any] | None, job: str, key: str, run_id: str
) -> StreamPosition | None:
    """The saved position, validated: a damaged one names the command that resets it."""
    if raw is None:
        return None
    try:
        return StreamPosition.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint for {job} {key} (run {run_id}) is unusable: {exc}. "
            f"Reset it with: {reset_command(job, key)}"
        ) from None


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def _total(previous: StreamPosition | None) -> int:
    return previous.total_records if previous else 0
