"""The DIP-style documents API as data: entities, windows, pages and validated records.

The API pages by cursor (a Solr cursorMark): each answer carries the cursor for the next
page; the end is the answer that returns the cursor it was given, with no documents.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from syncpoint.core.errors import ItemError

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
FIRST_CURSOR = "*"  # what the API echoes when a stream without a cursor has no records
# DIP's timestamps are Berlin local time; one without an offset means Berlin time.
BERLIN = ZoneInfo("Europe/Berlin")


@dataclass(frozen=True)
class Window:
    """Records updated within [start, end] (ISO timestamps); start None: from the beginning."""

    start: str | None
    end: str


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
    # Without an offset DIP means Berlin time. The instant is kept in UTC: SQLite stores no
    # offset, and Berlin wall time is ambiguous for an hour every October.
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=BERLIN)).astimezone(UTC)


def read_page(entity: str, payload: Any) -> tuple[list[Any], str, int | None]:
    if not isinstance(payload, dict) or not isinstance(payload.get("documents"), list):
        raise ItemError(f"{entity}: a page is not an object with a documents list")
    following = payload.get("cursor")
    if not isinstance(following, str) or not following:
        raise ItemError(f"{entity}: a page has no cursor")
    found = payload.get("numFound")
    return payload["documents"], following, found if isinstance(found, int) else None


def window_filters(window: Window) -> dict[str, str]:
    params = {"f.aktualisiert.end": window.end}
    if window.start:
        params["f.aktualisiert.start"] = window.start
    return params
