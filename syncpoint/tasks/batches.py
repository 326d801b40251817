"""The batch steps: fetch batches' items from a source (a Prefect task run per window of
batches), store each batch's rows and marks.

Every fetched batch is recorded in Prefect's result storage under a key of (source, run,
stage, items with their attempt counts) before it is stored, so a retry after a failed
store step, or after a crash, reuses the fetched batch instead of spending quota on it
again. Every item of a stored batch gets a mark (its attempts go up), so a batch whose
store committed can never hit a stale record again.

Nothing one item does fails its batch: an answer the source's parser refuses, and any
exception nobody foresaw, fail that item with the reason; rows the database refuses fail
their item at store time (write_items_then_checkpoint), and the rest are stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar, cast

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.results import ResultStore
from prefect.types._datetime import DateTime
from prefect.types._datetime import now as prefect_now

from syncpoint.core.db import Database
from syncpoint.core.errors import ConfigError, FatalApiError, ItemError, RetriableApiError
from syncpoint.core.http import ApiClient, ClientThread
from syncpoint.core.interrupts import StopFlag
from syncpoint.core.ledger import ErrorKind, ItemOutcome, Lease, LeaseLost, Ledger, PendingItem
from syncpoint.core.redact import redact
from syncpoint.core.request_slots import RequestSlots
from syncpoint.core.store import ItemRows, write_items_then_checkpoint
from syncpoint.sources.source import Source
from syncpoint.tasks.fetch_records import fetch_cache

FETCH_CACHE_TTL = timedelta(days=3)

T = TypeVar("T")

Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]


@dataclass(frozen=True)
class Batch:
    run_id: str
    stage: str
    number: int
    items: tuple[PendingItem, ...]
    # A sharded run's batch is leased (Ledger.lease): its marks are fenced by the lease.
    # Not part of the fetch cache key: a batch taken over after a lease ran out reuses
    # what its first holder fetched. None in batches cached by an older syncpoint.
    lease: Lease | None = None


@dataclass
class BatchOutcome:
    batch: Batch
    rows: list[dict[str, Any]]
    outcomes: list[ItemOutcome]
    requests: int = 0
    fatal: str | None = None
    # How many of `rows`, in order, belong to each outcome's item, so a batch the database
    # refuses can be stored item by item. None in a batch cached by an older syncpoint
    # (unpickled without it, it reads this class default).
    row_counts: list[int] | None = None

    def count(self, predicate: Callable[[ItemOutcome], bool]) -> int:
        return sum(1 for o in self.outcomes if predicate(o))

    def units(self) -> list[ItemRows]:
        """The rows by the item they belong to, as store_batch writes them."""
        if self.row_counts is None:
            return [ItemRows(self.rows, self.outcomes)]
        units, start = [], 0
        for outcome, count in zip(self.outcomes, self.row_counts, strict=True):
            units.append(ItemRows(self.rows[start : start + count], [outcome]))
            start += count
        return units


def batch_cache_key(source: Source, batch: Batch) -> str:
    """The fetch cache's key for a batch: source, run, stage, items and their attempts."""
    identity = [
        source.cache_identity(),
        batch.run_id,
        batch.stage,
        [(p.item, p.attempts) for p in batch.items],
    ]
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
    return f"syncpoint-fetch-{digest}"


def cached_outcome(cache: ResultStore, key: str) -> BatchOutcome | None:
    """The batch an earlier attempt fetched, if its record is there, unexpired and whole; a
    record that cannot be read counts as absent (the batch is fetched again)."""
    try:
        if not cache.exists(key):
            return None
        found = cache.read(key).result
    except Exception:
        return None
    return found if isinstance(found, BatchOutcome) else None


@dataclass(frozen=True)
class Fetched:
    """A batch as the fetch step hands it to the stage: `reused` when an earlier attempt's
    record answered it and no request went out now."""

    outcome: BatchOutcome
    reused: bool = False


