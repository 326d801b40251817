"""The checkpointed cursor stream: read pages, store them, save the cursor, repeat.

The counterpart of the batch map for sources paged by cursor and date (document-sync).
A checkpoint is written every `max_records` records or `max_seconds` seconds, whichever
comes first, in the same transaction as the records it covers: a crash replays at most
one segment, and upserts on (entity, id) make the replay harmless.

Windows are instants: a window's end is fixed when it starts, and the next window starts
a visibility delay before it (DIP: a change takes about 15 minutes to show), so a change
that surfaced late is read by the next window instead of being lost. The overlap costs a
few records read twice; how many, and how many of them were new, is reported.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from syncpoint.blocks.dip_api import DipApi
from syncpoint.core.db import Database
from syncpoint.core.errors import CheckpointError
from syncpoint.core.interrupts import StopFlag
from syncpoint.core.ledger import reset_command
from syncpoint.engine.batch_map import StageRun
from syncpoint.engine.job_run import JobRun
from syncpoint.sources.documents import Window
from syncpoint.tasks.segments import (
    LoopGuard,
    PageReader,
    PageWalker,
    Segment,
    store_segments,
    stored_versions,
)

FRESH, RESUME, RETRY = "fresh start", "checkpoint resume", "retry"
PROGRESS_LOG_SECONDS = 5.0
# A store task stores the segments that come for about this long: one task run per
# checkpoint would cost more CPU than the records' upserts.
STORE_TASK_SECONDS = 10.0


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
    # numFound when this window's stream started, as last seen, and the most seen; the
    # largest page seen (the API's page size). Together they bound the pages a window takes.
    num_found_start: int | None = None
    num_found: int | None = None
    num_found_max: int = 0
    page_size: int = 0
    # The overlap: records updated up to this instant (the last completed window's end)
    # were due in that window; reading them again is the price of the visibility delay.
    overlap_until: str | None = None
    overlap_records: int = 0  # records of this window from the overlap
    late_records: int = 0  # of those, not stored in that version before: surfaced late

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamPosition:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown or not isinstance(data.get("window_end"), str):
            raise ValueError(f"stream position has unknown or missing fields {sorted(unknown)}")
        position = cls(**data)
        for name in COUNTS:
            if not _is_count(getattr(position, name)):
                raise ValueError(f"stream position {name} is not a count")
        for name in ("num_found_start", "num_found"):
            if getattr(position, name) is not None and not _is_count(getattr(position, name)):
                raise ValueError(f"stream position {name} is not a count")
        return position

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


COUNTS = (
    "records",
    "pages",
    "checkpoints",
    "total_records",
    "rejected",
    "num_found_max",
    "page_size",
    "overlap_records",
    "late_records",
)


def plan_window(
    previous: StreamPosition | None,
    *,
    resume: bool,
    since: str | None,
    end: str,
    overlap: timedelta = timedelta(0),
) -> tuple[StreamPosition, str]:
    """This run's window and which recovery applies: fresh, resume or retry.

    A fresh window starts `overlap` (the API's visibility delay) before the end of the last
    completed one; `since` overrides that start.
    """
    if previous is not None and not previous.finished:
        if resume and previous.cursor:
            # A window the loop guard ended resumes too: the records before its cursor are
            # stored, and an upstream that misbehaves still trips the guard again.
            resumed = StreamPosition.from_dict(previous.to_dict() | {"guard": None})
            return resumed, RESUME
        # Without --resume an interrupted stream restarts its window: no gap, and the
        # records it stored already are overwritten with the same values.
        restarted = StreamPosition(
            window_start=since or previous.window_start,
            window_end=end,
            watermark=previous.watermark,
            total_records=previous.total_records,
            overlap_until=None if since else previous.overlap_until,
        )
        return restarted, RETRY
    watermark = previous.watermark if previous else None
    if since or watermark is None:
        position = StreamPosition(since, end, watermark=watermark, total_records=_total(previous))
        return position, FRESH
    start = shift(watermark, -overlap)
    position = StreamPosition(
        start,
        end,
        watermark=watermark,
        total_records=_total(previous),
        overlap_until=watermark if overlap else None,
    )
    return position, FRESH


def shift(stamp: str, delta: timedelta) -> str:
    """An ISO instant moved by `delta`, in UTC with its offset written out."""
    moment = datetime.fromisoformat(stamp)
    if moment.tzinfo is None:  # positions written by syncpoint always carry one
        moment = moment.replace(tzinfo=UTC)
    return (moment.astimezone(UTC) + delta).isoformat()


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
    log: logging.Logger | logging.LoggerAdapter[logging.Logger],
) -> StageRun:
    """Read the window from the position's cursor to its end (or a stop), checkpointing.

    Pages are read ahead on the walker's thread while the segments before them are
    stored, never more than `max_records` records beyond the last checkpoint: a crash
    re-reads at most that many. So that reading never waits for storing, a checkpoint is
    written every half of it.
    """
    ran = StageRun()
    guard = LoopGuard(
        position.cursor,
        position.pages,
        position.page_size,
        position.num_found_max,
        position.num_found_start,
        position.records + position.rejected,
    )
    window = Window(position.window_start, position.window_end)
    walk = (entity, window, position.cursor, guard, stop)
    with (
        PageReader(api) as reader,
        PageWalker(reader, *walk, budget=max_records, log=log) as walker,
    ):
        saver = _Checkpointer(position, data, entity, ran, on_checkpoint)
        while not position.finished and not position.guard and not walker.finished:
            store_segments.submit(
                data,
                checkpoints,
                run_id,
                entity,
                walker,
                saver,
                max(1, max_records // 2),
                max_seconds,
                STORE_TASK_SECONDS,
            ).result()
        # Raised after every page read before it was stored. A stop that cut a request's
        # wait short is no failure: the run ends partial and resumes from its cursor.
        if walker.error is not None and not position.finished and not stop.requested:
            raise walker.error
    return ran


class _Checkpointer:
    """The stream's side of store_segments: the position saved with each segment, and
    the bookkeeping once it is committed."""

    def __init__(
        self,
        position: StreamPosition,
        data: Database,
        entity: str,
        ran: StageRun,
        on_checkpoint: Callable[[StreamPosition, Segment], None],
    ) -> None:
        self.position, self.data, self.entity, self.ran = position, data, entity, ran
        self.on_checkpoint = on_checkpoint
        self.overlap_until = _instant(position.overlap_until)
        self._next: StreamPosition | None = None

    def position_after(self, segment: Segment) -> dict[str, Any]:
        after = StreamPosition.from_dict(self.position.to_dict())
        _advance(after, segment, segment.guard_state)
        if self.overlap_until is not None:
            _count_overlap(after, segment.rows, self.overlap_until, self.data, self.entity)
        if segment.stuck:
            # Ends this window without moving the watermark: the next run reads it again.
            after.guard = segment.stuck
        elif segment.done:
            # The window is complete, also when it delivered fewer records than numFound
            # says: those surfaced (or changed) behind the cursor while the stream ran,
            # and the next window's overlap reads them.
            after.finished, after.watermark, after.cursor = True, after.window_end, None
        self._next = after
        return after.to_dict()

    def stored(self, segment: Segment, rows_written: int) -> None:
        assert self._next is not None
        for name, value in self._next.to_dict().items():
            setattr(self.position, name, value)
        self.ran.requests += segment.requests
        self.ran.rows_written += rows_written
        self.ran.items_processed += len(segment.rows)
        self.on_checkpoint(self.position, segment)


def _advance(position: StreamPosition, segment: Segment, guard: tuple[int, int]) -> None:
    """The position after the segment's records: cursor, counts, numFound, newest."""
    position.cursor = segment.cursor
    position.pages += segment.pages
    position.records += len(segment.rows)
    position.rejected += segment.rejected
    position.total_records += len(segment.rows)
    position.checkpoints += 1
    position.page_size, position.num_found_max = guard
    if segment.num_found is not None:
        position.num_found = segment.num_found
        if position.num_found_start is None:
            position.num_found_start = segment.num_found
    newest = max((r["aktualisiert"] for r in segment.rows), default=None)
    if newest is not None:
        stamp = newest.astimezone(UTC).isoformat()
        position.newest = max(position.newest or stamp, stamp, key=_instant_key)


def _count_overlap(
    position: StreamPosition,
    rows: list[dict[str, Any]],
    until: datetime,
    data: Database,
    entity: str,
) -> None:
    """Count the segment's records from the overlap, and those of them that are news: not
    stored in that version before (they surfaced after the last window read past them)."""
    overlap = [r for r in rows if r["aktualisiert"] <= until]
    if not overlap:
        return
    stored = stored_versions(data, entity, [r["id"] for r in overlap])
    position.overlap_records += len(overlap)
    position.late_records += sum(1 for r in overlap if stored.get(r["id"]) != r["aktualisiert"])


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
    overlap: timedelta = timedelta(0),
) -> dict[str, Any]:
    """One entity's stream inside its JobRun: plan the window, read it, report."""
    previous = load_position(run.run.state.stream, run.job, entity, run.run_id)
    position, mode = plan_window(previous, resume=resume, since=since, end=end, overlap=overlap)
    cursor_note = f", from its cursor after {position.records} records" if mode == RESUME else ""
    if mode == RESUME and previous is not None and previous.guard:
        cursor_note += f" (the loop guard had ended it: {previous.guard})"
    overlap_note = (
        f" ({_minutes(overlap)} overlap with the last window, for changes that surface late)"
        if position.overlap_until and mode != RESUME
        else ""
    )
    run.logger.info(
        "%s: %s, records updated %s .. %s%s%s",
        entity,
        mode,
        position.window_start or "ever",
        position.window_end,
        overlap_note,
        cursor_note,
    )
    began, records_before = time.monotonic(), position.records
    logged = [0.0]

    def progress(pos: StreamPosition, seg: Segment) -> None:
        # A line per checkpoint would be thousands on a first full sync: one every few
        # seconds, and always the last.
        now = time.monotonic()
        if now - logged[0] < PROGRESS_LOG_SECONDS and not (seg.done or seg.stuck):
            return
        logged[0] = now
        run.logger.info(
            "%s: checkpoint %d: %d records of %s this window, %d pages%s",
            entity,
            pos.checkpoints,
            pos.records,
            "?" if pos.num_found is None else pos.num_found,
            pos.pages,
            _eta(pos, time.monotonic() - began, pos.records - records_before),
        )
        if seg.stuck:
            run.logger.warning("%s: the loop guard ended the stream: %s", entity, seg.stuck)
        elif seg.done:
            _report_end(run, entity, pos)

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
            log=run.logger,
        ),
    )
    summary = run.finish(incomplete=f"loop guard: {position.guard}" if position.guard else None)
    return {
        **summary,
        "recovery": mode,
        "overlap": {"records": position.overlap_records, "late": position.late_records},
        "stream": position.to_dict(),
    }


