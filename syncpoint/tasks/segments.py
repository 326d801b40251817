"""The cursor-stream tasks: read pages until a checkpoint is due, store them with the cursor.

A stream that grows or shrinks while it is read is normal: DIP's numFound counts the
matches *now*, and changes surface all the time. A loop is something else, and the
LoopGuard tells them apart with bounded memory: a cursor or a page seen before, pages in a
row without a single record, or more pages than numFound allows (re-evaluated as it moves).
Any of those ends the window with a warning instead of reading forever.
"""

from __future__ import annotations

import math
import time
import zlib
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from sqlalchemy import select

from syncpoint.blocks.dip_api import DipApi
from syncpoint.core.db import Database, storage_errors
from syncpoint.core.errors import ItemError
from syncpoint.core.interrupts import StopFlag
from syncpoint.core.ledger import Ledger
from syncpoint.core.redact import redact
from syncpoint.core.store import write_then_checkpoint
from syncpoint.core.tables import dip_documents
from syncpoint.sources.documents import (
    FIRST_CURSOR,
    TABLE,
    Window,
    parse_document,
    read_page,
    window_filters,
)

# Pages in a row without a record (empty pages under fresh cursors) that end a window.
IDLE_PAGES = 5
# Pages beyond what numFound allows: some slack for records that enter and leave the
# window while it is read (each can cost a page), growing with the stream.
MARGIN_PAGES = 10
MARGIN_SHARE = 0.02
# Cursors and pages remembered for the repeat checks: enough for any short cycle; a longer
# one runs into the page bound. Memory stays flat however long the stream is.
RECENT = 1000


class _Recent:
    """The last `size` values seen, for membership tests."""

    def __init__(self, size: int = RECENT) -> None:
        self._order: deque[Hashable] = deque()
        self._members: set[Hashable] = set()
        self._size = size

    def __contains__(self, value: Hashable) -> bool:
        return value in self._members

    def add(self, value: Hashable) -> None:
        if value in self._members:
            return
        self._order.append(value)
        self._members.add(value)
        if len(self._order) > self._size:
            self._members.discard(self._order.popleft())


class LoopGuard:
    """What one window's stream has seen, to tell a loop from a stream that moves.

    `pages`, `page_size` and `most_found` carry over from the saved position (a resumed
    window keeps its page bound); the recent cursors and pages live for one run.
    """

    def __init__(
        self, cursor: str | None = None, pages: int = 0, page_size: int = 0, most_found: int = 0
    ) -> None:
        self.pages = pages
        self.page_size = page_size  # the largest page seen: the API's page size
        self.most_found = most_found  # the largest numFound seen in this window
        self.idle = 0  # pages in a row without a record
        self._cursors = _Recent()
        self._pages = _Recent()
        if cursor:
            self._cursors.add(cursor)

    def page_limit(self) -> int | None:
        """The most pages this window may take: what numFound allows at the observed page
        size, the page that signals the end, and the margin; None before any record."""
        if self.page_size == 0:
            return None  # nothing seen yet: the idle count bounds the stream meanwhile
        needed = math.ceil(self.most_found / self.page_size) + 1
        return needed + MARGIN_PAGES + math.ceil(needed * MARGIN_SHARE)

    def check(
        self, sent: str | None, following: str, ids: list[str], num_found: int | None
    ) -> tuple[bool, str | None]:
        """Account for one page: (is it the end of the stream, why the stream must stop)."""
        self.pages += 1
        self.page_size = max(self.page_size, len(ids))
        if num_found is not None:
            self.most_found = max(self.most_found, num_found)
        if ids:
            fingerprint = (len(ids), zlib.crc32("\x1f".join(ids).encode()), ids[0], ids[-1])
            if fingerprint in self._pages:
                return False, f"the API sent a page of {len(ids)} records it had sent before"
            self._pages.add(fingerprint)
        if following == (sent or FIRST_CURSOR) and not ids:
            return True, None  # DIP's end: no records, and the cursor no longer changes
        # Records under an unchanged cursor are no end (DIP's last page still names a new
        # cursor): asked again, such an API would answer the same page, forever.
        if following in self._cursors:
            return False, f"the API repeated cursor {following[:40]!r}"
        self._cursors.add(following)
        self.idle = 0 if ids else self.idle + 1
        if self.idle >= IDLE_PAGES:
            found = "?" if num_found is None else num_found
            return False, f"{self.idle} pages in a row without records (numFound {found})"
        limit = self.page_limit()
        if limit is not None and self.pages > limit:
            return False, (
                f"{self.pages} pages read, more than numFound {self.most_found} allows at "
                f"{self.page_size} records a page ({limit} with the margin)"
            )
        return False, None


@dataclass
class Segment:
    """Pages read until a checkpoint is due; `cursor` is where the next segment starts,
    always after a page that delivered records (a resume never skips past empty pages)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    cursor: str | None = None
    done: bool = False
    stuck: str | None = None
    pages: int = 0
    requests: int = 0
    rejected: int = 0
    num_found: int | None = None
    # The guard as this segment left it, handed back explicitly: a task's arguments are not
    # guaranteed to be the caller's objects under every task runner.
    guard: LoopGuard | None = None


@task(name="fetch-segment", task_run_name="fetch {entity} segment", cache_policy=NO_CACHE)
async def fetch_segment(
    api: DipApi,
    entity: str,
    window: Window,
    cursor: str | None,
    guard: LoopGuard,
    max_records: int,
    max_seconds: float,
    stop: StopFlag,
) -> Segment:
    """Read pages from `cursor` until `max_records` records or `max_seconds` have passed,
    the stream ends, the guard trips or a stop is requested. Updates `guard`."""
    segment = Segment(cursor=cursor, guard=guard)
    walking = cursor  # the cursor of the next request; ahead of segment.cursor on idle pages
    began = time.monotonic()
    async with api.client() as client:
        while not segment.done and not segment.stuck and not stop.requested:
            params = window_filters(window)
            if walking:
                params["cursor"] = walking
            payload = await client.get_json(f"/api/v1/{entity}", params)
            documents, following, num_found = read_page(entity, payload)
            segment.pages += 1
            segment.num_found = num_found
            ids = [str(d.get("id")) for d in documents if isinstance(d, dict)]
            # Even a page that trips the guard is stored: its records are real, and storing
            # one twice is an upsert of the same values.
            segment.done, segment.stuck = guard.check(walking, following, ids, num_found)
            for raw in documents:
                try:
                    segment.rows.append(parse_document(entity, raw))
                except ItemError as exc:
                    segment.rejected += 1
                    if segment.rejected <= 3:
                        get_run_logger().warning(
                            "%s: skipped a record: %s", entity, redact(str(exc))
                        )
            if segment.done or segment.stuck:
                break
            walking = following
            if not documents:
                continue  # idle: the checkpoint cursor stays after the last records
            segment.cursor = following
            if len(segment.rows) >= max_records or time.monotonic() - began >= max_seconds:
                break
        segment.requests = client.requests_sent
    return segment


def stored_versions(data: Database, entity: str, ids: list[str]) -> dict[str, datetime]:
    """The `aktualisiert` already stored for these records (those that are stored)."""
    found: dict[str, datetime] = {}
    table = dip_documents
    with storage_errors(data.describe()), data.engine().connect() as conn:
        for start in range(0, len(ids), 500):
            query = select(table.c.id, table.c.aktualisiert).where(
                table.c.entity == entity, table.c.id.in_(ids[start : start + 500])
            )
            found.update({rid: at for rid, at in conn.execute(query)})
    return found


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
