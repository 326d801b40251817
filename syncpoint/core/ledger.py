"""The checkpoint ledger: runs and one row per (run, stage, item). All checkpoint I/O.

A run is (job, run key), e.g. ("daily-sync", "2026-11-20"). Its state is versioned JSON,
validated on every load; a row that fails validation is a CheckpointError naming the
command that resets it, never a half-understood resume.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    RowMapping,
    and_,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from syncpoint.core.errors import CheckpointError
from syncpoint.core.tables import sync_item_counts, sync_items, sync_runs

CHECKPOINT_VERSION = 1
# A running run whose heartbeat is older than this is presumed dead and taken over.
STALE_AFTER_SECONDS = 120.0
_INSERT_CHUNK = 1000
# Items per statement when registering a universe: an IN list of this many stays well
# inside every driver's parameter limit (SQLite's is 32,766).
_CHUNK = 1000
# Pending items read per query when planning a stage's batches.
PENDING_PAGE = 5000


class RunStatus(StrEnum):
    RUNNING = "running"
    PARTIAL = "partial"
    COMPLETED = "completed"
    FAILED = "failed"


class ItemStatus(StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class ErrorKind(StrEnum):
    PERMANENT = "permanent"
    TRANSIENT = "transient"


def reset_command(job: str, run_key: str) -> str:
    return f"syncpoint checkpoints reset {job} --key {run_key}"


class RunBusy(CheckpointError):
    """Another live process is working on this run."""


class LeaseLost(CheckpointError):
    """A batch's lease ran out (or was never this worker's): its marks are refused, and
    the transaction they were part of, the batch's rows included, is rolled back."""


def new_owner() -> str:
    """host:pid:token — who holds a run, precise enough to tell a dead holder."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


# Owners held by live JobRuns of this process: a run left 'running' by an earlier,
# abandoned attempt in the same process is not mistaken for a live one.
_live_owners: set[str] = set()
_live_lock = threading.Lock()


def _holder_is_alive(owner: str | None) -> bool | None:
    """True/False when it can be told from here (same host), None otherwise."""
    if not owner or owner.count(":") < 2:
        return None
    host, pid_text, _token = owner.rsplit(":", 2)
    if host != socket.gethostname() or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    if pid == os.getpid():
        with _live_lock:
            return owner in _live_owners
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Claim:
    """The run an invocation works on, and how it came to it."""

    run: Run
    resumed: bool
    took_over: str | None = None  # the dead holder of a run left 'running'


@dataclass(frozen=True)
class RunState:
    """The JSON document stored with a run; its shape is the checkpoint version."""

    job: str
    run_key: str
    stages: list[str]
    params: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] | None = None
    # Cursor streams (document-sync): cursor, window and counts; None for item jobs.
    stream: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str) -> RunState:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("state is not a JSON object")
        missing = {"job", "run_key", "stages"} - data.keys()
        if missing:
            raise ValueError(f"state lacks {sorted(missing)}")
        stages = data["stages"]
        if not isinstance(stages, list) or not all(isinstance(s, str) for s in stages):
            raise ValueError("state.stages is not a list of names")
        params = data.get("params") or {}
        summary = data.get("summary")
        stream = data.get("stream")
        if not isinstance(params, dict) or not all(
            v is None or isinstance(v, dict) for v in (summary, stream)
        ):
            raise ValueError("state.params/summary/stream are not objects")
        return cls(str(data["job"]), str(data["run_key"]), stages, params, summary, stream)


@dataclass(frozen=True)
class Run:
    run_id: str
    job: str
    run_key: str
    status: RunStatus
    created_at: datetime
    updated_at: datetime
    heartbeat_at: datetime
    finished_at: datetime | None
    state: RunState

    @property
    def finished(self) -> bool:
        return self.status is RunStatus.COMPLETED


@dataclass(frozen=True)
class PendingItem:
    item: str
    attempts: int


@dataclass(frozen=True)
class Lease:
    """A batch of a stage's pending items, leased to one worker until `until` (by the
    database's clock): see Ledger.lease."""

    run_id: str
    stage: str
    batch_no: int
    owner: str
    items: tuple[PendingItem, ...]
    until: datetime


