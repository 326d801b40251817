"""The generic checkpointed map: plan pending items, chunk them, fetch, store, mark.

Two skip layers keep a rerun from spending API quota twice:
- the ledger decides which items are pending (universe - done - permanently failed);
- the fetch task is cached on (source, run, stage, items with their attempt counts), so
  a retry after a failed store step reuses the fetched batch instead of refetching it.
  Every item of a stored batch gets a mark (its attempts go up), so a batch whose store
  committed can never hit a stale cache entry again.

Pipelining: two batches fetch at once and the batch before them is stored beside them.
Both fetches draw on one stage-wide RequestSlots, first come first served, so the next
batch only takes the slots the current batch's tail frees: `concurrency` stays exact and
no slot idles at a boundary (a rate-limited run keeps its pace; bench cases 1 and 2).
A crash finds at most three batches fetched-but-unmarked; the persisted fetch cache
gives back every one whose fetch had finished, so a rerun refetches far less.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, ClassVar, Protocol, cast

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture
from prefect.utilities.annotations import quote
from sqlalchemy import Connection

from syncpoint.checkpoint import ErrorKind, ItemOutcome, Ledger, PendingItem, StageCounts
from syncpoint.db import Database, storage_errors
from syncpoint.errors import FatalApiError, ItemError, RetriableApiError
from syncpoint.http import ApiClient
from syncpoint.interrupts import StopFlag
from syncpoint.redact import redact
from syncpoint.request_slots import RequestSlots
from tasks.store import upsert

FETCH_CACHE_TTL = timedelta(days=3)
# Batches fetching at once. Two keep the slots busy across a boundary; more would only
# widen what a crash leaves fetched-but-unmarked.
FETCHES_IN_FLIGHT = 2
# What a crash can leave fetched-but-unmarked: the fetches in flight and the batch storing.
UNMARKED_BATCHES_AT_MOST = FETCHES_IN_FLIGHT + 1


class Source(Protocol):
    """One dataset of one API; one module per source implements it."""

    table: ClassVar[str]

    @property
    def concurrency(self) -> int: ...

    def cache_identity(self) -> str: ...

    def client(self) -> ApiClient: ...

    async def fetch(self, client: ApiClient, item: str) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class Batch:
    run_id: str
    stage: str
    number: int
    items: tuple[PendingItem, ...]


@dataclass
class BatchOutcome:
    batch: Batch
    rows: list[dict[str, Any]]
    outcomes: list[ItemOutcome]
    requests: int = 0
    fatal: str | None = None

    def count(self, predicate: Callable[[ItemOutcome], bool]) -> int:
        return sum(1 for o in self.outcomes if predicate(o))


def batch_cache_key(_context: TaskRunContext, parameters: dict[str, Any]) -> str:
    source: Source = parameters["source"]
    batch: Batch = parameters["batch"]
    identity = [
        source.cache_identity(),
        batch.run_id,
        batch.stage,
        [(p.item, p.attempts) for p in batch.items],
    ]
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
    return f"syncpoint-fetch-{digest}"


@task(
    name="fetch-batch",
    task_run_name="fetch {batch.stage} #{batch.number}",
    cache_key_fn=batch_cache_key,
    cache_expiration=FETCH_CACHE_TTL,
    persist_result=True,
)
async def fetch_batch(source: Source, batch: Batch, slots: RequestSlots) -> BatchOutcome:
    """Fetch every item of a batch; each ends done or failed, none is left unaccounted.

    `slots` is the stage's gate (not part of the cache key): it bounds the requests in
    flight across this batch and the next, and a refused key closes it for both.
    """

    async def one(
        client: ApiClient, pending: PendingItem
    ) -> tuple[list[dict[str, Any]], ItemOutcome]:
        item = pending.item
        async with slots:
            if slots.closed:
                return [], ItemOutcome.failed(
                    item, ErrorKind.TRANSIENT, f"not attempted: {slots.closed}"
                )
            try:
                return await source.fetch(client, item), ItemOutcome.done(item)
            except ItemError as exc:
                return [], ItemOutcome.failed(item, ErrorKind.PERMANENT, redact(str(exc)))
            except RetriableApiError as exc:
                return [], ItemOutcome.failed(item, ErrorKind.TRANSIENT, redact(str(exc)))
            except FatalApiError as exc:
                # Stop sending at once: every further request would be refused too.
                reason = redact(str(exc))
                slots.close(reason)
                return [], ItemOutcome.failed(item, ErrorKind.TRANSIENT, reason)

    async with source.client() as client:
        results = await asyncio.gather(*(one(client, p) for p in batch.items))
        requests = client.requests_sent
    rows = [row for item_rows, _ in results for row in item_rows]
    return BatchOutcome(batch, rows, [o for _, o in results], requests, slots.closed)


@task(
    name="store-batch",
    task_run_name="store {outcome.batch.stage} #{outcome.batch.number}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[1, 5],
)
def store_batch(data: Database, checkpoints: Database, table: str, outcome: BatchOutcome) -> int:
    """Upsert the batch's rows, then mark its items: data first, marks after."""
    ledger = Ledger(checkpoints.engine())
    batch = outcome.batch
    return write_then_checkpoint(
        data,
        checkpoints,
        table,
        outcome.rows,
        lambda conn: ledger.mark(conn, batch.run_id, batch.stage, outcome.outcomes, batch.number),
    )


