"""Incremental, cursor-paged document sync with one checkpoint per entity.

Each entity is its own checkpoint (job document-sync, run key = entity): its cursor, the
window it is reading and the end of its last completed window. A new run asks for the
records updated since then, reaching back by the API's visibility delay so that changes
which surfaced late are not lost; `resume` continues an interrupted stream from its saved
cursor, otherwise the interrupted window restarts. One entity's corrupt checkpoint is
reported and the others still run.
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Any

from prefect import get_run_logger

from syncpoint import settings
from syncpoint.core.errors import CheckpointError, ConfigError
from syncpoint.core.interrupts import StopFlag, graceful_stop
from syncpoint.engine.job_run import JobRun, RunFailed
from syncpoint.engine.stream import now_iso, run_stream
from syncpoint.flows.job_flow import job_flow
from syncpoint.sources.documents import ENTITIES

JOB = "document-sync"


@job_flow(JOB)
def document_sync(
    entity: str | None = None,
    all_entities: bool = False,
    resume: bool = False,
    end: str | None = None,
    since: str | None = None,
    checkpoint_every_records: int | None = None,
    checkpoint_every_seconds: float | None = None,
    visibility_delay_minutes: float | None = None,
    builtin_api: bool | None = None,
    dip_api_block: str | None = None,
    database_block: str | None = None,
    checkpoint_block: str | None = None,
) -> dict[str, Any]:
    """Sync `entity` (or every entity with `all_entities`) into dip_documents.

    `visibility_delay_minutes` (DIP_VISIBILITY_DELAY_MINUTES, default 15): how long the API
    takes to show a change; each window starts that much before the last one ended.
    """
    logger = get_run_logger()
    entities = _entities(entity, all_entities)
    window_end = _day_end(end) if end else now_iso()
    window_since = _day_start(since) if since else None
    config = settings.resolve_document_sync(
        checkpoint_every_records=checkpoint_every_records,
        checkpoint_every_seconds=checkpoint_every_seconds,
        visibility_delay_minutes=visibility_delay_minutes,
        builtin_api=builtin_api,
        dip_api_block=dip_api_block,
        database_block=database_block,
        checkpoint_block=checkpoint_block,
    )
    stop = StopFlag()
    hint = "Resume with: syncpoint run document-sync " + (
        "--all --resume-all" if all_entities else f"--entity {entities[0]} --resume"
    )
    results: list[dict[str, Any]] = []

    with config.api.session() as api, graceful_stop(stop, hint):
        if config.api.builtin:
            logger.info("using the built-in documents API at %s, as asked", api.base_url)
        for name in entities:
            if stop.requested:
                results.append({"entity": name, "status": "partial", "error": stop.reason})
                continue
            try:
                with JobRun(
                    JOB,
                    name,
                    data=config.data,
                    store=config.checkpoints,
                    stages=("stream",),
                    params={"entity": name},
                    fresh=False,
                    logger=logger,
                    resume_hint=hint,
                    reopen=True,  # every run reads a new window into the same checkpoint
                    stop=stop,
                ) as run:
                    summary = run_stream(
                        run,
                        api,
                        name,
                        resume=resume,
                        since=window_since,
                        end=window_end,
                        max_records=config.checkpoint_every_records,
                        max_seconds=config.checkpoint_every_seconds,
                        overlap=timedelta(minutes=config.visibility_delay_minutes),
                    )
                results.append({"entity": name, **summary})
            except (CheckpointError, RunFailed) as exc:
                # One entity's broken checkpoint or failed stream does not stop the others.
                logger.error("%s: %s", name, exc)
                results.append({"entity": name, "status": "failed", "error": str(exc)})
    return _overall(results, stop)


def _entities(entity: str | None, all_entities: bool) -> list[str]:
    if all_entities:
        return list(ENTITIES)
    if not entity:
        raise ConfigError("name an entity (--entity E) or use --all")
    if entity not in ENTITIES:
        raise ConfigError(f"unknown entity {entity!r}: one of {', '.join(ENTITIES)}")
    return [entity]


def _overall(results: list[dict[str, Any]], stop: StopFlag) -> dict[str, Any]:
    statuses = {r["status"] for r in results}
    status = (
        "failed" if "failed" in statuses else "partial" if "partial" in statuses else "completed"
    )
    return {
        "job": JOB,
        "status": status,
        "entities": results,
        "interrupted": stop.reason,
        "signal": stop.signum,
        "resume_hint": results[0].get("resume_hint") if results else None,
        "requests": sum(r.get("requests", 0) for r in results),
        "rows_written": sum(r.get("rows_written", 0) for r in results),
    }


def _day_start(value: str) -> str:
    day = settings.run_date(value)
    return datetime.combine(day, time.min, tzinfo=UTC).isoformat()


def _day_end(value: str) -> str:
    day = settings.run_date(value)
    return datetime.combine(day, time(23, 59, 59), tzinfo=UTC).isoformat()