@dataclass(frozen=True)
class ItemOutcome:
    """What one batch learnt about one item; every item of a batch gets one."""

    item: str
    status: ItemStatus
    error_kind: ErrorKind | None = None
    error: str | None = None

    @classmethod
    def done(cls, item: str) -> ItemOutcome:
        return cls(item, ItemStatus.DONE)

    @classmethod
    def failed(cls, item: str, kind: ErrorKind, error: str) -> ItemOutcome:
        return cls(item, ItemStatus.FAILED, kind, error[:1000])


@dataclass(frozen=True)
class StageCounts:
    total: int = 0
    done: int = 0
    failed: int = 0  # permanently: not retried by later runs
    retrying: int = 0  # transient failures: the next run tries them again
    untouched: int = 0

    @property
    def pending(self) -> int:
        return self.retrying + self.untouched

    @property
    def settled(self) -> int:
        return self.done + self.failed


# StageCounts' buckets, as sync_item_counts keeps them (see bucket()).
BUCKETS = ("untouched", "done", "failed", "retrying")


def bucket(status: str, error_kind: str | None) -> str:
    """The count an item with this status and error kind is in."""
    if status == ItemStatus.DONE.value:
        return "done"
    if status == ItemStatus.PENDING.value:
        return "untouched"
    return "retrying" if error_kind == ErrorKind.TRANSIENT.value else "failed"


def _drop_runs(conn: Connection, ids: Sequence[str]) -> None:
    """Delete runs with their items and counts, in the caller's transaction, in chunks an
    IN list takes."""
    for start in range(0, len(ids), _INSERT_CHUNK):
        chunk = ids[start : start + _INSERT_CHUNK]
        conn.execute(delete(sync_items).where(sync_items.c.run_id.in_(chunk)))
        conn.execute(delete(sync_item_counts).where(sync_item_counts.c.run_id.in_(chunk)))
        conn.execute(delete(sync_runs).where(sync_runs.c.run_id.in_(chunk)))


def _bump(conn: Connection, run_id: str, stage: str, deltas: Counter[str]) -> None:
    """Move a stage's counts by `deltas`, in the caller's transaction (the one that
    changes the items: the counts can never disagree with them)."""
    for name, delta in deltas.items():
        if not delta:
            continue
        bound = {"c_run": run_id, "c_stage": stage, "c_bucket": name, "c_delta": delta}
        moved = conn.execute(_BUMP, bound).rowcount
        if not moved:
            conn.execute(
                insert(sync_item_counts).values(run_id=run_id, stage=stage, bucket=name, n=delta)
            )


# Built once, as Ledger.mark's statements are (see _MARK).
_BUMP = (
    update(sync_item_counts)
    .where(
        sync_item_counts.c.run_id == bindparam("c_run"),
        sync_item_counts.c.stage == bindparam("c_stage"),
        sync_item_counts.c.bucket == bindparam("c_bucket"),
    )
    .values(n=sync_item_counts.c.n + bindparam("c_delta"))
)


@dataclass(frozen=True)
class ItemFailure:
    stage: str
    item: str
    error_kind: str
    attempts: int
    error: str
    batch_no: int | None


def _fence(
    lease: Lease,
    items: Sequence[str],
    held: dict[str, tuple[str | None, datetime | None]],
    now: datetime,
) -> None:
    """LeaseLost unless every one of `items` is still leased to `lease.owner` at `now`."""
    lost = [
        item
        for item in items
        if item in held and not (held[item][0] == lease.owner and (held[item][1] or now) > now)
    ]
    if lost:
        raise LeaseLost(
            f"batch {lease.batch_no} of {lease.stage}: the lease on {len(lost)} of its "
            f"{len(items)} items ran out before its marks (first: {lost[0]}); another "
            "worker may have them now"
        )


def _by_item(pending: PendingItem) -> str:
    return pending.item


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes even for timezone=True columns.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _db_now(conn: Connection) -> datetime:
    """The database's clock. Leases are compared by it, so workers on hosts whose clocks
    disagree still agree on when a lease has run out."""
    value: datetime = conn.execute(select(func.now())).scalar_one()
    # SQLite's CURRENT_TIMESTAMP is UTC without saying so.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# The counts row (sync_item_counts) that holds a stage's last leased batch number: a
# lease takes the next one without scanning the stage for its highest.
_LEASED_BATCHES = "leased_batches"