def write_then_checkpoint(
    data: Database,
    checkpoints: Database,
    table: str,
    rows: list[dict[str, Any]],
    checkpoint: Callable[[Connection], None],
) -> int:
    """Upsert `rows`, then record progress with `checkpoint`: one transaction when data
    and checkpoints share a database, else data first, so progress never runs ahead."""
    if data.same_as(checkpoints):
        with storage_errors(data.describe()), data.engine().begin() as conn:
            written = upsert(conn, table, rows)
            checkpoint(conn)
        return written
    with storage_errors(data.describe()), data.engine().begin() as conn:
        written = upsert(conn, table, rows)
    with storage_errors(checkpoints.describe()), checkpoints.engine().begin() as conn:
        checkpoint(conn)
    return written


@dataclass
class Progress:
    stage: str
    batches_done: int
    batches_total: int
    done: int
    failed: int
    retrying: int
    total: int
    processed_now: int
    planned_now: int
    elapsed: float

    @property
    def rate(self) -> float:
        return self.processed_now / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        left = self.planned_now - self.processed_now
        return left / self.rate if self.rate > 0 else None

    def line(self) -> str:
        pct = 100.0 * (self.done + self.failed) / self.total if self.total else 100.0
        eta = f", ~{self.eta_seconds:.0f}s left" if self.eta_seconds is not None else ""
        return (
            f"{self.stage}: {self.done + self.failed}/{self.total} settled ({pct:.1f}%), "
            f"{self.failed} failed, {self.retrying} to retry, batch {self.batches_done}/"
            f"{self.batches_total}, {self.rate:.1f} items/s{eta}"
        )


@dataclass
class StageRun:
    """What one stage did in this invocation."""

    rows_written: int = 0
    requests: int = 0
    batches: int = 0
    items_processed: int = 0
    fatal: str | None = None
    outcomes: list[ItemOutcome] = field(default_factory=list)


def map_batches(
    *,
    ledger: Ledger,
    data: Database,
    checkpoints: Database,
    run_id: str,
    stage: str,
    source: Source,
    batch_size: int,
    max_items: int | None,
    stop: StopFlag,
    on_progress: Callable[[Progress], None],
    max_batches: int | None = None,
    only: frozenset[str] | None = None,
) -> StageRun:
    """Run a stage's pending items in batches until done, capped, stopped or fatal.

    `max_items` / `max_batches` cap this invocation (the rest stays pending); `only`
    restricts it to those items. Batch numbers continue across invocations of a run.
    """
    pending = ledger.pending(run_id, stage)
    if only is not None:
        pending = [p for p in pending if p.item in only]
    if max_batches is not None:
        pending = pending[: max_batches * batch_size]
    planned = pending if max_items is None else pending[:max_items]
    first = ledger.last_batch_no(run_id, stage) + 1
    batches = [
        Batch(run_id, stage, number, tuple(planned[start : start + batch_size]))
        for number, start in enumerate(range(0, len(planned), batch_size), first)
    ]
    base = ledger.counts(run_id).get(stage, StageCounts())
    tally = {"done": base.done, "failed": base.failed, "retrying": base.retrying}
    result = StageRun()
    started = time.monotonic()
    slots = RequestSlots(source.concurrency)
    upcoming = iter(batches)
    fetching: deque[PrefectFuture[BatchOutcome]] = deque()
    storing: tuple[BatchOutcome, PrefectFuture[int]] | None = None

    def fetch_next() -> None:
        if stop.requested or result.fatal:
            return  # no new batch; the ones in flight still finish and are stored
        batch = next(upcoming, None)
        if batch is not None:
            # Prefect types an async task's future as one of a coroutine; it holds the value.
            future = fetch_batch.submit(source, batch, slots)
            fetching.append(cast(PrefectFuture[BatchOutcome], future))

    def settle(outcome: BatchOutcome, future: PrefectFuture[int]) -> None:
        result.rows_written += future.result()
        result.batches += 1
        result.items_processed += len(outcome.outcomes)
        result.outcomes.extend(outcome.outcomes)
        retried = {p.item for p in outcome.batch.items if p.attempts > 0}
        for o in outcome.outcomes:
            if o.item in retried:
                tally["retrying"] -= 1
            tally[_bucket(o)] += 1
        on_progress(
            Progress(
                stage=stage,
                batches_done=result.batches,
                batches_total=len(batches),
                done=tally["done"],
                failed=tally["failed"],
                retrying=tally["retrying"],
                total=base.total,
                processed_now=result.items_processed,
                planned_now=len(planned),
                elapsed=time.monotonic() - started,
            )
        )

    try:
        for _ in range(FETCHES_IN_FLIGHT):
            fetch_next()
        while fetching:
            outcome = fetching.popleft().result()
            result.requests += outcome.requests
            result.fatal = result.fatal or outcome.fatal
            if storing is not None:
                previous, storing = storing, None
                settle(*previous)
            # quote(): Prefect would otherwise walk every row of the batch looking for
            # futures to wait on, which costs more than storing them (bench case 1).
            storing = (
                outcome,
                store_batch.submit(
                    data,
                    checkpoints,
                    source.table,
                    cast(BatchOutcome, quote(outcome)),  # Prefect unwraps it for the task
                ),
            )
            # Only now: the previous batch is marked, so at most FETCHES_IN_FLIGHT + 1
            # batches are ever fetched-but-unmarked.
            fetch_next()
    finally:
        # Leaving early (a store failed, the flow is being torn down): let the fetches in
        # flight finish, so their results reach the fetch cache for the rerun and no
        # thread goes on sending after the stage has ended.
        for future in fetching:
            future.wait()
        # A batch that was fetched is always stored before the stage ends, whatever ended it.
        if storing is not None:
            settle(*storing)
    return result


def _bucket(outcome: ItemOutcome) -> str:
    if outcome.error_kind is None:
        return "done"
    return "retrying" if outcome.error_kind is ErrorKind.TRANSIENT else "failed"
