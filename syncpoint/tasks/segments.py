"""The cursor stream's pieces: reading pages ahead of the checkpoints, guarding against
loops, and the task that stores a segment with its cursor.

Pages are read on threads of their own (PageReader, PageWalker) while the stream stores
the previous segment in a Prefect task: never more than one checkpoint interval of
records is read and not yet stored, so a crash costs at most that many, and storing no
longer stops reading.

A stream that grows or shrinks while it is read is normal: DIP's numFound counts the
matches *now*, and changes surface all the time. A loop is something else, and the
LoopGuard tells them apart with bounded memory: a cursor or a page seen before, pages in a
row without a single record, or more pages than numFound allows (re-evaluated as it moves).
Any of those ends the window with a warning instead of reading forever.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
import zlib
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol

from prefect import task
from prefect.cache_policies import NO_CACHE
from sqlalchemy import select

from syncpoint.blocks.dip_api import DipApi
from syncpoint.core.db import Database, storage_errors
from syncpoint.core.errors import ItemError
from syncpoint.core.http import ApiClient, ClientThread
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
# numFound's growth counts toward the page bound up to this share of the records read: a
# real stream grows far slower than it is read, one that grows as fast never ends.
GROWTH_CREDIT = 0.5
# Cursors and pages remembered for the repeat checks: enough for any short cycle; a longer
# one runs into the page bound. Memory stays flat however long the stream is.
RECENT = 1000
WALKER_POLL_SECONDS = 0.2
WALKER_JOIN_SECONDS = 5.0


class PageReader:
    """One API client for a whole stream, on an event loop thread of its own (a
    ClientThread, as a batch stage has).

    A client per segment (an async task each) paid for new connection pools, their TLS
    contexts and a Prefect client every 500 records: measured, more than the pages
    themselves cost at 20 ms of latency. Here the connections stay open from the first
    page to the last; the walker hands its requests to the client's loop. A request still
    in flight when the stream ends (it failed, or stopped mid-page) is cancelled.
    """

    def __init__(self, api: DipApi) -> None:
        self._clients = ClientThread(api.client())

    def __enter__(self) -> PageReader:
        self._clients.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._clients.__exit__(exc_type, exc, tb)

    def get_page(self, path: str, params: dict[str, str]) -> tuple[Any, int]:
        """The decoded answer and how many requests it took (retries included)."""

        async def read(client: ApiClient) -> tuple[Any, int]:
            return await client.get_json(path, params), client.requests_sent

        return self._clients.run(read)


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

    The counts carry over from the saved position (a resumed window keeps its page
    bound); the recent cursors and pages live for one run.
    """

    def __init__(
        self,
        cursor: str | None = None,
        pages: int = 0,
        page_size: int = 0,
        most_found: int = 0,
        first_found: int | None = None,
        delivered: int = 0,
    ) -> None:
        self.pages = pages
        self.page_size = page_size  # the largest page seen: the API's page size
        self.most_found = most_found  # the largest numFound seen in this window
        self.first_found = first_found  # numFound on the window's first page
        self.delivered = delivered  # records the API sent in this window
        self.idle = 0  # pages in a row without a record
        self._cursors = _Recent()
        self._pages = _Recent()
        if cursor:
            self._cursors.add(cursor)

    def allowed(self) -> int:
        """The records numFound allows: its first value, plus its growth since, counted up
        to GROWTH_CREDIT of the records read."""
        first = self.most_found if self.first_found is None else self.first_found
        growth = min(self.most_found - first, int(self.delivered * GROWTH_CREDIT))
        return first + max(growth, 0)

    def page_limit(self) -> int | None:
        """The most pages this window may take: what numFound allows at the observed page
        size, the page that signals the end, and the margin; None before any record."""
        if self.page_size == 0:
            return None  # nothing seen yet: the idle count bounds the stream meanwhile
        needed = math.ceil(self.allowed() / self.page_size) + 1
        return needed + MARGIN_PAGES + math.ceil(needed * MARGIN_SHARE)

    def check(
        self, sent: str | None, following: str, ids: list[str], num_found: int | None
    ) -> tuple[bool, str | None]:
        """Account for one page: (is it the end of the stream, why the stream must stop)."""
        self.pages += 1
        self.page_size = max(self.page_size, len(ids))
        self.delivered += len(ids)
        if num_found is not None:
            self.most_found = max(self.most_found, num_found)
            if self.first_found is None:
                self.first_found = num_found
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
                f"{self.pages} pages read, more than numFound {self.allowed()} allows at "
                f"{self.page_size} records a page ({limit} with the margin; numFound went "
                f"from {self.first_found} to {self.most_found}, its growth counted up to "
                f"{GROWTH_CREDIT:.0%} of the {self.delivered} records read)"
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
    # The guard's (page size, most numFound) after the segment's last page: what bounds
    # the pages of a resumed window.
    guard_state: tuple[int, int] = (0, 0)

    @property
    def delivered(self) -> int:
        """Records the API sent in this segment, usable or not."""
        return len(self.rows) + self.rejected