# Ledger.mark's statements, built once: a batch is marked many times a second, and
# building them anew (an IN list of one bound parameter per item) cost more than running
# them.
_MARKED_BEFORE = select(
    sync_items.c.item,
    sync_items.c.status,
    sync_items.c.error_kind,
    sync_items.c.lease_owner,
    sync_items.c.lease_until,
).where(
    sync_items.c.run_id == bindparam("m_run"),
    sync_items.c.stage == bindparam("m_stage"),
    sync_items.c.item.in_(bindparam("m_items", expanding=True)),
)
_MARKED_BEFORE_LOCKED = _MARKED_BEFORE.with_for_update()
_MARKED_AT = (
    update(sync_runs)
    .where(sync_runs.c.run_id == bindparam("r_run"))
    .values(heartbeat_at=bindparam("r_now"), updated_at=bindparam("r_now"))
)
# Where a batch's items were before it is marked, as counts by status: one row per
# bucket, not one per item (see Ledger.mark). The same items as _MARKED_BEFORE.
_MARKED_BEFORE_COUNTS = _MARKED_BEFORE.with_only_columns(
    sync_items.c.status, sync_items.c.error_kind, func.count()
).group_by(sync_items.c.status, sync_items.c.error_kind)
# The items of a batch that share an outcome, marked in one statement.
_MARK = (
    update(sync_items)
    .where(
        sync_items.c.run_id == bindparam("b_run"),
        sync_items.c.stage == bindparam("b_stage"),
        sync_items.c.item.in_(bindparam("b_items", expanding=True)),
    )
    .values(
        status=bindparam("b_status"),
        error_kind=bindparam("b_kind"),
        last_error=bindparam("b_error"),
        attempts=sync_items.c.attempts + 1,
        batch_no=bindparam("b_batch"),
        updated_at=bindparam("b_now"),
        lease_owner=None,
        lease_until=None,
    )
)


