"""The cursor stream's window planning, its loop guard and the validation of a saved
stream position.

plan_window decides which records a document-sync run asks for and how it recovers
(seed 004): a fresh start, a checkpoint resume from the saved cursor, or a retry of an
interrupted window from its beginning; a fresh window reaches back by the API's visibility
delay. The LoopGuard tells a stream that loops from one that grows. Positions come back
from the ledger as JSON and are validated before any of that.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from syncpoint.core.errors import CheckpointError
from syncpoint.engine.stream import (
    COUNTS,
    FRESH,
    RESUME,
    RETRY,
    StreamPosition,
    load_position,
    plan_window,
    shift,
)
from syncpoint.tasks.segments import IDLE_PAGES, RECENT, LoopGuard

T0 = "2026-11-01T00:00:00+00:00"
E1 = "2026-11-19T23:59:59+00:00"
E2 = "2026-11-20T23:59:59+00:00"
SINCE = "2026-11-10T00:00:00+00:00"

# A window that was read to its end: the next one starts at its end.
COMPLETED = StreamPosition(
    window_start=T0,
    window_end=E1,
    finished=True,
    records=40,
    pages=4,
    checkpoints=2,
    newest="2026-11-19T18:00:00+00:00",
    watermark=E1,
    total_records=140,
)
# A window a crash or a signal stopped half way, with the cursor saved after 20 records.
INTERRUPTED = StreamPosition(
    window_start=E1,
    window_end=E2,
    cursor="AoJw9f2",
    records=20,
    pages=2,
    checkpoints=1,
    newest="2026-11-20T08:00:00+00:00",
    watermark=E1,
    total_records=160,
)


def test_a_first_run_reads_everything_up_to_the_end() -> None:
    position, mode = plan_window(None, resume=False, since=None, end=E2)

    assert mode == FRESH
    assert position == StreamPosition(window_start=None, window_end=E2)
    assert (position.cursor, position.watermark, position.total_records) == (None, None, 0)


def test_a_first_run_with_since_starts_there() -> None:
    position, mode = plan_window(None, resume=True, since=SINCE, end=E2)

    assert mode == FRESH
    assert position == StreamPosition(window_start=SINCE, window_end=E2)


@pytest.mark.parametrize("resume", [False, True], ids=["plain", "resume"])
def test_after_a_completed_window_the_next_starts_at_its_watermark(resume: bool) -> None:
    position, mode = plan_window(COMPLETED, resume=resume, since=None, end=E2)

    assert mode == FRESH
    # Counts of the window start over; the running total and the watermark carry on.
    assert position == StreamPosition(
        window_start=E1, window_end=E2, watermark=E1, total_records=140
    )
    assert position is not COMPLETED


def test_since_overrides_the_watermark_of_a_completed_window() -> None:
    position, mode = plan_window(COMPLETED, resume=False, since=SINCE, end=E2)

    assert mode == FRESH
    assert position == StreamPosition(
        window_start=SINCE, window_end=E2, watermark=E1, total_records=140
    )


def test_an_interrupted_window_resumes_from_its_cursor_when_asked() -> None:
    position, mode = plan_window(INTERRUPTED, resume=True, since=None, end="2026-11-21T00:00:00")

    assert mode == RESUME
    # The very position that was saved: same window (a new end is not taken), same
    # cursor and counts, so the stream carries on after the 20 records it stored.
    assert position == INTERRUPTED
    assert (position.window_end, position.cursor, position.records) == (E2, "AoJw9f2", 20)


@pytest.mark.parametrize(
    ("previous", "resume"),
    [
        pytest.param(INTERRUPTED, False, id="without-resume"),
        pytest.param(replace(INTERRUPTED, cursor=None), True, id="resume-but-no-cursor"),
    ],
)
def test_an_interrupted_window_is_retried_from_its_beginning(
    previous: StreamPosition, resume: bool
) -> None:
    position, mode = plan_window(previous, resume=resume, since=None, end=E2)

    assert mode == RETRY
    assert position == StreamPosition(
        window_start=E1, window_end=E2, watermark=E1, total_records=160
    )
    assert (position.cursor, position.records, position.pages, position.checkpoints) == (
        None,
        0,
        0,
        0,
    )


def test_a_retry_takes_since_and_the_new_end() -> None:
    later = "2026-11-22T23:59:59+00:00"
    position, mode = plan_window(INTERRUPTED, resume=False, since=SINCE, end=later)

    assert mode == RETRY
    assert (position.window_start, position.window_end) == (SINCE, later)
    assert position.watermark == E1  # not moved: the window was never completed


def test_a_window_the_loop_guard_ended_is_read_again_without_resume() -> None:
    guarded = replace(INTERRUPTED, guard="the API repeated cursor 'AoJw9f2'")

    position, mode = plan_window(guarded, resume=False, since=None, end=E2)

    assert mode == RETRY
    assert (position.window_start, position.guard, position.cursor) == (E1, None, None)


def test_a_window_the_loop_guard_ended_is_read_again_with_resume() -> None:
    guarded = replace(INTERRUPTED, guard="the API repeated cursor 'AoJw9f2'")

    position, mode = plan_window(guarded, resume=True, since=None, end=E2)

    # From its saved cursor (the records before it are stored), with the guard lifted so
    # the stream reads on; an upstream still broken trips it again.
    assert mode == RESUME
    assert position.guard is None
    assert position == replace(guarded, guard=None)
    assert guarded.guard is not None  # the saved position itself is not changed


# --- the overlap ---------------------------------------------------------------------------

DELAY = timedelta(minutes=15)


def test_a_fresh_window_reaches_back_by_the_visibility_delay() -> None:
    position, mode = plan_window(COMPLETED, resume=False, since=None, end=E2, overlap=DELAY)

    assert mode == FRESH
    assert position.window_start == "2026-11-19T23:44:59+00:00"
    assert position.overlap_until == E1  # records up to here were the last window's
    assert (position.watermark, position.window_end) == (E1, E2)


def test_without_a_delay_there_is_no_overlap() -> None:
    position, _ = plan_window(COMPLETED, resume=False, since=None, end=E2)

    assert (position.window_start, position.overlap_until) == (E1, None)


def test_a_first_window_and_since_have_no_overlap() -> None:
    first, _ = plan_window(None, resume=False, since=None, end=E2, overlap=DELAY)
    given, _ = plan_window(COMPLETED, resume=False, since=SINCE, end=E2, overlap=DELAY)

    assert (first.window_start, first.overlap_until) == (None, None)
    assert (given.window_start, given.overlap_until) == (SINCE, None)


def test_a_retried_window_keeps_its_overlap_and_a_resumed_one_its_counts() -> None:
    overlapping = replace(
        INTERRUPTED,
        window_start=shift(E1, -DELAY),
        overlap_until=E1,
        overlap_records=3,
        late_records=1,
    )

    retried, _ = plan_window(overlapping, resume=False, since=None, end=E2, overlap=DELAY)
    resumed, _ = plan_window(overlapping, resume=True, since=None, end=E2, overlap=DELAY)

    assert (retried.window_start, retried.overlap_until) == (shift(E1, -DELAY), E1)
    assert (retried.overlap_records, retried.late_records) == (0, 0)  # counted again
    assert resumed == overlapping


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        pytest.param("2026-11-20T00:05:00+00:00", "2026-11-19T23:50:00+00:00", id="utc"),
        # The same instant written in Berlin time: the offset is kept as an instant.
        pytest.param("2026-11-20T01:05:00+01:00", "2026-11-19T23:50:00+00:00", id="berlin"),
        pytest.param("2026-03-29T03:05:00+02:00", "2026-03-29T00:50:00+00:00", id="dst-day"),
    ],
)
def test_shift_works_on_instants(stamp: str, expected: str) -> None:
    assert shift(stamp, -DELAY) == expected


# --- the loop guard ---------------------------------------------------------------------------


def ids(start: int, count: int) -> list[str]:
    return [str(n) for n in range(start, start + count)]


def test_a_stream_that_grows_is_not_a_loop() -> None:
    # 10 pages of 100 while numFound rises from 1000 to 1012, then the end: 12 short.
    guard = LoopGuard()
    cursor = None
    for page in range(10):
        assert guard.check(cursor, f"c{page}", ids(page * 100, 100), 1000 + page) == (False, None)
        cursor = f"c{page}"

    assert guard.check(cursor, cursor, [], 1012) == (True, None)
    assert (guard.pages, guard.page_size, guard.most_found) == (11, 100, 1012)


def test_the_end_is_the_cursor_that_no_longer_changes() -> None:
    guard = LoopGuard()

    assert guard.check(None, "c1", ids(0, 3), 3) == (False, None)
    assert guard.check("c1", "c1", [], 3) == (True, None)
    assert LoopGuard().check(None, "*", [], 0) == (True, None)  # nothing at all


def test_records_under_an_unchanged_cursor_are_no_end() -> None:
    # DIP's last page still names a new cursor; the same cursor with records again is an
    # upstream serving one page forever.
    guard = LoopGuard()
    guard.check(None, "c1", ids(0, 50), 600)

    assert guard.check("c1", "c1", ids(50, 50), 600) == (False, "the API repeated cursor 'c1'")


def test_a_repeated_cursor_is_a_loop() -> None:
    guard = LoopGuard()
    guard.check(None, "c1", ids(0, 10), 30)
    guard.check("c1", "c2", ids(10, 10), 30)

    done, stuck = guard.check("c2", "c1", ids(20, 10), 30)

    assert not done
    assert stuck == "the API repeated cursor 'c1'"


def test_a_page_seen_before_is_a_loop_even_under_a_fresh_cursor() -> None:
    guard = LoopGuard()
    guard.check(None, "c1", ids(0, 10), 30)

    done, stuck = guard.check("c1", "c2", ids(0, 10), 30)

    assert (done, stuck) == (False, "the API sent a page of 10 records it had sent before")


def test_empty_pages_under_fresh_cursors_end_after_the_idle_limit() -> None:
    # What used to run 413 requests until killed: numFound 3, pages empty, cursors new.
    guard = LoopGuard()
    results = [guard.check(f"c{n}", f"c{n + 1}", [], 3) for n in range(IDLE_PAGES)]

    assert all(result == (False, None) for result in results[:-1])
    assert results[-1] == (False, f"{IDLE_PAGES} pages in a row without records (numFound 3)")


def test_a_page_with_records_resets_the_idle_count() -> None:
    guard = LoopGuard()
    for n in range(IDLE_PAGES - 1):
        guard.check(f"e{n}", f"e{n + 1}", [], 100)
    guard.check("x", "y", ids(0, 1), 100)

    assert guard.idle == 0
    assert guard.check("y", "z", [], 100) == (False, None)


def test_more_pages_than_num_found_allows_is_a_loop() -> None:
    # 1 record a page, fresh ids and cursors forever, numFound 5: allowed 5 pages, the end
    # page and the margin.
    guard = LoopGuard()
    reasons = [guard.check(f"c{n}", f"c{n + 1}", [f"id{n}"], 5)[1] for n in range(100)]

    tripped = next(n for n, reason in enumerate(reasons) if reason)
    assert guard.page_limit() == 5 + 1 + 10 + 1
    assert tripped == guard.page_limit()  # the first page past the limit
    assert "numFound 5 allows at 1 records a page" in str(reasons[tripped])


def test_the_page_bound_follows_num_found_as_it_grows() -> None:
    guard = LoopGuard()
    guard.check(None, "c0", ids(0, 100), 1_000)
    before = guard.page_limit()
    guard.check("c0", "c1", ids(100, 100), 1_060)  # 60 records surfaced meanwhile
    after = guard.page_limit()

    assert (before, after) == (10 + 1 + 10 + 1, 11 + 1 + 10 + 1)
    assert guard.allowed() == 1_060


def test_growth_counts_only_up_to_half_the_records_read() -> None:
    # numFound jumps to 50,000 after 200 records: credited 100 of its growth, not 49,000.
    guard = LoopGuard()
    guard.check(None, "c0", ids(0, 100), 1_000)
    guard.check("c0", "c1", ids(100, 100), 50_000)

    assert guard.allowed() == 1_000 + 100
    assert guard.page_limit() == 11 + 1 + 10 + 1


def test_num_found_that_grows_as_fast_as_the_reading_ends_the_window() -> None:
    # Every page brings new records, and numFound a page more: the end never comes nearer.
    guard = LoopGuard()
    reasons = [
        guard.check(f"c{n}", f"c{n + 1}", ids(n * 10, 10), 30 + (n + 1) * 10)[1] for n in range(200)
    ]

    tripped = next(n for n, reason in enumerate(reasons) if reason)
    assert tripped < 50
    assert "pages read, more than numFound" in str(reasons[tripped])


def test_a_resumed_window_keeps_what_bounds_it() -> None:
    guard = LoopGuard("c41", pages=41, page_size=100, most_found=4_000, first_found=4_000,
                      delivered=4_100)  # fmt: skip

    assert guard.page_limit() == 41 + 10 + 1
    assert guard.check("c41", "c41", [], 4_000) == (True, None)  # the saved cursor's end
    assert guard.pages == 42


def test_the_guard_remembers_a_bounded_number_of_cursors() -> None:
    guard = LoopGuard()
    for n in range(RECENT + 5):
        guard.check(f"c{n}", f"c{n + 1}", [f"id{n}"], 10**9)

    # The oldest fell out of memory (a cycle that long meets the page bound instead).
    assert guard.check("x", "c1", ["fresh"], 10**9) == (False, None)
    assert guard.check("y", f"c{RECENT}", ["fresher"], 10**9)[1] is not None


# --- StreamPosition.from_dict and load_position ---------------------------------------------


def test_a_position_survives_its_round_trip() -> None:
    for position in (COMPLETED, INTERRUPTED, StreamPosition(None, E2)):
        assert StreamPosition.from_dict(position.to_dict()) == position


def test_a_position_with_only_its_required_fields_gets_the_defaults() -> None:
    position = StreamPosition.from_dict({"window_start": None, "window_end": E2})

    assert position == StreamPosition(None, E2)
    assert (position.records, position.finished, position.guard) == (0, False, None)


BAD_POSITIONS = [
    pytest.param(
        {**INTERRUPTED.to_dict(), "page_token": "x"},
        "unknown or missing fields ['page_token']",
        id="unknown-field",
    ),
    pytest.param({"window_start": None}, "unknown or missing fields", id="no-window-end"),
    pytest.param(
        {"window_start": None, "window_end": 20261120},
        "unknown or missing fields",
        id="window-end-a-number",
    ),
    *[
        pytest.param(
            {**INTERRUPTED.to_dict(), name: -1},
            f"stream position {name} is not a count",
            id=f"negative-{name}",
        )
        for name in COUNTS
    ],
    pytest.param(
        {**INTERRUPTED.to_dict(), "records": "20"},
        "stream position records is not a count",
        id="records-a-string",
    ),
    pytest.param(
        {**INTERRUPTED.to_dict(), "num_found": -3},
        "stream position num_found is not a count",
        id="negative-num_found",
    ),
    pytest.param(
        {**INTERRUPTED.to_dict(), "pages": True},
        "stream position pages is not a count",
        id="pages-a-bool",
    ),
]


@pytest.mark.parametrize(("raw", "reason"), BAD_POSITIONS)
def test_from_dict_rejects_a_damaged_position(raw: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError, match="stream position") as caught:
        StreamPosition.from_dict(raw)
    assert reason in str(caught.value)


@pytest.mark.parametrize(("raw", "reason"), BAD_POSITIONS)
def test_load_position_names_the_reset_command(raw: dict[str, Any], reason: str) -> None:
    with pytest.raises(CheckpointError) as caught:
        load_position(raw, "document-sync", "person", "run-7")

    assert str(caught.value) == (
        f"checkpoint for document-sync person (run run-7) is unusable: "
        f"{_reason(raw)!s}. Reset it with: syncpoint checkpoints reset document-sync "
        f"--key person"
    )
    assert reason in str(caught.value)


def test_load_position_turns_a_missing_start_into_a_checkpoint_error() -> None:
    # window_start has no default: the dataclass itself refuses (TypeError), and that too
    # comes out as the checkpoint error with its reset command.
    with pytest.raises(CheckpointError, match="window_start") as caught:
        load_position({"window_end": E2}, "document-sync", "vorgang", "run-8")
    assert str(caught.value).endswith(
        "Reset it with: syncpoint checkpoints reset document-sync --key vorgang"
    )


def test_load_position_of_nothing_saved_is_none_and_of_a_good_one_the_position() -> None:
    assert load_position(None, "document-sync", "person", "run-7") is None
    assert load_position(COMPLETED.to_dict(), "document-sync", "person", "run-7") == COMPLETED


def _reason(raw: dict[str, Any]) -> str:
    """The ValueError from_dict raises for `raw`: what load_position wraps."""
    try:
        StreamPosition.from_dict(raw)
    except ValueError as exc:
        return str(exc)
    raise AssertionError(f"from_dict accepted {raw}")