class Handoff:
    """One batch handed from its fetch to the stage's thread: set once, taken once. What
    is taken is dropped here: a window's batches must not stay in memory with it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._value: Fetched | None = None
        self._error: BaseException | None = None

    def put(self, value: Fetched | None) -> None:
        with self._lock:
            if not self._ready.is_set():
                self._value = value
                self._ready.set()

    def fail(self, error: BaseException) -> None:
        """Unless a batch was put already: taking raises `error`."""
        with self._lock:
            if not self._ready.is_set():
                self._error = error
                self._ready.set()

    def take(self) -> Fetched | None:
        """Wait for the batch; None if it was not started (the stage stopped starting
        batches, or the API key was refused first), and its items stay pending."""
        self._ready.wait()
        with self._lock:
            value, self._value = self._value, None
        if self._error is not None:
            raise self._error
        return value


class BatchGate:
    """Which of a stage's batches may fetch, by position (in the stage's order, from 0).

    Two bounds, whichever task run (window) a batch is in:
    - at most `fetching` batches fetching at once, admitted and not yet recorded: what a
      crash can make a rerun fetch again;
    - at most `ahead` batches admitted and not yet taken by the stage's thread: what of
      the fetched rows is in memory.

    Counted apart, so that a batch whose last item is slow does not hold back those after
    it: they are recorded and wait to be stored, and later batches fetch meanwhile. With
    a single bound on both, batches of five with 16 request slots kept 12 requests in
    flight on average, not 16. Admission goes by position, lowest first, not arrival, so
    the batch the stage waits for next is always admitted. Used on the client's loop;
    `taken()` may be called from any thread.
    """

    def __init__(self, fetching: int, ahead: int, clients: ClientThread) -> None:
        if not 1 <= fetching <= ahead:
            raise ValueError(f"need 1 <= fetching <= ahead, got {fetching} and {ahead}")
        self.fetching = fetching
        self.ahead = ahead
        self._clients = clients
        self._taken = 0
        self._in_fetch = 0
        self._waiting: dict[int, asyncio.Future[None]] = {}

    def _room(self, position: int) -> bool:
        return self._in_fetch < self.fetching and position < self._taken + self.ahead

    async def admit(self, position: int) -> None:
        """Wait until the batch at `position` may fetch; call `fetched()` once it ends."""
        if self._room(position) and not any(p < position for p in self._waiting):
            self._in_fetch += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[position] = waiter
        try:
            await waiter  # _advance counts it in before waking it
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.fetched()  # admitted as the cancel landed: give the room back
            raise
        finally:
            self._waiting.pop(position, None)

    def fetched(self) -> None:
        """An admitted batch no longer fetches: handed back, reused, not started or failed."""
        self._in_fetch -= 1
        self._advance()

    def taken(self) -> None:
        """The stage's thread took its next batch: one more may start."""
        self._clients.call_soon(self._take)

    def _take(self) -> None:
        self._taken += 1
        self._advance()

    def _advance(self) -> None:
        for position in sorted(self._waiting):
            waiter = self._waiting[position]
            if waiter.done():
                continue
            if not self._room(position):
                return  # lower positions first: none overtakes the batch the stage needs
            self._in_fetch += 1
            waiter.set_result(None)


class Halt:
    """Whether a stage has stopped starting batches: a stop was requested for the run, or
    the stage is leaving early (a store failed). Batches not started by then are handed
    back as None and their items stay pending; those started finish."""

    def __init__(self, stop: StopFlag) -> None:
        self._stop = stop
        self._leaving = False

    def leave(self) -> None:
        self._leaving = True

    @property
    def requested(self) -> bool:
        return self._leaving or self._stop.requested


@dataclass(frozen=True)
class Window:
    """Consecutive batches one fetch task run takes, each handed back on its own Handoff
    as soon as it is fetched and recorded."""

    batches: tuple[Batch, ...]
    handoffs: tuple[Handoff, ...]
    first: int = 0  # the first batch's position in the stage (see BatchGate)

    @classmethod
    def of(cls, batches: Sequence[Batch], first: int = 0) -> Window:
        return cls(tuple(batches), tuple(Handoff() for _ in batches), first)

    def fail_untaken(self, why: BaseException) -> None:
        """Every batch not handed back yet fails with `why` (its fetch task ended early)."""
        for handoff in self.handoffs:
            handoff.fail(why)


def window_run_name() -> str:
    """`fetch prices #12-#16`: the batches a fetch task run took."""
    from prefect.runtime import task_run

    window: Window = task_run.parameters["window"]
    first, last = window.batches[0], window.batches[-1]
    numbers = f"#{first.number}" if first is last else f"#{first.number}-#{last.number}"
    return f"fetch {first.stage} {numbers}"