class Ledger:
    """Reads and writes checkpoints in one database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # --- runs -------------------------------------------------------------------------

    def latest(self, job: str, run_key: str) -> Run | None:
        row = self._latest_row(job, run_key)
        return None if row is None else self._load(row)

    def open(
        self,
        job: str,
        run_key: str,
        *,
        stages: Sequence[str],
        params: dict[str, Any],
        fresh: bool,
        owner: str,
        stale_after: float = STALE_AFTER_SECONDS,
        reopen: bool = False,
    ) -> Claim:
        """Claim the run (job, run key) for `owner`: resume it, start it, or refuse.

        One process at a time: a run another live process holds raises RunBusy; one left
        'running' by a dead process (its pid gone, or its heartbeat older than
        `stale_after`) is taken over. A completed run is returned unclaimed (nothing to
        do) unless `reopen` asks to work on it again, e.g. to retry its failed items.
        """
        row = self._latest_row(job, run_key)
        took_over = self._refuse_if_live(row, stale_after)
        if fresh and row is not None:
            self.delete(job, run_key)
            row = None
        if row is None:
            return Claim(self._create(job, run_key, stages, params, owner), resumed=False)
        run = self._load(row)  # validates: a corrupt checkpoint stops here, by name
        if run.status is RunStatus.COMPLETED and not reopen:
            return Claim(run, resumed=True)
        now = _now()
        with self.engine.begin() as conn:
            # Compare-and-set on what we read: of two racing starts, one wins. On the
            # holder, not the heartbeat: a sharded run's workers bump the heartbeat with
            # every batch they mark, and a parent started again while they work read it
            # a moment before one of them did (RunBusy "just now", bench and e2e alike).
            claimed = conn.execute(
                update(sync_runs)
                .where(
                    sync_runs.c.run_id == run.run_id,
                    sync_runs.c.status == row["status"],
                    sync_runs.c.owner.is_(None)
                    if row["owner"] is None
                    else sync_runs.c.owner == row["owner"],
                )
                .values(
                    status=RunStatus.RUNNING.value,
                    owner=owner,
                    heartbeat_at=now,
                    updated_at=now,
                    finished_at=None,
                )
            ).rowcount
        if not claimed:
            raise RunBusy(f"{job} {run_key} was claimed by another process just now")
        self._hold(owner)
        return Claim(self.get(run.run_id), resumed=True, took_over=took_over)

    def ensure_idle(self, job: str, run_key: str, stale_after: float = STALE_AFTER_SECONDS) -> None:
        """Raise RunBusy if a live process works on (job, run key) right now."""
        self._refuse_if_live(self._latest_row(job, run_key), stale_after)

    def _refuse_if_live(self, row: RowMapping | None, stale_after: float) -> str | None:
        """RunBusy if `row` is held by a live process; its dead holder's name if stale."""
        if row is None or row["status"] != RunStatus.RUNNING.value:
            return None
        age = (_now() - (_aware(row["heartbeat_at"]) or _now())).total_seconds()
        alive = _holder_is_alive(row["owner"])
        if alive or (alive is None and age < stale_after):
            raise RunBusy(
                f"{row['job']} {row['run_key']} is already running "
                f"({row['owner'] or 'unknown process'}, heartbeat {age:.0f}s ago). Wait for it "
                f"to finish; if that process is gone, the run is taken over once its "
                f"heartbeat is {stale_after:.0f}s old."
            )
        return str(row["owner"] or "unknown process")

    def release(self, owner: str) -> None:
        """This process no longer works on the runs `owner` claimed."""
        with _live_lock:
            _live_owners.discard(owner)

    def _hold(self, owner: str) -> None:
        with _live_lock:
            _live_owners.add(owner)

    def _create(
        self, job: str, run_key: str, stages: Sequence[str], params: dict[str, Any], owner: str
    ) -> Run:
        now = _now()
        state = RunState(job, run_key, list(stages), dict(params))
        run_id = str(uuid.uuid4())
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(sync_runs).values(
                        run_id=run_id,
                        job=job,
                        run_key=run_key,
                        status=RunStatus.RUNNING.value,
                        version=CHECKPOINT_VERSION,
                        state=state.to_json(),
                        created_at=now,
                        updated_at=now,
                        heartbeat_at=now,
                        owner=owner,
                    )
                )
        except IntegrityError:
            raise RunBusy(f"{job} {run_key} was started by another process just now") from None
        self._hold(owner)
        return self.get(run_id)

    def _latest_row(self, job: str, run_key: str) -> RowMapping | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(sync_runs).where(sync_runs.c.job == job, sync_runs.c.run_key == run_key)
            ).first()
        return None if row is None else row._mapping

    def get(self, run_id: str) -> Run:
        with self.engine.connect() as conn:
            row = conn.execute(select(sync_runs).where(sync_runs.c.run_id == run_id)).first()
        if row is None:
            raise CheckpointError(f"no checkpoint with run id {run_id}")
        return self._load(row._mapping)

    def runs(self, job: str | None = None, limit: int = 20) -> list[Run | CheckpointError]:
        """Newest first; a run that fails validation is listed as its error."""
        query = select(sync_runs).order_by(sync_runs.c.created_at.desc()).limit(limit)
        if job is not None:
            query = query.where(sync_runs.c.job == job)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        out: list[Run | CheckpointError] = []
        for row in rows:
            try:
                out.append(self._load(row._mapping))
            except CheckpointError as exc:
                out.append(exc)
        return out

    def set_status(
        self, run_id: str, status: RunStatus, summary: dict[str, Any] | None = None
    ) -> None:
        now = _now()
        values: dict[str, Any] = {"status": status.value, "updated_at": now, "heartbeat_at": now}
        values["finished_at"] = now if status is not RunStatus.RUNNING else None
        if summary is not None:
            values["state"] = replace(self.get(run_id).state, summary=summary).to_json()
        with self.engine.begin() as conn:
            conn.execute(update(sync_runs).where(sync_runs.c.run_id == run_id).values(**values))

    def save_stream(self, conn: Connection, run_id: str, stream: dict[str, Any]) -> None:
        """Record a cursor stream's position on `conn`: the caller's transaction, after its
        data, so the saved cursor never runs ahead of the stored records."""
        text = conn.execute(select(sync_runs.c.state).where(sync_runs.c.run_id == run_id)).scalar()
        if text is None:
            raise CheckpointError(f"no checkpoint with run id {run_id}")
        state = replace(RunState.from_json(text), stream=dict(stream))
        now = _now()
        conn.execute(
            update(sync_runs)
            .where(sync_runs.c.run_id == run_id)
            .values(state=state.to_json(), updated_at=now, heartbeat_at=now)
        )

    def heartbeat(self, run_id: str, owner: str) -> bool:
        """Refresh the run's heartbeat; False if `owner` no longer holds it."""
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    update(sync_runs)
                    .where(
                        sync_runs.c.run_id == run_id,
                        sync_runs.c.owner == owner,
                        sync_runs.c.status == RunStatus.RUNNING.value,
                    )
                    .values(heartbeat_at=_now())
                ).rowcount
            )

    def delete(self, job: str, run_key: str | None = None) -> int:
        """Remove checkpoints (runs and their items); returns how many runs went."""
        cond = sync_runs.c.job == job
        if run_key is not None:
            cond = and_(cond, sync_runs.c.run_key == run_key)
        with self.engine.begin() as conn:
            ids = [r[0] for r in conn.execute(select(sync_runs.c.run_id).where(cond))]
            _drop_runs(conn, ids)
        return len(ids)

    def expire(self, older_than_days: int) -> int:
        """Drop completed checkpoints finished more than `older_than_days` ago."""
        cutoff = _now() - timedelta(days=older_than_days)
        with self.engine.begin() as conn:
            ids = [
                r[0]
                for r in conn.execute(
                    select(sync_runs.c.run_id).where(
                        sync_runs.c.status == RunStatus.COMPLETED.value,
                        sync_runs.c.finished_at < cutoff,
                    )
                )
            ]
            _drop_runs(conn, ids)
        return len(ids)

    def _load(self, row: Any) -> Run:
        job, run_key, run_id = row["job"], row["run_key"], row["run_id"]

        def corrupt(why: str) -> CheckpointError:
            return CheckpointError(
                f"checkpoint for {job} {run_key} (run {run_id}) is unusable: {why}. "
                f"Reset it with: {reset_command(job, run_key)}"
            )

        if row["version"] != CHECKPOINT_VERSION:
            raise corrupt(
                f"version {row['version']} is not the supported version {CHECKPOINT_VERSION}"
            )
        try:
            status = RunStatus(row["status"])
        except ValueError:
            raise corrupt(f"unknown status {row['status']!r}") from None
        try:
            state = RunState.from_json(row["state"])
        except (ValueError, TypeError) as exc:
            raise corrupt(f"state is not valid ({exc})") from None
        if (state.job, state.run_key) != (job, run_key):
            raise corrupt("state names a different run")
        return Run(
            run_id=run_id,
            job=job,
            run_key=run_key,
            status=status,
            created_at=_aware(row["created_at"]) or _now(),
            updated_at=_aware(row["updated_at"]) or _now(),
            heartbeat_at=_aware(row["heartbeat_at"]) or _now(),
            finished_at=_aware(row["finished_at"]),
            state=state,
        )

    # --- items ------------------------------------------------------------------------

    def add_items(self, run_id: str, stage: str, items: Iterable[str]) -> int:
        """Register a stage's universe as pending rows; items already there are kept.

        In chunks, in one transaction: each chunk asks only which of its own items are
        known (a primary-key lookup each), so memory follows the chunk, not the stage,
        however many items it has; a crash mid-way registers nothing.
        """
        added = 0
        with self.engine.begin() as conn:
            for chunk in _chunks(items, _CHUNK):
                # A duplicate in a later chunk is found by that chunk's lookup (this
                # transaction inserted it); within a chunk it is dropped here.
                chunk = list(dict.fromkeys(chunk))
                known = set(
                    conn.scalars(
                        select(sync_items.c.item).where(
                            sync_items.c.run_id == run_id,
                            sync_items.c.stage == stage,
                            sync_items.c.item.in_(chunk),
                        )
                    )
                )
                rows = [
                    {
                        "run_id": run_id,
                        "stage": stage,
                        "item": item,
                        "status": "pending",
                        "attempts": 0,
                    }
                    for item in chunk
                    if item not in known
                ]
                if rows:
                    conn.execute(insert(sync_items), rows)
                added += len(rows)
            _bump(conn, run_id, stage, Counter(untouched=added))
        return added

    def has_items(self, run_id: str, stage: str) -> bool:
        with self.engine.connect() as conn:
            return (
                conn.execute(
                    select(sync_items.c.item)
                    .where(sync_items.c.run_id == run_id, sync_items.c.stage == stage)
                    .limit(1)
                ).first()
                is not None
            )

    def items(self, run_id: str, stage: str, status: ItemStatus | None = None) -> list[str]:
        query = select(sync_items.c.item).where(
            sync_items.c.run_id == run_id, sync_items.c.stage == stage
        )
        if status is not None:
            query = query.where(sync_items.c.status == status.value)
        with self.engine.connect() as conn:
            return list(conn.scalars(query.order_by(sync_items.c.item)))

    def transient_failures(self, run_id: str, stage: str) -> list[str]:
        """A stage's items whose last attempt failed transiently: the next pass's items."""
        query = select(sync_items.c.item).where(
            sync_items.c.run_id == run_id,
            sync_items.c.stage == stage,
            sync_items.c.status == ItemStatus.FAILED.value,
            sync_items.c.error_kind == ErrorKind.TRANSIENT.value,
        )
        with self.engine.connect() as conn:
            return list(conn.scalars(query.order_by(sync_items.c.item)))

    def last_batch_no(self, run_id: str, stage: str) -> int:
        with self.engine.connect() as conn:
            value = conn.execute(
                select(func.max(sync_items.c.batch_no)).where(
                    sync_items.c.run_id == run_id, sync_items.c.stage == stage
                )
            ).scalar()
        return int(value or 0)

    def settled_without_fetch(self, run_id: str, stage: str) -> int:
        """Items done without a batch (e.g. already cached): they cost no request."""
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(
                        sync_items.c.run_id == run_id,
                        sync_items.c.stage == stage,
                        sync_items.c.status == ItemStatus.DONE.value,
                        sync_items.c.batch_no.is_(None),
                    )
                ).scalar_one()
            )

    def requeue_failed(self, run_id: str, stage: str) -> list[str]:
        """Make a stage's failed items (permanent ones included) pending again; their names."""
        failed = (
            sync_items.c.run_id == run_id,
            sync_items.c.stage == stage,
            sync_items.c.status == ItemStatus.FAILED.value,
        )
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(sync_items.c.item, sync_items.c.error_kind).where(*failed)
            ).all()
            conn.execute(
                update(sync_items)
                .where(*failed)
                .values(status=ItemStatus.PENDING.value, error_kind=None, updated_at=_now())
            )
            moved = Counter(untouched=len(rows))
            moved.subtract(bucket(ItemStatus.FAILED.value, r.error_kind) for r in rows)
            _bump(conn, run_id, stage, moved)
        return sorted(r.item for r in rows)

    def pending(self, run_id: str, stage: str) -> list[PendingItem]:
        """Universe - done - permanently failed, in a stable order (all of it: for a large
        stage, read pending_pages instead)."""
        return [p for page in self.pending_pages(run_id, stage) for p in page]

    def pending_pages(
        self, run_id: str, stage: str, page_size: int = PENDING_PAGE
    ) -> Iterator[list[PendingItem]]:
        """The pending items in pages of `page_size`, in item order, read as they are
        consumed: memory holds a page, not the stage.

        Keyset pagination (`item > last item seen`, on the primary key): each page costs
        the same at any depth, and items marked while the pages are read (the batches
        this plan feeds) can neither shift a page nor come round twice.
        """
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        after: str | None = None
        while True:
            query = (
                select(sync_items.c.item, sync_items.c.attempts)
                .where(
                    sync_items.c.run_id == run_id,
                    sync_items.c.stage == stage,
                    (sync_items.c.status == ItemStatus.PENDING.value)
                    | (sync_items.c.error_kind == ErrorKind.TRANSIENT.value),
                )
                .order_by(sync_items.c.item)
                .limit(page_size)
            )
            if after is not None:
                query = query.where(sync_items.c.item > after)
            with self.engine.connect() as conn:
                page = [PendingItem(r.item, r.attempts) for r in conn.execute(query)]
            if not page:
                return
            yield page
            if len(page) < page_size:
                return
            after = page[-1].item

    def lease(
        self,
        run_id: str,
        stage: str,
        owner: str,
        size: int,
        seconds: float,
        *,
        retry_below: int | None = None,
    ) -> Lease | None:
        """Lease the next `size` items of a stage to `owner` for `seconds`, as the next
        batch; None when no such item is free.

        The items are the untouched ones (status pending); with `retry_below`, instead
        the transient failures attempted fewer than that many times: a second pass that
        cannot come round to the same failure forever. An item under a lease that has
        not run out is nobody else's. An expired lease is anyone's to take: a worker that
        died costs its leased batches, once the lease runs out. Leases of one run take
        turns (the run's row is written first: its row lock on PostgreSQL, the write lock
        on SQLite), so batch numbers are unique; the items are taken with an UPDATE that repeats its
        conditions, so an item marked meanwhile is never leased again.
        """
        if size < 1 or seconds <= 0:
            raise ValueError("size must be at least 1 and seconds positive")
        item = sync_items.c
        here = (item.run_id == run_id, item.stage == stage)
        with self.engine.begin() as conn:
            now = _db_now(conn)
            taken = conn.execute(
                update(sync_runs).where(sync_runs.c.run_id == run_id).values(updated_at=now)
            )
            if taken.rowcount != 1:
                raise CheckpointError(f"no run {run_id} to lease items of")
            wanted = (
                (item.status == ItemStatus.PENDING.value,)
                if retry_below is None
                else (
                    item.status == ItemStatus.FAILED.value,
                    item.error_kind == ErrorKind.TRANSIENT.value,
                    item.attempts < retry_below,
                )
            )
            free = (*wanted, item.lease_until.is_(None) | (item.lease_until <= now))
            candidates = (
                select(item.item)
                .where(*here, *free)
                .order_by(item.item)
                .limit(size)
                .with_for_update(skip_locked=True)  # PostgreSQL; SQLite has no row locks
            )
            chosen = list(conn.execute(candidates).scalars())
            if not chosen:
                return None
            number = self._next_leased_batch(conn, run_id, stage)
            until = now + timedelta(seconds=seconds)
            rows = conn.execute(
                update(sync_items)
                .where(*here, *free, item.item.in_(chosen))
                .values(lease_owner=owner, lease_until=until, batch_no=number)
                .returning(item.item, item.attempts)
            ).all()
        leased = tuple(sorted((PendingItem(r.item, r.attempts) for r in rows), key=_by_item))
        return Lease(run_id, stage, number, owner, leased, until) if leased else None

    def _next_leased_batch(self, conn: Connection, run_id: str, stage: str) -> int:
        counter = (
            sync_item_counts.c.run_id == run_id,
            sync_item_counts.c.stage == stage,
            sync_item_counts.c.bucket == _LEASED_BATCHES,
        )
        last = conn.execute(select(sync_item_counts.c.n).where(*counter)).scalar()
        if last is None:
            # The stage's first lease: continue after batches planned without leases.
            start = conn.execute(
                select(func.max(sync_items.c.batch_no)).where(
                    sync_items.c.run_id == run_id, sync_items.c.stage == stage
                )
            ).scalar()
            number = int(start or 0) + 1
            conn.execute(
                insert(sync_item_counts).values(
                    run_id=run_id, stage=stage, bucket=_LEASED_BATCHES, n=number
                )
            )
            return number
        conn.execute(update(sync_item_counts).where(*counter).values(n=last + 1))
        return int(last) + 1

    def renew(self, run_id: str, owner: str, seconds: float) -> int:
        """Extend every lease `owner` still holds in a run to `seconds` from now; how many
        items that covers. A lease that has run out is not renewed (its items may be
        someone else's by now): its marks will be refused."""
        item = sync_items.c
        with self.engine.begin() as conn:
            now = _db_now(conn)
            return int(
                conn.execute(
                    update(sync_items)
                    .where(item.run_id == run_id, item.lease_owner == owner, item.lease_until > now)
                    .values(lease_until=now + timedelta(seconds=seconds))
                ).rowcount
            )

    def release_lease(self, lease: Lease) -> None:
        """Give up what is still this lease's (its items free at once, for anyone): after
        its marks were refused, so that no item stays held by a worker that will not
        store it."""
        item = sync_items.c
        with self.engine.begin() as conn:
            conn.execute(
                update(sync_items)
                .where(
                    item.run_id == lease.run_id,
                    item.stage == lease.stage,
                    item.item.in_([p.item for p in lease.items]),
                    item.lease_owner == lease.owner,
                )
                .values(lease_owner=None, lease_until=None)
            )

    def count_pending(self, run_id: str, stage: str) -> int:
        """How many items pending_pages would yield now (two rows of the counts read)."""
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.coalesce(func.sum(sync_item_counts.c.n), 0)).where(
                        sync_item_counts.c.run_id == run_id,
                        sync_item_counts.c.stage == stage,
                        sync_item_counts.c.bucket.in_(("untouched", "retrying")),
                    )
                ).scalar_one()
            )

    def mark(
        self,
        conn: Connection,
        run_id: str,
        stage: str,
        outcomes: Sequence[ItemOutcome],
        batch_no: int | None = None,
        lease: Lease | None = None,
    ) -> None:
        """Record a batch's outcomes on `conn`: the caller's transaction, after its data.

        With `lease` (a sharded run), every item must still be leased to its owner, by
        the database's clock, or LeaseLost is raised and nothing is marked: the caller's
        transaction, the batch's rows with it, rolls back. On PostgreSQL the items' rows
        stay locked until that transaction ends, so nobody can lease them in between.
        """
        if not outcomes:
            return
        now = _now()
        # Each item's last outcome, and the items by the outcome they share: a batch is
        # marked in a statement per distinct outcome (one, when all went well), not one
        # per item. On SQLite every statement stepped, and every row read, lets go of the
        # GIL, and while the stage's HTTP loop keeps another thread busy, taking it back
        # waits up to a switch interval (5 ms): marking 50 items one by one took longer
        # than fetching them.
        last = {o.item: o for o in outcomes}
        shared: dict[tuple[str, str | None, str | None], list[str]] = {}
        for o in last.values():
            kind = o.error_kind.value if o.error_kind else None
            shared.setdefault((o.status.value, kind, o.error), []).append(o.item)
        # Where the items were before, so the counts move with them (a batch's rows by
        # primary key: the cost follows the batch, not the run).
        deltas: Counter[str] = Counter()
        if lease is None:
            for chunk in _chunks(last, _CHUNK):
                bound = {"m_run": run_id, "m_stage": stage, "m_items": chunk}
                for status, kind, n in conn.execute(_MARKED_BEFORE_COUNTS, bound):
                    deltas[bucket(status, kind)] -= int(n)
        else:
            held: dict[str, tuple[str | None, datetime | None]] = {}
            for chunk in _chunks(last, _CHUNK):
                bound = {"m_run": run_id, "m_stage": stage, "m_items": chunk}
                for item, status, kind, owner, until in conn.execute(_MARKED_BEFORE_LOCKED, bound):
                    deltas[bucket(status, kind)] -= 1
                    held[item] = (owner, _aware(until))
            _fence(lease, list(last), held, _db_now(conn))
        for (status, kind, error), items in shared.items():
            for chunk in _chunks(items, _CHUNK):
                marked: dict[str, Any] = {
                    "b_run": run_id,
                    "b_stage": stage,
                    "b_items": chunk,
                    "b_status": status,
                    "b_kind": kind,
                    "b_error": error,
                    "b_batch": batch_no,
                    "b_now": now,
                }
                # An item the ledger does not hold is not updated, nor counted.
                deltas[bucket(status, kind)] += conn.execute(_MARK, marked).rowcount
        _bump(conn, run_id, stage, deltas)
        conn.execute(_MARKED_AT, {"r_run": run_id, "r_now": now})

    def counts(self, run_id: str, stage: str | None = None) -> dict[str, StageCounts]:
        """Items per stage by bucket; only `stage`'s when given. A few rows of
        sync_item_counts at any run size (the ledger keeps them as items change)."""
        query = select(
            sync_item_counts.c.stage, sync_item_counts.c.bucket, sync_item_counts.c.n
        ).where(sync_item_counts.c.run_id == run_id)
        if stage is not None:
            query = query.where(sync_item_counts.c.stage == stage)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        tally: dict[str, dict[str, int]] = {}
        for name, kind, n in rows:
            if kind in BUCKETS:
                tally.setdefault(name, dict.fromkeys(BUCKETS, 0))[kind] += int(n)
        return {
            name: StageCounts(total=sum(t.values()), **t)
            for name, t in tally.items()
            if sum(t.values()) > 0
        }

    def failures(self, run_id: str, limit: int = 100) -> list[ItemFailure]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(sync_items)
                .where(
                    sync_items.c.run_id == run_id,
                    sync_items.c.status == ItemStatus.FAILED.value,
                )
                .order_by(sync_items.c.stage, sync_items.c.item)
                .limit(limit)
            ).all()
        return [
            ItemFailure(
                r.stage, r.item, r.error_kind or "", r.attempts, r.last_error or "", r.batch_no
            )
            for r in rows
        ]