def _report_end(run: JobRun, entity: str, pos: StreamPosition) -> None:
    received = pos.records + pos.rejected
    if pos.num_found is not None and received < pos.num_found:
        run.logger.info(
            "%s: the stream ended %d records short of numFound %d (%s when it started): "
            "records that surfaced or changed behind its cursor while it ran; the next "
            "window's overlap reads them",
            entity,
            pos.num_found - received,
            pos.num_found,
            pos.num_found_start,
        )
    if pos.overlap_until:
        run.logger.info(
            "%s: the overlap re-read %d records updated before the last window's end (%s); "
            "%d of them were new or changed since",
            entity,
            pos.overlap_records,
            pos.overlap_until,
            pos.late_records,
        )


def _eta(pos: StreamPosition, elapsed: float, read: int) -> str:
    """ ", 12% , ~3m10s left": progress against numFound as it is now, at this run's pace."""
    if not pos.num_found or read <= 0:
        return ""
    left = max(pos.num_found - pos.records, 0)
    share = min(pos.records / pos.num_found, 1.0)
    seconds = round(elapsed / read * left)
    return f", {share:.0%}, ~{seconds // 60}m{seconds % 60:02d}s left"


def _minutes(delta: timedelta) -> str:
    minutes = delta.total_seconds() / 60
    return f"{minutes:g} min"


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


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _instant(stamp: str | None) -> datetime | None:
    if stamp is None:
        return None
    moment = datetime.fromisoformat(stamp)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _instant_key(stamp: str) -> datetime:
    """Compare ISO strings as instants: "...+01:00" and "...Z" do not sort as text."""
    moment = _instant(stamp)
    assert moment is not None
    return moment
