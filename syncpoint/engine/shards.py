"""A stage spread over several workers: what the parent flow run does, and what a shard
reports back.

The parent plans the run as always (its row, its lock and heartbeat, the stage's items
in the ledger), then starts `count` child runs of the shard deployment and waits for
them. Each child leases batches of the stage's untouched items until none is left
(engine.batch_map.map_shard), so the stage ends settled whichever children survive: a
dead child's leases run out and the others take its items.

Each child's idempotency key names (run, stage, round, index), so a retry of the parent
finds the children it started before instead of starting more. A round whose children
all ended with items still untouched (every child died, say) is followed by a new round
of children; a round that settles nothing ends the stage as failed, with what the
children said.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from syncpoint.blocks.checkpoint import CheckpointStore
from syncpoint.core.db import Database
from syncpoint.core.errors import ConfigError, SyncError
from syncpoint.core.interrupts import StopFlag
from syncpoint.core.ledger import Ledger, StageCounts
from syncpoint.engine.batch_map import StageRun
from syncpoint.sources.source import Source

# Fresh rounds of children one invocation of the parent starts before it gives up.
MAX_ROUNDS = 3
POLL_SECONDS = 2.0
# Children nobody has started for this long: say so (no worker on the pool?), and again
# as often while it lasts.
UNSTARTED_WARNING_SECONDS = 60.0
# A child that finished the stage's last batch ends within seconds; one still Running
# this long (or a lease's length, if shorter) after the stage settled is not coming back.
SETTLED_GRACE_SECONDS = 30.0
# Nothing settled for this many lease lengths while children run: they are presumed dead.
STALL_LEASES = 3

# What a shard's result carries, besides `transient` (read from the ledger instead).
REPORTED = ("rows_written", "requests", "batches_reused", "batches", "items_processed")

Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]


@dataclass(frozen=True)
class Shards:
    """How a stage is spread: `count` children of `deployment`, each leasing batches for
    `lease_seconds` at a time. `parameters` are the job's settings a child rebuilds the
    stage's source from: names of blocks and plain values, never a secret (they are
    shown on the child's run page)."""

    count: int
    job: str
    run_key: str
    parameters: Mapping[str, Any]
    deployment: str
    lease_seconds: float


@dataclass(frozen=True)
class StageWork:
    """What a shard works with, rebuilt by its job from Shards.parameters."""

    data: Database
    checkpoints: CheckpointStore
    source: Source
    batch_size: int


def shard_key(run_id: str, stage: str, round_no: int, index: int) -> str:
    """The idempotency key of one child: the same child for every retry of the parent."""
    return f"{run_id}:{stage}:{round_no}:{index}"


def shard_report(ran: StageRun) -> dict[str, Any]:
    """A shard's StageRun as its flow run's result (JSON: the result is persisted)."""
    report: dict[str, Any] = {name: getattr(ran, name) for name in REPORTED}
    report.update(leases_lost=ran.leases_lost, fatal=ran.fatal)
    return report


def stage_run(report: Mapping[str, Any]) -> StageRun:
    """shard_report read back; anything missing or malformed counts as zero."""

    def number(name: str) -> int:
        value = report.get(name)
        return value if isinstance(value, int) and value >= 0 else 0

    fatal = report.get("fatal")
    return StageRun(
        rows_written=number("rows_written"),
        requests=number("requests"),
        batches_reused=number("batches_reused"),
        batches=number("batches"),
        items_processed=number("items_processed"),
        leases_lost=number("leases_lost"),
        fatal=fatal if isinstance(fatal, str) else None,
    )


def run_shards(
    shards: Shards,
    *,
    ledger: Ledger,
    run_id: str,
    stage: str,
    stop: StopFlag,
    logger: Logger,
    on_wait: Callable[[StageCounts], None],
    poll_seconds: float = POLL_SECONDS,
) -> StageRun:
    """Spread `stage` over `shards.count` child runs and wait until its untouched items
    are gone (or the parent is stopped: the children go on). What the children did,
    summed; raises SyncError if a fresh round of children settled nothing."""
    result = StageRun()
    fresh_rounds = 0
    round_no = 0
    while True:
        untouched = _counts(ledger, run_id, stage).untouched
        if untouched == 0 or result.fatal or stop.requested:
            return result
        if fresh_rounds == MAX_ROUNDS:
            raise SyncError(
                f"{stage}: {untouched} items are still untouched after {MAX_ROUNDS} rounds "
                "of shard runs; see the shard runs' logs"
            )
        children = _start(shards, run_id, stage, round_no)
        fresh = any(not _final(child) for child in children)
        if fresh:
            fresh_rounds += 1
            logger.info(
                "%s: %d shard runs working on %d items: %s",
                stage,
                len(children),
                untouched,
                ", ".join(child.name for child in children),
            )
        ended = _wait(
            children,
            ledger,
            run_id,
            stage,
            stop,
            logger,
            on_wait,
            poll_seconds,
            STALL_LEASES * shards.lease_seconds,
        )
        if ended is None:
            logger.warning(
                "%s: stopping; the shard runs go on with their batches (cancel them on "
                "their pages to stop them too)",
                stage,
            )
            return result
        troubles = []
        for child in ended:
            outcome = _outcome(child, logger)
            if isinstance(outcome, str):
                troubles.append(outcome)
            elif fresh:
                result = result.merged(outcome)
        left = _counts(ledger, run_id, stage).untouched
        # Children that died (Crashed: their worker or the parent said so) say nothing
        # about the next ones; children that ended by themselves having settled nothing
        # would fail the same way again.
        died = any(child.state.is_crashed() for child in ended)
        if fresh and left and left >= untouched and not died:
            raise SyncError(
                f"{stage}: the shard runs settled none of the {left} untouched items: "
                + ("; ".join(troubles) or "they ended without taking any")
            )
        if fresh and left:
            logger.warning(
                "%s: %d items still untouched after the shard runs ended (%s); starting new ones",
                stage,
                left,
                "; ".join(troubles) or "none failed",
            )
        round_no += 1


