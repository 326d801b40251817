"""The cursor-stream tasks: read pages until a checkpoint is due, store them with the cursor.

A broken upstream can hand out a cursor it already gave, or the same page again: the
guard in fetch_segment ends such a stream with a warning instead of looping forever.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from syncpoint.blocks.dip_api import DipApi
from syncpoint.core.db import Database
from syncpoint.core.errors import ItemError
from syncpoint.core.interrupts import StopFlag
from syncpoint.core.ledger import Ledger
from syncpoint.core.redact import redact
from syncpoint.core.store import write_then_checkpoint
from syncpoint.sources.documents import (
    FIRST_CURSOR,
    TABLE,
    Window,
    parse_document,
    read_page,
    window_filters,
)


@dataclass
class Segment:
    """Pages read until a checkpoint is due; `cursor` is where the next segment starts."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    cursor: str | None = None
    cursors: list[str] = field(default_factory=list)
    done: bool = False
    stuck: str | None = None
    pages: int = 0
    requests: int = 0
    rejected: int = 0
    num_found: int | None = None
    last_ids: list[str] = field(default_factory=list)


@task(name="fetch-segment", task_run_name="fetch {entity} segment", cache_policy=NO_CACHE)
async def fetch_segment(
    api: DipApi,
    entity: str,
    window: Window,
    cursor: str | None,
    seen: frozenset[str],
    previous_ids: list[str],
    received_before: int,
    max_records: int,
    max_seconds: float,
    stop: StopFlag,
) -> Segment:
    """Read pages from `cursor` until `max_records` records or `max_seconds` have passed,
    the stream ends, the guard trips or a stop is requested."""
    segment = Segment(cursor=cursor, last_ids=list(previous_ids))
    began = time.monotonic()
    async with api.client() as client:
        while not segment.done and not segment.stuck and not stop.requested:
            sent = segment.cursor
            params = window_filters(window)
            if sent:
                params["cursor"] = sent
            payload = await client.get_json(f"/api/v1/{entity}", params)
            documents, following, num_found = read_page(entity, payload)
            segment.pages += 1
            segment.num_found = num_found
            ids = [str(d.get("id")) for d in documents]
            if ids and ids == segment.last_ids:
                segment.stuck = f"the API sent the same page of {len(ids)} records again"
                break
            for raw in documents:
                try:
                    segment.rows.append(parse_document(entity, raw))
                except ItemError as exc:
                    segment.rejected += 1
                    if segment.rejected <= 3:
                        get_run_logger().warning(
                            "%s: skipped a record: %s", entity, redact(str(exc))
                        )
            segment.last_ids = ids
            if following == (sent or FIRST_CURSOR):
                received = received_before + len(segment.rows) + segment.rejected
                if num_found is not None and received < num_found:
                    # The end came early: a cursor that stopped advancing looks like this.
                    segment.stuck = f"the stream ended after {received} of {num_found} records"
                else:
                    segment.done = True
            elif following in seen or following in segment.cursors:
                segment.stuck = f"the API repeated cursor {following[:40]!r}"
            else:
                segment.cursors.append(following)
                segment.cursor = following
            if len(segment.rows) >= max_records or time.monotonic() - began >= max_seconds:
                break
        segment.requests = client.requests_sent
    return segment


@task(
    name="store-segment",
    task_run_name="store {entity} segment",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[1, 5],
)
def store_segment(
    data: Database,
    checkpoints: Database,
    run_id: str,
    entity: str,
    rows: list[dict[str, Any]],
    position: dict[str, Any],
) -> int:
    """Upsert the segment's records and save the cursor after them, in that order."""
    ledger = Ledger(checkpoints.engine())
    return write_then_checkpoint(
        data, checkpoints, TABLE, rows, lambda conn: ledger.save_stream(conn, run_id, position)
    )
