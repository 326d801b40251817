"""Incremental, cursor-paged document sync with one checkpoint per entity.

Each entity is its own checkpoint (job document-sync, run key = entity): its cursor, the
window it is reading and the end of its last completed window. A new run asks for the
records updated since then, reaching back by the API's visibility delay so that changes
which surfaced late are not lost; `resume` continues an interrupted stream from its saved
cursor, otherwise the interrupted window restarts. One entity's corrupt checkpoint is
reported and the others still run.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any

from prefect import get_run_logger
from pydantic import WithJsonSchema

from syncpoint import settings
from syncpoint.core.errors import CheckpointError, ConfigError
from syncpoint.core.interrupts import StopFlag, graceful_stop
from syncpoint.engine.job_run import JobRun, RunFailed
from syncpoint.engine.origin import Origin
from syncpoint.engine.run_page import plan_checkpoints
from syncpoint.engine.stream import now_iso, run_stream
from syncpoint.flows.job_flow import (
    UNSET,
    UNSET_IS_NONE,
    Count,
    Day,
    Seconds,
    Switch,
    Text,
    job_flow,
)
from syncpoint.sources.documents import ENTITIES

JOB = "document-sync"

# One of the API's entities (a drop-down in the Custom run form); empty: not given.
Entity = Annotated[
    str | None, UNSET_IS_NONE, WithJsonSchema({"type": "string", "enum": list(ENTITIES)})
]
# Minutes, 0 or more; empty: not given.
Minutes = Annotated[float | None, UNSET_IS_NONE, WithJsonSchema({"type": "number", "minimum": 0})]


def run_name(parameters: Mapping[str, Any]) -> str:
    """What the run syncs, as its name: "document-sync all entities", "document-sync person"."""
    if parameters.get("all_entities"):
        return f"{JOB} all entities"
    return f"{JOB} {parameters.get('entity') or 'no entity'}"


@job_flow(JOB, run_name=run_name)
def document_sync(
    entity: Entity = UNSET,
    all_entities: bool = False,
    resume: bool = False,
    end: Day = UNSET,
    since: Day = UNSET,
    checkpoint_every_records: Count = UNSET,
    checkpoint_every_seconds: Seconds = UNSET,
    visibility_delay_minutes: Minutes = UNSET,
    builtin_api: Switch = False,
    dip_api_block: Text = UNSET,
    database_block: Text = UNSET,
    checkpoint_block: Text = UNSET,
) -> dict[str, Any]:
    """Sync parliament documents (the Bundestag DIP API) into dip_documents, incrementally.

    Each entity has its own checkpoint: a run reads the records updated since that
    entity's last completed window, one row per record (an update replaces it).

    Args:
        entity: The entity to sync. Empty: set all_entities.
        all_entities: Sync every entity, each from its own checkpoint; one entity's
            failure does not stop the others.
        resume: Continue an interrupted stream from its saved cursor. Off: an interrupted
            window is read again from its beginning (nothing is missed either way).
        end: Read records updated up to the end of this day. Empty: up to now.
        since: Read records updated from the start of this day, instead of from the end of
            the entity's last completed window.
        checkpoint_every_records: Save the cursor after this many records. Empty: the
            worker's setting, else 500.
        checkpoint_every_seconds: Save the cursor at least this often, in seconds. Empty:
            the worker's setting, else 30.
        visibility_delay_minutes: How long the API takes to show a change, in minutes;
            each window starts that much before the last one ended. Empty: the worker's
            setting, else 15.
        builtin_api: Read the built-in API on the worker instead of the configured one.
            It serves made-up records: for demos and tests only.
        dip_api_block: Name of a Syncpoint DIP API block (URL, key, pacing). Empty: the
            worker's documents API settings.
        database_block: Name of a SqlAlchemy Connector block for the synced table.
            Empty: the worker's database.
        checkpoint_block: Name of a Syncpoint Checkpoint Store block. Empty: checkpoints
            are kept in the data database.
    """
    logger = get_run_logger()
    entities = _entities(entity, all_entities)
    window_end = _day_end(end) if end else now_iso()
    window_since = _day_start(since) if since else None
    config = settings.resolve_document_sync(
        checkpoint_every_records=checkpoint_every_records,
        checkpoint_every_seconds=checkpoint_every_seconds,
        visibility_delay_minutes=visibility_delay_minutes,
        # Off means "not asked for here": the worker's SYNCPOINT_BUILTIN_API still counts.
        builtin_api=builtin_api or None,
        dip_api_block=dip_api_block,
        database_block=database_block,
        checkpoint_block=checkpoint_block,
    )
    stop = StopFlag()
    command = "syncpoint run document-sync " + (
        "--all --resume-all" if all_entities else f"--entity {entities[0]} --resume"
    )
    hint = Origin.current().resume_hint(command)
    # One summary for the flow run, a section per entity; the bar counts them all.
    plan_checkpoints(JOB, entities, logger)
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
                    resume_command=command,
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


def _day_start(value: str | date) -> str:
    day = settings.run_date(value)
    return datetime.combine(day, time.min, tzinfo=UTC).isoformat()


def _day_end(value: str | date) -> str:
    day = settings.run_date(value)
    return datetime.combine(day, time(23, 59, 59), tzinfo=UTC).isoformat()