def _counts(ledger: Ledger, run_id: str, stage: str) -> StageCounts:
    return ledger.counts(run_id, stage).get(stage, StageCounts())


def _start(shards: Shards, run_id: str, stage: str, round_no: int) -> list[Any]:
    """The round's children: created now, or found by their keys (a retried parent)."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    children = []
    for index in range(shards.count):
        try:
            child = run_deployment(
                shards.deployment,
                parameters={
                    "job": shards.job,
                    "run_key": shards.run_key,
                    "run_id": run_id,
                    "stage": stage,
                    "shard": index + 1,
                    "shards": shards.count,
                    "lease_seconds": shards.lease_seconds,
                    "parameters": dict(shards.parameters),
                },
                timeout=0,
                idempotency_key=shard_key(run_id, stage, round_no, index),
                tags=["syncpoint", "shard"],
            )
        except ObjectNotFound:
            raise ConfigError(
                f"a run over several workers needs the {shards.deployment!r} deployment on "
                "a Prefect server (PREFECT_API_URL): run `prefect deploy --all` in "
                "syncpoint's folder and start workers on its pool (README: Sharded runs)"
            ) from None
        children.append(child)
    return children


def _final(child: Any) -> bool:
    return child.state is not None and child.state.is_final()


def _wait(
    children: list[Any],
    ledger: Ledger,
    run_id: str,
    stage: str,
    stop: StopFlag,
    logger: Logger,
    on_wait: Callable[[StageCounts], None],
    poll_seconds: float,
    stall_seconds: float,
) -> list[Any] | None:
    """The children once all have ended, or None if the parent was asked to stop.

    A child whose machine died stays Running in Prefect (nothing marks it Crashed), so
    the ledger decides: once the stage has nothing untouched, or nothing got settled
    for `stall_seconds` (several leases' length: a live child settles a batch well
    within one), the children still Running are presumed dead and marked Crashed.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.objects import StateType

    settled_grace = min(SETTLED_GRACE_SECONDS, stall_seconds / STALL_LEASES)
    ids = [child.id for child in children]
    waiting_since = last_warning = last_change = time.monotonic()
    last_settled = -1
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))
            )
            counts = _counts(ledger, run_id, stage)
            on_wait(counts)
            if len(runs) == len(ids) and all(_final(run) for run in runs):
                return runs
            if stop.requested:
                return None
            now = time.monotonic()
            if counts.settled != last_settled:
                last_settled, last_change = counts.settled, now
            running = [r for r in runs if r.state is not None and r.state.type is StateType.RUNNING]
            quiet = now - last_change
            if running and (
                (counts.untouched == 0 and quiet >= settled_grace) or quiet >= stall_seconds
            ):
                _crash(client, running, quiet, logger)
                last_change = now
                continue
            if not running and now - last_warning >= UNSTARTED_WARNING_SECONDS:
                last_warning = now
                logger.warning(
                    "%s: no worker has started the shard runs in %.0f s: is a worker "
                    "running on the shard deployment's work pool?",
                    stage,
                    now - waiting_since,
                )
            deadline = now + poll_seconds
            while not stop.requested and time.monotonic() < deadline:
                time.sleep(min(0.2, poll_seconds))


def _crash(client: Any, runs: list[Any], quiet: float, logger: Logger) -> None:
    """Mark children presumed dead as Crashed, so the parent (and a person) can go on."""
    from prefect.states import Crashed

    for run in runs:
        message = (
            f"presumed dead by the parent run: no item of the stage settled for {quiet:.0f} s "
            "while this run was shown Running; its leases ran out and its items went to the "
            "other shard runs"
        )
        logger.warning("%s: %s", run.name, message)
        client.set_flow_run_state(run.id, Crashed(message=message), force=True)


def _outcome(child: Any, logger: Logger) -> StageRun | str:
    """What an ended child did, or a line on why it did not complete."""
    state = child.state
    if not state.is_completed():
        return f"{child.name} ended {state.name}: {state.message or 'no message'}"
    try:
        report = state.result()
    except Exception as exc:  # the result lives where the child's worker stored it
        logger.warning(
            "could not read what %s did (%s): its requests and rows are not in this run's "
            "totals; give every worker the same result storage (README: Sharded runs)",
            child.name,
            type(exc).__name__,
        )
        return StageRun()
    return stage_run(report) if isinstance(report, Mapping) else StageRun()
