"""The historical backfill: fill stock_prices for many tickers in small batches.

A run is (ticker source, start, end). Tickers whose range is already stored are settled
before any request; the rest go in batches of `batch_size` (default 5, the grain of
progress and of checkpoints) until done, or until `max_batches` for a time-boxed run
(status partial; the next run continues).
`retry_failed` reopens the run and reprocesses only the tickers that failed.
"""

from __future__ import annotations

import hashlib
from datetime import date
from typing import Any, cast

from prefect import get_run_logger

from syncpoint import settings
from syncpoint.blocks.market_api import MarketApi
from syncpoint.core.errors import ConfigError
from syncpoint.core.store import cached_tickers
from syncpoint.engine.batch_map import StageRun
from syncpoint.engine.job_run import JobRun
from syncpoint.flows.job_flow import job_flow
from syncpoint.sources.market import PricesSource
from syncpoint.sources.universe import Universe
from syncpoint.tasks.universe import resolve_universe

JOB = "fill-cache"
STAGES = ("universe", "history")


@job_flow(JOB)
def fill_cache(
    ticker_source: str = "sp500",
    tickers: list[str] | None = None,
    batch_size: int | None = None,
    concurrency: int | None = None,
    start: str | None = None,
    end: str | None = None,
    max_batches: int | None = None,
    retry_failed: bool = False,
    builtin_api: bool | None = None,
    market_api_block: str | None = None,
    database_block: str | None = None,
    checkpoint_block: str | None = None,
) -> dict[str, Any]:
    """Fill the price history of `ticker_source` (sp500 | all | custom with `tickers`)
    between `start` and `end` (default: five years back to yesterday)."""
    logger = get_run_logger()
    first, last = settings.history_range(start, end)
    max_batches = settings.positive("max_batches", max_batches)
    config = settings.resolve_fill_cache(
        batch_size=batch_size,
        concurrency=concurrency,
        builtin_api=builtin_api,
        market_api_block=market_api_block,
        database_block=database_block,
        checkpoint_block=checkpoint_block,
    )
    key = run_key(ticker_source, tickers, first, last)

    with (
        config.api.session() as api,
        JobRun(
            JOB,
            key,
            data=config.data,
            store=config.checkpoints,
            stages=STAGES,
            params={"ticker_source": ticker_source, "batch_size": config.batch_size},
            fresh=False,
            logger=logger,
            resume_hint=f"Resume with the same command (run {JOB} {key}).",
            reopen=retry_failed,
            retry_cooldown=config.retry_cooldown,
        ) as run,
    ):
        if run.already_complete:
            return run.publish(run.summary())
        run.stage("universe", lambda: _universe(run, ticker_source, tickers, api, first, last))
        only = None
        if retry_failed:
            only = frozenset(run.ledger.requeue_failed(run.run_id, "history"))
            logger.info("retrying %d failed tickers only", len(only))
        run.map_stage(
            "history",
            PricesSource(api, first, last),
            items=lambda: run.items_done("universe"),
            batch_size=config.batch_size,
            max_batches=max_batches,
            only=only,
        )
        return run.finish()


def run_key(source: str, tickers: list[str] | None, first: date, last: date) -> str:
    """sp500:2021-11-22:2026-11-21, or custom-<digest of the list>:... for custom lists."""
    if source == "custom":
        digest = hashlib.sha256(",".join(sorted(set(tickers or []))).encode()).hexdigest()[:10]
        source = f"custom-{digest}"
    return f"{source}:{first.isoformat()}:{last.isoformat()}"


def _universe(
    run: JobRun,
    source: str,
    tickers: list[str] | None,
    api: MarketApi,
    first: date,
    last: date,
) -> StageRun | None:
    if run.ledger.has_items(run.run_id, "universe"):
        return None
    universe = cast(Universe, resolve_universe.submit(source, None, api, tickers).result())
    for symbol, why in universe.rejected.items():
        run.logger.warning("skipping %r: %s", symbol, why)
    if not universe.tickers:
        raise ConfigError("the ticker list has no valid tickers")
    run.register_settled("universe", universe.tickers, universe.rejected)
    with run.data.engine().connect() as conn:
        cached = cached_tickers(conn, universe.tickers, first, last)
    # Cached tickers count as processed, and are never requested.
    run.register_settled("history", sorted(cached), {})
    run.logger.info(
        "tickersToProcess %d of %d (%d already cached)",
        len(universe.tickers) - len(cached),
        len(universe.tickers),
        len(cached),
    )
    return StageRun(requests=universe.requests)
