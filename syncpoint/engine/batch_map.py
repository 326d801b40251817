"""The generic checkpointed map: plan pending items, chunk them, fetch, store, mark.

Two skip layers keep a rerun from spending API quota twice: the ledger decides which
items are pending (universe - done - permanently failed), and the fetch cache
(syncpoint.tasks.batches: a record per fetched batch in Prefect's result storage) gives
back a batch fetched by an attempt that died before storing it.

Pipelining: a Prefect task run fetches a window of consecutive batches (batches_per_window:
at least WINDOW_ITEMS items, so a task run's cost is spread over many requests whatever
the batch size), handing each batch back as soon as it is fetched and recorded; this
thread stores each batch as it arrives while the next ones go on fetching, and starts the
next window's task run before the current one ends. Within and across windows, a batch
gate lets enough batches fetch at once to fill the request slots (fetches_in_flight: two
for batches as large as the concurrency, more for small ones), counted apart from those
fetched and waiting to be stored (batches_ahead), so a slow item holds back no other
batch's requests. The fetches draw on one stage-wide RequestSlots, first come first
served, so a later batch only takes the slots the earlier ones free: `concurrency` stays
exact and no slot idles at a boundary (a run keeps its pace, under a rate limit too).
Batch size is the checkpoint's grain, not a cap on requests in flight nor the task runs'
grain. A crash makes a rerun fetch at most unmarked_batches_at_most() batches again:
those fetching when it struck.

One client (pools, connections, SSL context) serves the whole stage from its own event
loop (syncpoint.core.http.ClientThread): a batch boundary opens nothing.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from prefect import get_run_logger
from prefect.exceptions import MissingContextError
from prefect.futures import PrefectFuture

from syncpoint.core.db import Database
from syncpoint.core.gc_pace import fewer_collections
from syncpoint.core.heartbeat import LeaseKeeper
from syncpoint.core.http import ClientThread
from syncpoint.core.interrupts import StopFlag
from syncpoint.core.ledger import (
    ErrorKind,
    ItemOutcome,
    LeaseLost,
    Ledger,
    PendingItem,
    StageCounts,
)
from syncpoint.core.request_slots import RequestSlots
from syncpoint.sources.source import Source
from syncpoint.tasks.batches import (
    Batch,
    BatchGate,
    BatchOutcome,
    Fetched,
    Halt,
    Handoff,
    Window,
    fetch_window,
    store_batch,
)

# Never fewer batches fetching than this: the next batch must be queued for the slots
# before the current one's tail frees them, or every boundary idles.
MIN_FETCHES_IN_FLIGHT = 2

# A fetch task run takes batches until it holds at least this many items. A task run
# costs ~5 ms of CPU in the flow's process and ~30 ms on a Prefect server with its
# events (measured on 2 cores, bench case 1): one per 50-ticker batch was a third of a
# run's span, one per 5-ticker batch (fill-cache) most of it. 250 items make it a
# percent or two at any batch size, and at batch sizes of 250 and more it is one a batch.
WINDOW_ITEMS = 250


def fetches_in_flight(concurrency: int, batch_size: int) -> int:
    """Batches a stage fetches at once: enough that `concurrency` requests can be in flight.

    ceil(concurrency / batch_size) batches hold that many items; one more is queued behind
    them, so a slot freed at a boundary finds an item waiting. With batches of 5 and 16
    slots that is 5 batches (25 items queued for 16 slots), not the 10 requests two
    batches would allow; batches as large as the concurrency keep the minimum of two.
    More would only widen what a crash leaves to fetch again.
    """
    if concurrency < 1 or batch_size < 1:
        raise ValueError("concurrency and batch_size must be at least 1")
    return max(MIN_FETCHES_IN_FLIGHT, -(-concurrency // batch_size) + 1)


def batches_per_window(batch_size: int) -> int:
    """Batches one fetch task run takes (see WINDOW_ITEMS): the task run's grain, not the
    checkpoint's; each batch is still recorded, stored and marked alone."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    return max(1, -(-WINDOW_ITEMS // batch_size))


def batches_ahead(concurrency: int, batch_size: int) -> int:
    """Batches admitted and not yet taken by the stage's thread, fetching or fetched: what
    of the fetched rows may be in memory. Twice those fetching at once, so that a batch
    slow to finish holds back no fetch until as many again are fetched behind it."""
    return 2 * fetches_in_flight(concurrency, batch_size)