@task(
    name="fetch-batches",
    task_run_name=window_run_name,
    # The cache is per batch (fetch_cache), not per task run: a rerun plans its windows
    # anew, and a batch fetched by any earlier attempt is reused whichever window takes it.
    cache_policy=NO_CACHE,
    persist_result=False,
)
def fetch_window(
    source: Source,
    window: Window,
    slots: RequestSlots,
    clients: ClientThread,
    gate: BatchGate,
    halt: Halt,
) -> None:
    """Fetch a window of batches, handing each back (window.handoffs) once its record is
    written: every item ends done or failed, none is left unaccounted.

    One task run per window, not per batch: a task run costs ~5 ms of CPU here and its
    events ~30 ms more on the Prefect server, so at 50 tickers a batch they were a third
    of a run's span (bench case 1) and at fill-cache's 5 most of it (case 8). The
    checkpoint's grain stays the batch: each is recorded, handed back and stored alone.

    `slots` is the stage's request gate: it bounds the requests in flight across every
    batch, and a refused key closes it. `gate` admits the stage's batches in order, across
    windows, so only so many are fetching or waiting to be stored; `halt` says when to
    start no more. `clients` is the stage's open client: the items run on its loop and
    reuse its connections.

    A sync task on purpose: Prefect runs an async task on a new event loop with a new API
    client of its own; a sync task reuses the flow's, and the items' I/O is on the
    client's loop either way.
    """
    # Taken here, in the task's context: the items run on the client's own thread and
    # loop, where Prefect has no run context to find a logger in.
    logger = get_run_logger()
    cache = fetch_cache()

    def record(key: str, outcome: BatchOutcome) -> None:
        # Prefect's own clock and datetime type, as its task engine stamps expirations.
        expires = cast(DateTime, prefect_now("UTC") + FETCH_CACHE_TTL)
        cache.write(obj=outcome, key=key, expiration=expires)

    async def one_batch(client: ApiClient, position: int, batch: Batch, handoff: Handoff) -> None:
        try:
            await gate.admit(position)
        except BaseException as exc:
            handoff.fail(exc)
            raise
        try:
            if halt.requested or slots.closed:
                handoff.put(None)
                return
            key = batch_cache_key(source, batch)
            found = await asyncio.to_thread(cached_outcome, cache, key)
            if found is not None:
                handoff.put(Fetched(found, reused=True))
                return
            outcome = await fetch_items(client.share(), source, batch, slots, logger)
            # Recorded before it is handed back: a stored batch always had its record.
            await asyncio.to_thread(record, key, outcome)
            handoff.put(Fetched(outcome))
        except BaseException as exc:
            handoff.fail(exc)
            raise
        finally:
            gate.fetched()

    async def every_batch(client: ApiClient) -> None:
        await gather_or_cancel(
            one_batch(client, window.first + n, batch, handoff)
            for n, (batch, handoff) in enumerate(zip(window.batches, window.handoffs, strict=True))
        )

    clients.run(every_batch)


async def gather_or_cancel(work: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run `work` concurrently; if one raises, cancel the rest before raising.

    gather() leaves the others running when one raises: on the stage's client loop they
    would outlive their task run, waiting for slots or a gate nobody serves."""
    running = [asyncio.ensure_future(w) for w in work]
    try:
        return list(await asyncio.gather(*running))
    except BaseException:
        for job in running:
            job.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        raise


async def fetch_items(
    client: ApiClient, source: Source, batch: Batch, slots: RequestSlots, logger: Logger
) -> BatchOutcome:
    """Every item of a batch, concurrently, on `client` (a share() of the stage's: its
    request count is this batch's)."""

    async def one(pending: PendingItem) -> tuple[list[dict[str, Any]], ItemOutcome]:
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
            except ConfigError:
                raise  # the API's URL itself is unusable: every item would fail alike
            except Exception as exc:
                # A bug, or an answer nothing above foresaw: it costs this item, not the
                # batch or the run. Permanent: the same answer would fail the same way.
                reason = unexpected(exc)
                logger.warning("%s: %s", item, reason)
                return [], ItemOutcome.failed(item, ErrorKind.PERMANENT, reason)

    results = await gather_or_cancel(one(p) for p in batch.items)
    rows = [row for item_rows, _ in results for row in item_rows]
    return BatchOutcome(
        batch,
        rows,
        [o for _, o in results],
        client.requests_sent,
        slots.closed,
        row_counts=[len(item_rows) for item_rows, _ in results],
    )


def unexpected(exc: BaseException) -> str:
    """An unforeseen exception as an item's reason: its type and first line, redacted."""
    lines = str(exc).strip().splitlines()
    return redact(f"unexpected error: {type(exc).__name__}: {lines[0] if lines else ''}")[:300]


# A store that failed (a dropped connection, a lock that timed out) is tried again after
# these pauses; then the stage fails, and the rerun stores the batch from the fetch cache.
STORE_RETRY_DELAYS = (1.0, 5.0)


def store_batch(
    data: Database,
    checkpoints: Database,
    table: str,
    outcome: BatchOutcome,
    logger: Logger,
    *,
    delays: Sequence[float] = STORE_RETRY_DELAYS,
) -> int:
    """Upsert the batch's rows, then mark its items: data first, marks after. Items
    whose rows the database refuses are marked failed with its reason instead.

    Not a Prefect task: a task run costs a few milliseconds of CPU and API events, paid
    per batch, and a store has nothing to cache; the fetch task before it is the one whose
    result a retry reuses.

    A leased batch whose lease ran out raises LeaseLost, writes nothing and is not
    retried: another worker has its items now (a retry would be refused the same way)."""
    ledger = Ledger(checkpoints.engine())
    batch = outcome.batch
    for delay in (*delays, None):
        try:
            written, marked = write_items_then_checkpoint(
                data,
                checkpoints,
                table,
                outcome.units(),
                lambda conn, outcomes: ledger.mark(
                    conn, batch.run_id, batch.stage, outcomes, batch.number, lease=batch.lease
                ),
            )
            break
        except LeaseLost:
            raise
        except Exception as exc:
            if delay is None:
                raise
            logger.warning(
                "storing %s #%d failed (%s); trying again in %.0f s",
                batch.stage,
                batch.number,
                unexpected(exc).removeprefix("unexpected error: "),
                delay,
            )
            time.sleep(delay)
    for before, after in zip(outcome.outcomes, marked, strict=True):
        if after != before:
            logger.warning("%s: %s", after.item, after.error)
    return written
