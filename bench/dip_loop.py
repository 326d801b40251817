"""The hand-written baseline for a DIP full sync: a cursor loop, no Prefect, no checkpoint.

One httpx.Client; GET /api/v1/{entity} with `f.aktualisiert.end` fixed at the start and
the cursor of the last answer, until the cursor stops changing; each page is upserted into
a SQLite `dip_documents` table and committed before the next request. The table and the
database settings are syncpoint's (same columns, key and index, `aktualisiert` as UTC
text; WAL, synchronous=NORMAL), so the comparison is of the two ways of reading and
writing, not of two schemas. It is what a careful person writes by hand: a kill loses
nothing stored, but the rerun starts the stream from its beginning.

    python -m bench.dip_loop --base-url URL --entity aktivitaet --database out.db

Prints JSON: records, pages, seconds from the first request to the last answer, and the
process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx

BERLIN = ZoneInfo("Europe/Berlin")
SCHEMA = """
CREATE TABLE IF NOT EXISTS dip_documents (
    entity VARCHAR(32) NOT NULL, id VARCHAR(64) NOT NULL, aktualisiert DATETIME NOT NULL,
    datum DATE, titel TEXT, payload JSON NOT NULL, synced_at DATETIME NOT NULL,
    PRIMARY KEY (entity, id));
CREATE INDEX IF NOT EXISTS idx_dip_documents_aktualisiert ON dip_documents (entity, aktualisiert);
"""
UPSERT = """
INSERT INTO dip_documents (entity, id, aktualisiert, datum, titel, payload, synced_at)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (entity, id) DO UPDATE SET aktualisiert = excluded.aktualisiert,
    datum = excluded.datum, titel = excluded.titel, payload = excluded.payload,
    synced_at = excluded.synced_at
"""


def utc_text(stamp: str) -> str:
    moment = datetime.fromisoformat(stamp)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=BERLIN)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def row(entity: str, doc: dict[str, Any], now: str) -> tuple[Any, ...]:
    return (
        entity,
        str(doc["id"]),
        utc_text(doc["aktualisiert"]),
        doc.get("datum"),
        doc.get("titel"),
        json.dumps(doc, ensure_ascii=False),
        now,
    )


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dip_loop", description=__doc__)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--entity", required=True)
    parser.add_argument("--database", required=True, type=Path)
    args = parser.parse_args(argv)

    db = sqlite3.connect(args.database)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(SCHEMA)
    end = datetime.now(UTC).replace(microsecond=0).isoformat()
    cursor: str | None = None
    records = pages = 0
    first: float | None = None
    with httpx.Client(base_url=args.base_url, timeout=60) as client:
        while True:
            params = {"f.aktualisiert.end": end} | ({"cursor": cursor} if cursor else {})
            started = time.monotonic()
            first = first if first is not None else started
            response = client.get(f"/api/v1/{args.entity}", params=params)
            response.raise_for_status()
            page = response.json()
            pages += 1
            documents = page["documents"]
            if documents:
                now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
                with db:  # one transaction per page
                    db.executemany(UPSERT, [row(args.entity, d, now) for d in documents])
                records += len(documents)
            if page["cursor"] == (cursor or "*") and not documents:
                break
            cursor = page["cursor"]
    last = time.monotonic()
    stored = db.execute("SELECT count(*) FROM dip_documents").fetchone()[0]
    db.close()
    report = {
        "records": records,
        "stored": stored,
        "pages": pages,
        "seconds": last - (first or last),
        "peak_rss_mib": peak_rss_mib(),
    }
    print(json.dumps(report))
    return 0 if stored == records else 1


if __name__ == "__main__":
    sys.exit(main())