def unmarked_batches_at_most(concurrency: int, batch_size: int) -> int:
    """What a crash can make a rerun fetch again: the batches fetching (fetches_in_flight,
    the stage's batch gate) and one whose record was being written. Batches fetched and
    recorded but not yet stored are reused from their records, not fetched again."""
    return fetches_in_flight(concurrency, batch_size) + 1


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
    requests: int = 0  # requests that went out in this invocation
    batches_reused: int = 0  # fetches the fetch cache answered: no request went out for them
    batches: int = 0
    items_processed: int = 0
    fatal: str | None = None
    # Leased batches whose lease ran out before their store (a sharded run): nothing of
    # them was written; whoever took their items over stores them.
    leases_lost: int = 0
    # Items whose fetch failed transiently (a second pass may take them): the only
    # outcomes kept, so a stage of half a million items holds its failures, not its items.
    transient: list[str] = field(default_factory=list)

    def merged(self, later: StageRun) -> StageRun:
        """This pass and a later one over the same stage, as one."""
        return StageRun(
            rows_written=self.rows_written + later.rows_written,
            requests=self.requests + later.requests,
            batches_reused=self.batches_reused + later.batches_reused,
            batches=self.batches + later.batches,
            items_processed=self.items_processed + later.items_processed,
            fatal=self.fatal or later.fatal,
            leases_lost=self.leases_lost + later.leases_lost,
            transient=[*self.transient, *later.transient],
        )


def plan_batches(
    pending: Sequence[PendingItem],
    *,
    run_id: str,
    stage: str,
    batch_size: int,
    first_number: int,
    max_items: int | None = None,
    max_batches: int | None = None,
    only: frozenset[str] | None = None,
) -> list[Batch]:
    """This invocation's batches of a stage: pure planning, no I/O.

    `pending` (in the ledger's stable order) is narrowed to `only` if given, then cut to
    `max_batches * batch_size` items, then to `max_items`, and chunked into batches of
    `batch_size` (the last one may be shorter), numbered from `first_number` on: one more
    than the run's last batch number, so numbers continue across invocations.
    """
    return list(
        iter_batches(
            [pending],
            run_id=run_id,
            stage=stage,
            batch_size=batch_size,
            first_number=first_number,
            max_items=max_items,
            max_batches=max_batches,
            only=only,
        )
    )


def iter_batches(
    pages: Iterable[Sequence[PendingItem]],
    *,
    run_id: str,
    stage: str,
    batch_size: int,
    first_number: int,
    max_items: int | None = None,
    max_batches: int | None = None,
    only: frozenset[str] | None = None,
) -> Iterator[Batch]:
    """plan_batches over pending items that arrive in pages (Ledger.pending_pages), one
    batch at a time: the next page is read only when a batch needs it, so planning holds
    a page and the batches in flight, never the stage."""
    cap = None if max_batches is None else max_batches * batch_size
    if max_items is not None:
        cap = max_items if cap is None else min(cap, max_items)
    taken = 0
    number = first_number
    chunk: list[PendingItem] = []
    for page in pages:
        for pending in page:
            if cap is not None and taken >= cap:
                break
            if only is not None and pending.item not in only:
                continue
            chunk.append(pending)
            taken += 1
            if len(chunk) == batch_size:
                yield Batch(run_id, stage, number, tuple(chunk))
                number, chunk = number + 1, []
        if cap is not None and taken >= cap:
            break
    if chunk:
        yield Batch(run_id, stage, number, tuple(chunk))


@dataclass(frozen=True)
class LeaseTerms:
    """How one worker of a sharded run takes its batches (Ledger.lease): as `owner`, each
    for `seconds` (renewed while it works: syncpoint.core.heartbeat.LeaseKeeper); the
    untouched items, or with `retry_below` the transient failures attempted fewer times."""

    owner: str
    seconds: float = 300.0
    retry_below: int | None = None


def leased_batches(
    ledger: Ledger,
    *,
    run_id: str,
    stage: str,
    batch_size: int,
    terms: LeaseTerms,
    max_batches: int | None = None,
) -> Iterator[Batch]:
    """Batches leased one at a time, as the pipeline asks for them, until no item is free
    (the rest may be under other workers' leases) or `max_batches` were taken."""
    taken = 0
    while max_batches is None or taken < max_batches:
        lease = ledger.lease(
            run_id, stage, terms.owner, batch_size, terms.seconds, retry_below=terms.retry_below
        )
        if lease is None:
            return
        taken += 1
        yield Batch(run_id, stage, lease.batch_no, lease.items, lease)


def planned_items(
    pending: int,
    *,
    batch_size: int,
    max_items: int | None = None,
    max_batches: int | None = None,
    only: frozenset[str] | None = None,
) -> int:
    """How many items iter_batches will plan out of `pending` items, counted up front for
    progress: the items of `only` are pending ones (requeued or transiently failed)."""
    count = pending if only is None else min(pending, len(only))
    if max_batches is not None:
        count = min(count, max_batches * batch_size)
    if max_items is not None:
        count = min(count, max_items)
    return count


