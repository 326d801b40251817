"""One worker's share of a stage of a run spread over several workers.

A parent run (daily-sync or fill-cache with shards above 1) starts these as child runs
of the syncpoint-shard/shard deployment and waits for them (engine.shards). Each leases
batches of the stage's untouched items until none is left (engine.batch_map.map_shard),
with the fetch, store and mark of a run of one process; a batch's rows and marks are
written only while its lease holds, so a worker that lost its lease writes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

from prefect import get_run_logger

from syncpoint import settings
from syncpoint.core.db import storage_errors
from syncpoint.core.errors import CheckpointError, ConfigError
from syncpoint.core.interrupts import StopFlag, graceful_stop
from syncpoint.core.ledger import Ledger, new_owner
from syncpoint.engine.batch_map import LeaseTerms, Progress, map_shard
from syncpoint.engine.job_run import PROGRESS_LOG_SECONDS
from syncpoint.engine.shards import StageWork, shard_report
from syncpoint.flows import daily_sync, fill_cache
from syncpoint.flows.job_flow import UNSET, Seconds, job_flow

JOB = "syncpoint-shard"

# The jobs whose stages can be spread, and how a shard rebuilds a stage of each.
STAGE_WORK: dict[str, Callable[[str, Mapping[str, Any]], AbstractContextManager[StageWork]]] = {
    daily_sync.JOB: daily_sync.stage_work,
    fill_cache.JOB: fill_cache.stage_work,
}


def run_name(parameters: Mapping[str, Any]) -> str:
    """ "fill-cache sp500:2021-11-22:2026-11-21 history 2/3"."""
    return (
        f"{parameters.get('job')} {parameters.get('run_key')} {parameters.get('stage')} "
        f"{parameters.get('shard')}/{parameters.get('shards')}"
    )


@job_flow(JOB, run_name=run_name, persist_result=True)
def shard(
    job: str,
    run_key: str,
    run_id: str,
    stage: str,
    shard: int = 1,
    shards: int = 1,
    lease_seconds: Seconds = UNSET,
    parameters: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Work on one stage of a run spread over several workers, with the others, until the
    stage has no untouched item left. Started by the run's parent; not for starting by
    hand.

    Args:
        job: The parent's job (daily-sync or fill-cache).
        run_key: The parent's run key (a date, a range): for the run's name.
        run_id: The checkpoint's run id; its items are in the checkpoint database.
        stage: The stage to work on.
        shard: This child's number, from 1.
        shards: How many children the parent started.
        lease_seconds: How long a batch stays this worker's without a renewal.
        parameters: The parent's settings the stage is rebuilt from.
    """
    logger = get_run_logger()
    build = STAGE_WORK.get(job)
    if build is None:
        raise ConfigError(f"no job {job!r} spreads over shards; known: {', '.join(STAGE_WORK)}")
    with build(stage, parameters or {}) as work:
        checkpoints = work.checkpoints.target(work.data)
        ledger = Ledger(checkpoints.engine())
        with storage_errors(checkpoints.describe()):
            try:
                ledger.get(run_id)
            except CheckpointError:
                raise ConfigError(
                    f"{job} {run_key}: run {run_id} is not in this worker's checkpoint "
                    f"database ({checkpoints.describe()}); every worker of a sharded run "
                    "needs the same database settings"
                ) from None
            stop = StopFlag()
            logged = [0.0]

            def on_progress(progress: Progress) -> None:
                now = time.monotonic()
                if progress.batches_done == 1 or now - logged[0] >= PROGRESS_LOG_SECONDS:
                    logged[0] = now
                    logger.info(
                        "%s: %d items settled here (%d batches, %.1f items/s)",
                        stage,
                        progress.processed_now,
                        progress.batches_done,
                        progress.rate,
                    )

            with graceful_stop(stop, "The parent run's Retry continues the stage."):
                ran = map_shard(
                    ledger=ledger,
                    data=work.data,
                    checkpoints=checkpoints,
                    run_id=run_id,
                    stage=stage,
                    source=work.source,
                    batch_size=work.batch_size,
                    terms=LeaseTerms(new_owner(), seconds=lease_seconds or settings.LEASE_SECONDS),
                    stop=stop,
                    on_progress=on_progress,
                    logger=logger,
                )
    if ran.fatal:
        logger.error("%s: stopped: %s", stage, ran.fatal)
    logger.info(
        "%s: shard %d/%d done: %d items in %d batches, %d requests, %d rows, %d batches "
        "from the fetch cache, %d leases lost",
        stage,
        shard,
        shards,
        ran.items_processed,
        ran.batches,
        ran.requests,
        ran.rows_written,
        ran.batches_reused,
        ran.leases_lost,
    )
    return shard_report(ran)
