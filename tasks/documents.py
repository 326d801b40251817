"""Reading a DIP-style documents API: cursor pages, validated records, a loop guard.

The API pages by cursor: each answer carries the cursor for the next page, and the last
page answers with the cursor it was given. A broken upstream can hand out a cursor it
already gave, or the same page again: the guard ends such a stream with a warning
instead of looping forever.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks.dip_api import DipApi
from syncpoint.errors import ItemError
from syncpoint.interrupts import StopFlag
from syncpoint.redact import redact

ENTITIES = (
    "person",
    "vorgang",
    "vorgangsposition",
    "aktivitaet",
    "drucksache",
    "drucksache-text",
    "plenarprotokoll",
    "plenarprotokoll-text",
)
TABLE = "dip_documents"
FIRST_CURSOR = "*"  # what the API answers on its last page when no cursor was sent


@dataclass(frozen=True)
class Window:
    """Records updated within [start, end] (ISO timestamps); start None: from the beginning."""

    start: str | None
    end: str


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
            params = _filters(window)
            if sent:
                params["cursor"] = sent
            payload = await client.get_json(f"/api/v1/{entity}", params)
            documents, following, num_found = _page(entity, payload)
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


def parse_document(entity: str, raw: Any) -> dict[str, Any]:
    """One stored row; ItemError if the record lacks what makes it one."""
    if not isinstance(raw, dict):
        raise ItemError(f"record is not an object: {type(raw).__name__}")
    record_id = raw.get("id")
    if record_id is None or str(record_id).strip() == "" or len(str(record_id)) > 64:
        raise ItemError(f"record has no usable id: {str(record_id)[:40]!r}")
    updated = parse_timestamp(raw.get("aktualisiert"), f"{entity}/{record_id}")
    datum = raw.get("datum")
    try:
        day = date.fromisoformat(str(datum)[:10]) if datum else None
    except ValueError:
        day = None
    return {
        "entity": entity,
        "id": str(record_id),
        "aktualisiert": updated,
        "datum": day,
        "titel": raw.get("titel") if isinstance(raw.get("titel"), str) else None,
        "payload": raw,
        "synced_at": datetime.now(UTC),
    }


def parse_timestamp(value: Any, what: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        raise ItemError(f"{what}: aktualisiert {str(value)[:40]!r} is not a timestamp") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _page(entity: str, payload: Any) -> tuple[list[Any], str, int | None]:
    if not isinstance(payload, dict) or not isinstance(payload.get("documents"), list):
        raise ItemError(f"{entity}: a page is not an object with a documents list")
    following = payload.get("cursor")
    if not isinstance(following, str) or not following:
        raise ItemError(f"{entity}: a page has no cursor")
    found = payload.get("numFound")
    return payload["documents"], following, found if isinstance(found, int) else None


def _filters(window: Window) -> dict[str, str]:
    params = {"f.aktualisiert.end": window.end}
    if window.start:
        params["f.aktualisiert.start"] = window.start
    return params