@dataclass
class _Page:
    """One answer, parsed and judged by the guard (or how the walk ended)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    rejected: int = 0
    following: str | None = None  # the cursor the answer named
    had_records: bool = False
    num_found: int | None = None
    requests: int = 0
    done: bool = False
    stuck: str | None = None
    last: bool = False  # nothing follows: the end, the guard, a stop or an error
    error: BaseException | None = None
    answered: bool = True  # False: a marker for how the walk ended, not an answer
    guard_state: tuple[int, int] = (0, 0)  # the guard's page size and most numFound after it


class PageWalker:
    """Reads a window's pages ahead of the checkpoints, on a thread of its own.

    The walk never holds more than `budget` records that are not yet committed (the
    request in flight included): a crash re-reads at most `budget` records, however the
    reading and the storing overlap. The stream stores one segment while the walker reads
    the next; storing no longer stops reading, which was what made a checkpointed stream
    slower than a bare loop.
    """

    def __init__(
        self,
        reader: PageReader,
        entity: str,
        window: Window,
        cursor: str | None,
        guard: LoopGuard,
        stop: StopFlag,
        budget: int,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self._reader, self._entity, self._window = reader, entity, window
        self._cursor, self._guard, self._stop = cursor, guard, stop
        self._budget = max(1, budget)
        self._log = log
        self._outstanding = 0  # records read and not yet committed, or reserved
        self._reserved = 0  # the part of it reserved for the request in flight
        self._waiting = False  # held back by the budget (or stopped)
        self._closed = False
        self._changed = threading.Condition()
        self._pages: deque[_Page] = deque()
        # Handed out and not yet committed: handed out again (a store task's retry).
        self._pending: Segment | None = None
        self._resume_at = cursor  # the cursor after the last page with records handed out
        self.error: BaseException | None = None  # why the walk failed, once it has
        self._thread = threading.Thread(target=self._walk, name="syncpoint-pages", daemon=True)

    def __enter__(self) -> PageWalker:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        # A walk waiting for budget ends at once; one in the middle of a request is cut
        # off when the reader closes its client (PageReader.__exit__ cancels it).
        self._thread.join(timeout=WALKER_JOIN_SECONDS)

    @property
    def guard(self) -> LoopGuard:
        return self._guard

    @property
    def waiting(self) -> bool:
        """True while the budget holds the walk back: no request is in flight."""
        with self._changed:
            return self._waiting

    @property
    def finished(self) -> bool:
        """True once the walk is over and every segment was handed out and committed."""
        with self._changed:
            return self._closed and not self._pages and self._pending is None

    def committed(self, segment: Segment) -> None:
        """`segment` is stored with its cursor: budget to read on."""
        with self._changed:
            if segment is self._pending:
                self._pending = None
            self._outstanding = max(0, self._outstanding - segment.delivered)
            self._waiting = False  # until the walk finds itself held back again
            self._changed.notify_all()

    def segment(self, size: int, max_seconds: float) -> Segment | None:
        """The next segment: pages until the next one would take it past `size` records,
        or `max_seconds` have passed, or the walk's last page. The same segment again
        until it is committed. None once the walk is over (see `error`) and everything
        was handed out."""
        if self._pending is not None:
            return self._pending
        segment: Segment | None = None
        deadline = time.monotonic() + max_seconds
        while True:
            page = self._next(deadline if segment is not None else None)
            if page is None:  # the time is up: what there is becomes a checkpoint
                break
            if page.error is not None:
                self.error = page.error  # after the pages read before it are handed out
            if not page.answered:
                break  # stopped, failed or closed: what there is, or None
            segment = segment or Segment(cursor=self._resume_at)
            segment.pages += 1
            segment.requests += page.requests
            segment.rows.extend(page.rows)
            segment.rejected += page.rejected
            segment.num_found = page.num_found if page.num_found is not None else segment.num_found
            if page.had_records:
                segment.cursor = self._resume_at = page.following
            segment.done, segment.stuck = page.done, page.stuck
            segment.guard_state = page.guard_state
            # Cut before the next page would take the segment past `size`: the walker
            # reads the rest of the budget while this segment is stored.
            if page.last or segment.delivered + max(self._guard.page_size, 1) > size:
                break
        self._pending = segment
        return segment

    def _next(self, deadline: float | None) -> _Page | None:
        with self._changed:
            while not self._pages:
                if self._closed:
                    return _Page(last=True, answered=False)
                timeout = None if deadline is None else deadline - time.monotonic()
                if timeout is not None and timeout <= 0:
                    return None
                self._changed.wait(timeout)
            page = self._pages.popleft()
            if page.last:
                self._closed = True
            return page

    def _walk(self) -> None:
        walking = self._cursor
        try:
            while True:
                if not self._wait_for_budget():
                    self._put(_Page(last=True, answered=False))
                    return
                params = window_filters(self._window)
                if walking:
                    params["cursor"] = walking
                payload, requests = self._reader.get_page(f"/api/v1/{self._entity}", params)
                page = self._page(walking, payload)
                page.requests = requests
                self._put(page)
                if page.last:
                    return
                walking = page.following
        except BaseException as exc:  # the stream raises it once the pages before are stored
            self._put(_Page(last=True, error=exc, answered=False))

    def _page(self, sent: str | None, payload: Any) -> _Page:
        documents, following, num_found = read_page(self._entity, payload)
        ids = [str(d.get("id")) for d in documents if isinstance(d, dict)]
        # Even a page that trips the guard is stored: its records are real, and storing
        # one twice is an upsert of the same values.
        done, stuck = self._guard.check(sent, following, ids, num_found)
        page = _Page(
            following=following,
            had_records=bool(documents),
            num_found=num_found,
            done=done,
            stuck=stuck,
            last=done or stuck is not None,
            # Taken now: the walker's guard moves on while this page waits to be stored.
            guard_state=(self._guard.page_size, self._guard.most_found),
        )
        for raw in documents:
            try:
                page.rows.append(parse_document(self._entity, raw))
            except ItemError as exc:
                page.rejected += 1
                if page.rejected <= 3:
                    self._log.warning("%s: skipped a record: %s", self._entity, redact(str(exc)))
        return page

    def _wait_for_budget(self) -> bool:
        """Block until the next page fits the budget; False if the walk must stop."""
        # The next page holds at most as many records as the largest one so far.
        estimate = max(self._guard.page_size, 1)
        with self._changed:
            while not self._closed and not self._stop.requested:
                if self._outstanding + estimate <= self._budget or self._outstanding == 0:
                    self._outstanding += estimate
                    self._reserved, self._waiting = estimate, False
                    return True
                self._waiting = True
                # The stop flag is a plain flag: look at it now and then.
                self._changed.wait(WALKER_POLL_SECONDS)
            return False

    def _put(self, page: _Page) -> None:
        with self._changed:
            # The reservation becomes what the page really held.
            self._outstanding += len(page.rows) + page.rejected - self._reserved
            self._outstanding, self._reserved = max(self._outstanding, 0), 0
            self._pages.append(page)
            self._changed.notify_all()


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


class Checkpointer(Protocol):
    """What the stream engine does around each stored segment (see store_segments)."""

    def position_after(self, segment: Segment) -> dict[str, Any]:
        """The position to save with the segment; no side effects, so a retry may ask
        again."""

    def stored(self, segment: Segment, rows_written: int) -> None:
        """The segment and its position are committed."""


@task(
    name="store-segments",
    task_run_name="store {entity} segments",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[1, 5],
)
def store_segments(
    data: Database,
    checkpoints: Database,
    run_id: str,
    entity: str,
    walker: PageWalker,
    checkpointer: Checkpointer,
    segment_size: int,
    max_seconds: float,
    task_seconds: float,
) -> int:
    """Store the walker's segments as they come, each with the cursor after it in its own
    transaction, for about `task_seconds`; returns the rows written.

    One task run covers many checkpoints: a task run costs ~15 ms of CPU, which a task
    per checkpoint paid every 200 records, more than their upsert. A retry stores the
    segment that failed again (the walker hands it out until it is committed).
    """
    ledger = Ledger(checkpoints.engine())
    began, written = time.monotonic(), 0
    while time.monotonic() - began < task_seconds:
        segment = walker.segment(segment_size, max_seconds)
        if segment is None:
            break
        save = functools.partial(
            ledger.save_stream, run_id=run_id, stream=checkpointer.position_after(segment)
        )
        rows = write_then_checkpoint(data, checkpoints, TABLE, segment.rows, save)
        walker.committed(segment)
        checkpointer.stored(segment, rows)
        written += rows
        if segment.done or segment.stuck:
            break
    return written
