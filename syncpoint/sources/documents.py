"""The DIP-style documents API as data: entities, windows, pages and validated records.

The API pages by cursor (a Solr cursorMark): each answer carries the cursor for the next
page; the end is the answer that returns the cursor it was given, with no documents.
"""

from __future__ import annotations

import json
import re
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
    """One stored row; ItemError if the record lacks what makes it one, or holds what
    dip_documents would refuse (checked here, before the row is cached or stored)."""
    if not isinstance(raw, dict):
        raise ItemError(f"record is not an object: {type(raw).__name__}")
    record_id = raw.get("id")
    text_id = _record_id(record_id)
    if text_id is None:
        raise ItemError(f"record has no usable id: {_clipped(record_id)!r}")
    what = f"{entity}/{text_id}"
    updated = parse_timestamp(raw.get("aktualisiert"), what)
    try:
        # The JSON column's text: NaN and Infinity are not JSON, and PostgreSQL refuses them.
        json.dumps(raw, allow_nan=False)
    except ValueError:
        raise ItemError(f"{what}: the record holds NaN or Infinity, not valid JSON") from None
    except RecursionError:
        raise ItemError(f"{what}: the record is nested too deeply to store") from None
    titel = raw.get("titel")
    return {
        "entity": entity,
        "id": text_id,
        "aktualisiert": updated,
        "datum": _datum(raw.get("datum")),
        # Informational: a title that is not text, or holds a NUL (which a PostgreSQL text
        # column refuses), is left out; the full record is kept in `payload` anyway.
        "titel": titel if isinstance(titel, str) and "\x00" not in titel else None,
        "payload": raw,
        "synced_at": datetime.now(UTC),
    }


def parse_timestamp(value: Any, what: str) -> datetime:
    """An aware datetime from an ISO 8601 string; a bare number is not a timestamp (Python
    would read 20261120 as a day), and neither is one UTC cannot represent."""
    parsed: datetime | None = None
    if isinstance(value, str) and len(value) <= _TIMESTAMP_MAX:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = None
    if parsed is None:
        raise ItemError(f"{what}: aktualisiert {_clipped(value)!r} is not a timestamp")
    # Without an offset DIP means Berlin time. The instant is kept in UTC: SQLite stores no
    # offset, and Berlin wall time is ambiguous for an hour every October.
    parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=BERLIN)
    try:
        # Comparisons and watermarks work in UTC: 0001-01-01T00:00+01:00 has no UTC form.
        return parsed.astimezone(UTC)
    except OverflowError:
        raise ItemError(f"{what}: aktualisiert {value!r} is out of range") from None


# Longer than any ISO 8601 timestamp with microseconds and an offset.
_TIMESTAMP_MAX = 40
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _record_id(value: Any) -> str | None:
    """The record's id as stored (a string of at most 64 printable characters), or None."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    if isinstance(value, int) and not -(10**63) < value < 10**63:
        return None  # more digits than the column holds (and str() of a huge int is slow)
    text = str(value)
    if not text.strip() or len(text) > 64 or not text.isprintable():
        return None
    return text


def _datum(value: Any) -> date | None:
    """The record's day, if it has a readable one: YYYY-MM-DD, optionally as the start of
    a timestamp. It is informational; anything else (a number, trailing text) is None."""
    if not isinstance(value, str) or not _DAY.fullmatch(value[:10]):
        return None
    try:
        if len(value) == 10:
            return date.fromisoformat(value)
        return datetime.fromisoformat(value).date() if len(value) <= _TIMESTAMP_MAX else None
    except ValueError:
        return None


def _clipped(value: Any) -> str:
    """At most 40 characters of a value's text, without converting a huge int in full."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"a {len(str(value)) if value.bit_length() < 10_000 else 'huge'}-digit integer"
    return str(value)[:40]


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
