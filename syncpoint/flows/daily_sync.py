"""The nightly market sync: universe -> prices -> valuations, resumable per (job, date).

Seeds 000 and 002: a failed stage is logged and the next one still runs; a rerun of the
same date continues where the last attempt stopped and never requests a done ticker.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

from prefect import get_run_logger

from syncpoint import settings
from syncpoint.engine.batch_map import StageRun
from syncpoint.engine.job_run import JobRun
from syncpoint.flows.job_flow import job_flow
from syncpoint.sources.market import PricesSource, ValuationsSource
from syncpoint.sources.universe import Universe
from syncpoint.tasks.universe import resolve_universe

JOB = "daily-sync"
STAGES = ("universe", "prices", "valuations")


# A retry (automatic, from the dashboard or `prefect flow-run retry`) resumes the run.
@job_flow(JOB)
def daily_sync(
    run_date: str | None = None,
    tickers_file: str | None = None,
    ticker_source: str = "sp500",
    batch_size: int = 50,
    concurrency: int | None = None,
    max_items: int | None = None,
    fresh: bool = False,
    market_api_block: str | None = None,
    database_block: str | None = None,
    checkpoint_block: str | None = None,
) -> dict[str, Any]:
    """Sync prices (last SYNC_DAYS_STOCK_PRICES days) and DCF valuations for a ticker set.

    `max_items` caps how many tickers each stage processes in this run (status partial;
    the next run continues). `fresh` discards the date's checkpoint and starts over.
    """
    logger = get_run_logger()
    day = settings.run_date(run_date)
    batch_size = settings.positive("batch_size", batch_size) or 1
    max_items = settings.positive("max_items", max_items, allow_none=True)
    price_days = settings.env_int("SYNC_DAYS_STOCK_PRICES", 5)
    data = settings.database(database_block)

    with settings.market_api_session(market_api_block, concurrency) as (api, built_in):
        if built_in:
            logger.info(
                "MARKET_API_URL is not set: using the built-in market API at %s", api.base_url
            )
        with JobRun(
            JOB,
            day.isoformat(),
            data=data,
            store=settings.checkpoint_store(checkpoint_block),
            stages=STAGES,
            params={
                "ticker_source": ticker_source,
                "tickers_file": tickers_file,
                "price_days": price_days,
            },
            fresh=fresh,
            logger=logger,
            resume_hint=f"Resume with: syncpoint run {JOB} --date {day.isoformat()}",
        ) as run:
            if run.already_complete:
                return run.publish(run.summary())
            run.stage("universe", lambda: _universe(run, ticker_source, tickers_file, api))
            tickers = lambda: run.items_done("universe")  # noqa: E731
            run.map_stage(
                "prices",
                PricesSource(api, day - timedelta(days=price_days), day),
                items=tickers,
                batch_size=batch_size,
                max_items=max_items,
            )
            run.map_stage(
                "valuations",
                ValuationsSource(api),
                items=tickers,
                batch_size=batch_size,
                max_items=max_items,
            )
            return run.finish()


def _universe(
    run: JobRun, ticker_source: str, tickers_file: str | None, api: Any
) -> StageRun | None:
    if run.ledger.has_items(run.run_id, "universe"):
        return None  # resolved by an earlier attempt: never ask the API for it twice
    universe = cast(Universe, resolve_universe.submit(ticker_source, tickers_file, api).result())
    for symbol, why in universe.rejected.items():
        run.logger.warning("skipping %r: %s", symbol, why)
    if universe.duplicates:
        run.logger.info("ignored %d duplicate tickers", universe.duplicates)
    if not universe.tickers:
        from syncpoint.core.errors import ConfigError

        raise ConfigError("the ticker list has no valid tickers")
    run.register_settled("universe", universe.tickers, universe.rejected)
    return StageRun(requests=universe.requests)
