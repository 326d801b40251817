"""The command a run prints to be continued: the same run, in batches of the same size
(the fetch cache keeps a record per batch, so other batches would fetch again what was
fetched and not yet stored)."""

from __future__ import annotations

from datetime import date

from syncpoint import settings
from syncpoint.flows import daily_sync, fill_cache

DAY = date(2026, 11, 20)


def test_daily_sync_names_a_batch_size_other_than_the_default() -> None:
    assert daily_sync.resume_command(DAY, settings.DAILY_BATCH_SIZE) == (
        "syncpoint run daily-sync --date 2026-11-20"
    )
    assert daily_sync.resume_command(DAY, 10) == (
        "syncpoint run daily-sync --date 2026-11-20 --batch-size 10"
    )


def test_fill_cache_names_a_batch_size_other_than_the_default() -> None:
    first = date(2021, 11, 20)
    plain = "syncpoint run fill-cache --ticker-source custom --tickers A,B"
    plain += " --start 2021-11-20 --end 2026-11-20"
    assert fill_cache.resume_command("custom", ["B", "A"], first, DAY) == plain
    assert fill_cache.resume_command("custom", ["B", "A"], first, DAY, 20) == (
        plain + " --batch-size 20"
    )