# A stage makes a dict and a tuple per row: see syncpoint.core.gc_pace.
@fewer_collections()
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
    into: StageRun | None = None,
    leases: LeaseTerms | None = None,
) -> StageRun:
    """Run a stage's pending items in batches until done, capped, stopped or fatal.

    `max_items` / `max_batches` cap this invocation (the rest stays pending); `only`
    restricts it to those items. Batch numbers continue across invocations of a run.
    `into` is counted into as the stage goes (and returned), so a caller still knows what
    went out when a store step fails and this raises.

    With `leases` (one worker of a sharded run) the batches are leased instead of planned,
    until no item is free (map_shard waits for the rest); a batch whose lease ran out
    before its store is counted in `leases_lost` and left to whoever took it over.
    """
    base = ledger.counts(run_id, stage).get(stage, StageCounts())
    upcoming: Iterator[Batch]
    if leases is None:
        # Planned lazily, page by page: a stage of half a million items is never in memory.
        upcoming = iter_batches(
            ledger.pending_pages(run_id, stage),
            run_id=run_id,
            stage=stage,
            batch_size=batch_size,
            first_number=ledger.last_batch_no(run_id, stage) + 1,
            max_items=max_items,
            max_batches=max_batches,
            only=only,
        )
        pending = base.pending
    else:
        if max_items is not None or only is not None:
            raise ValueError("a sharded stage takes no max_items or only")
        upcoming = leased_batches(
            ledger,
            run_id=run_id,
            stage=stage,
            batch_size=batch_size,
            terms=leases,
            max_batches=max_batches,
        )
        # Shared with the other workers: this one's share is not known in advance.
        pending = base.untouched if leases.retry_below is None else base.retrying
    planned = planned_items(
        pending,
        batch_size=batch_size,
        max_items=max_items,
        max_batches=max_batches,
        only=only,
    )
    batches_total = -(-planned // batch_size)
    tally = {"done": base.done, "failed": base.failed, "retrying": base.retrying}
    result = into if into is not None else StageRun()
    started = time.monotonic()
    slots = RequestSlots(source.concurrency)
    # At most `depth` batches fetching across windows, what a crash can make a rerun
    # fetch again (unmarked_batches_at_most), and batches_ahead() fetching or fetched and
    # not yet taken by this thread, what of the fetched rows is in memory.
    halt = Halt(stop)
    depth = fetches_in_flight(source.concurrency, batch_size)
    # A worker of a sharded run leases a window's batches when it plans the window: a
    # window of 250 items would hoard the end of a stage while the other workers idle,
    # so it takes only as many batches as it can fetch at once.
    per_window = batches_per_window(batch_size) if leases is None else depth
    windows_ahead = fetches_in_flight(source.concurrency, per_window * batch_size)
    # Opened once for the stage, closed when it ends (after every fetch has finished).
    clients = ClientThread(source.client())
    gate = BatchGate(depth, batches_ahead(source.concurrency, batch_size), clients)
    submitted = 0  # batches handed to fetch task runs so far: the next one's position
    logger = _run_logger()
    # Batches handed to a fetch task run and not yet stored, in order, and those task runs.
    fetching: deque[tuple[Batch, Handoff]] = deque()
    running: set[PrefectFuture[None]] = set()

    def ended(window: Window, future: PrefectFuture[None]) -> None:
        """A fetch task run has ended, whichever way (a crash before it ran, a
        cancellation): nobody waits for a batch of it that was not handed back."""
        window.fail_untaken(RuntimeError("the fetch task run ended before handing this batch back"))
        running.discard(future)

    def fetch_next() -> None:
        """Start the next window's task run once fewer than `windows_ahead` windows of
        batches wait to be stored."""
        nonlocal submitted
        while len(fetching) <= (windows_ahead - 1) * per_window:
            if stop.requested or result.fatal:
                return  # no new window; those in flight still finish and are stored
            window = Window.of(list(itertools.islice(upcoming, per_window)), submitted)
            if not window.batches:
                return
            submitted += len(window.batches)
            future = fetch_window.submit(source, window, slots, clients, gate, halt)
            running.add(future)
            future.add_done_callback(functools.partial(ended, window))
            fetching.extend(zip(window.batches, window.handoffs, strict=True))

    def count(fetched: Fetched, batch: Batch) -> BatchOutcome:
        if fetched.reused:
            # The outcome an earlier attempt fetched, requests and all: none went out now.
            result.batches_reused += 1
        else:
            result.requests += fetched.outcome.requests
        # Stored as the batch planned now: a cached outcome carries the batch number and
        # lease of the attempt that fetched it (another worker's, after a takeover).
        return replace(fetched.outcome, batch=batch)

    def settle(outcome: BatchOutcome) -> None:
        try:
            written = store_batch(data, checkpoints, source.table, outcome, logger)
        except LeaseLost:
            # Nothing written; the items are another worker's now. Whatever of the lease
            # is still this worker's is given up, so that no item waits on it.
            result.leases_lost += 1
            if outcome.batch.lease is not None:
                ledger.release_lease(outcome.batch.lease)
            return
        result.rows_written += written
        result.batches += 1
        result.items_processed += len(outcome.outcomes)
        result.transient.extend(
            o.item for o in outcome.outcomes if o.error_kind is ErrorKind.TRANSIENT
        )
        retried = {p.item for p in outcome.batch.items if p.attempts > 0}
        for o in outcome.outcomes:
            if o.item in retried:
                tally["retrying"] -= 1
            tally[_bucket(o)] += 1
        on_progress(
            Progress(
                stage=stage,
                batches_done=result.batches,
                batches_total=batches_total,
                done=tally["done"],
                failed=tally["failed"],
                retrying=tally["retrying"],
                total=base.total,
                processed_now=result.items_processed,
                planned_now=planned,
                elapsed=time.monotonic() - started,
            )
        )

    try:
        if planned:
            clients.__enter__()
        fetch_next()
        while fetching:
            batch, handoff = fetching.popleft()
            try:
                fetched = handoff.take()
            finally:
                # The next batch in line may start fetching while this one is stored,
                # whatever the store step costs.
                gate.taken()
            # The next window's task run before this window's batches run out.
            fetch_next()
            if fetched is None:
                continue  # not started (a stop, a refused key): its items stay pending
            outcome = count(fetched, batch)
            result.fatal = result.fatal or outcome.fatal
            settle(outcome)
    finally:
        # Leaving early (a store failed, the flow is being torn down): no batch starts any
        # more, and those fetching finish, so their records reach the fetch cache for the
        # rerun and no thread goes on sending after the stage has ended.
        halt.leave()
        for batch, handoff in fetching:
            with contextlib.suppress(Exception):  # a batch that failed: the error is out
                fetched = handoff.take()
                if fetched is not None:
                    count(fetched, batch)  # not stored now, but its requests went out
            gate.taken()  # the batches behind it may go on, to find the halt and end
        for future in list(running):
            future.wait()
        clients.__exit__(None, None, None)
    return result


def map_shard(
    *,
    ledger: Ledger,
    data: Database,
    checkpoints: Database,
    run_id: str,
    stage: str,
    source: Source,
    batch_size: int,
    terms: LeaseTerms,
    stop: StopFlag,
    on_progress: Callable[[Progress], None],
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
    poll_seconds: float | None = None,
) -> StageRun:
    """One worker's share of a sharded stage: lease and process batches until the stage
    has no untouched item left, stopped or fatal.

    When nothing is free but other workers still hold leases, it waits (`poll_seconds`)
    and tries again: a live worker marks its batches, and a dead one's leases run out and
    are taken here, so the stage ends settled whichever workers survive. This worker's
    own leases are renewed while it runs. A retry pass (`terms.retry_below`) sweeps once
    and does not wait: a failure leased by a worker that died stays for the next run.
    """
    result = StageRun()
    wait = poll_seconds if poll_seconds is not None else min(5.0, terms.seconds / 4)
    keeper = LeaseKeeper(
        ledger, run_id, terms.owner, seconds=terms.seconds, stop=stop, logger=logger
    )
    keeper.start()
    try:
        while True:
            map_batches(
                ledger=ledger,
                data=data,
                checkpoints=checkpoints,
                run_id=run_id,
                stage=stage,
                source=source,
                batch_size=batch_size,
                max_items=None,
                stop=stop,
                on_progress=on_progress,
                into=result,
                leases=terms,
            )
            if stop.requested or result.fatal or terms.retry_below is not None:
                return result
            if ledger.counts(run_id, stage).get(stage, StageCounts()).untouched == 0:
                return result
            deadline = time.monotonic() + wait
            while not stop.requested and time.monotonic() < deadline:
                time.sleep(min(0.2, wait))
    finally:
        keeper.close()


def _run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The flow run's logger (the store's warnings belong on the run's page), else this
    module's."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def _bucket(outcome: ItemOutcome) -> str:
    if outcome.error_kind is None:
        return "done"
    return "retrying" if outcome.error_kind is ErrorKind.TRANSIENT else "failed"
