"""The batch steps: fetch a batch's items from a source (a Prefect task), store its rows
and marks.

The fetch task is cached on (source, run, stage, items with their attempt counts), so a
retry after a failed store step reuses the fetched batch instead of spending quota on it
again. Every item of a stored batch gets a mark (its attempts go up), so a batch whose
store committed can never hit a stale cache entry again.

Nothing one item does fails its batch: an answer the source's parser refuses, and any
exception nobody foresaw, fail that item with the reason; rows the database refuses fail
their item at store time (write_items_then_checkpoint), and the rest are stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from prefect import get_run_logger, task
from prefect.context import TaskRunContext
from prefect.serializers import PickleSerializer

from syncpoint.core.db import Database
from syncpoint.core.errors import ConfigError, FatalApiError, ItemError, RetriableApiError
from syncpoint.core.http import ApiClient, ClientThread
from syncpoint.core.ledger import ErrorKind, ItemOutcome, Lease, LeaseLost, Ledger, PendingItem
from syncpoint.core.redact import redact
from syncpoint.core.request_slots import RequestSlots
from syncpoint.core.store import ItemRows, write_items_then_checkpoint
from syncpoint.sources.source import Source

FETCH_CACHE_TTL = timedelta(days=3)

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
    # Prefect keeps the last 1,000 results in memory unless told not to: at 1,000 rows a
    # batch that was most of a long run's memory, growing with the run. The result is on
    # disk (persisted) and read once, by the stage.
    cache_result_in_memory=False,
    # The standard library's pickler: cloudpickle calls back into Python for every date
    # in the rows (thousands a batch) to learn what the C pickler already knows. A batch
    # holds only this module's dataclasses and plain values.
    result_serializer=PickleSerializer(picklelib="pickle"),
)
def fetch_batch(
    source: Source, batch: Batch, slots: RequestSlots, clients: ClientThread
) -> BatchOutcome:
    """Fetch every item of a batch; each ends done or failed, none is left unaccounted.

    `slots` is the stage's gate (not part of the cache key): it bounds the requests in
    flight across this batch and the next, and a refused key closes it for both.
    `clients` is the stage's open client (not part of the cache key either): the items run
    on its loop and reuse its connections.

    A sync task on purpose: Prefect runs an async task on a new event loop with a new API
    client of its own (an SSL context loaded per batch, ~40 ms of CPU); a sync task reuses
    the flow's, and the items' I/O is on the client's loop either way.
    """
    # Taken here, in the task's context: the items run on the client's own thread and
    # loop, where Prefect has no run context to find a logger in.
    logger = get_run_logger()

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
            except ConfigError:
                raise  # the API's URL itself is unusable: every item would fail alike
            except Exception as exc:
                # A bug, or an answer nothing above foresaw: it costs this item, not the
                # batch or the run. Permanent: the same answer would fail the same way.
                reason = unexpected(exc)
                logger.warning("%s: %s", item, reason)
                return [], ItemOutcome.failed(item, ErrorKind.PERMANENT, reason)

    async def every_item(
        client: ApiClient,
    ) -> tuple[list[tuple[list[dict[str, Any]], ItemOutcome]], int]:
        running = [asyncio.ensure_future(one(client, p)) for p in batch.items]
        try:
            results = await asyncio.gather(*running)
        except BaseException:
            # gather() leaves the other items running when one raises: on the stage's
            # client loop they would outlive this task, waiting for slots nobody serves.
            for item in running:
                item.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            raise
        return results, client.requests_sent

    results, requests = clients.run(every_item)
    rows = [row for item_rows, _ in results for row in item_rows]
    return BatchOutcome(
        batch,
        rows,
        [o for _, o in results],
        requests,
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
