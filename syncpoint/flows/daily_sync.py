"""The nightly market sync: universe -> prices -> valuations, resumable per (job, date).

A failed stage is logged and the next one still runs; a rerun of the
same date continues where the last attempt stopped and never requests a done ticker.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, cast

from prefect import get_run_logger

from syncpoint import settings
from syncpoint.core.errors import ConfigError
from syncpoint.engine.batch_map import StageRun
from syncpoint.engine.job_run import JobRun
from syncpoint.flows.job_flow import job_flow
from syncpoint.sources.market import PricesSource, ValuationsSource
from syncpoint.sources.universe import Universe, readable_tickers_file
from syncpoint.tasks.universe import resolve_universe

JOB = "daily-sync"
STAGES = ("universe", "prices", "valuations")


# A retry (automatic, from the dashboard or `prefect flow-run retry`) resumes the run.
@job_flow(JOB)
def daily_sync(
    run_date: str | None = None,
    tickers_file: str | None = None,
    ticker_source: str = "sp500",
    batch_size: int | None = None,
    concurrency: int | None = None,
    max_items: int | None = None,
    price_days: int | None = None,
    fresh: bool = False,
    builtin_api: bool | None = None,
    market_api_block: str | None = None,
    database_block: str | None = None,
    checkpoint_block: str | None = None,
) -> dict[str, Any]:
    """Sync the last `price_days` days of prices and the latest DCF valuations.

    `max_items` caps how many tickers each stage processes in this run (status partial;
    the next run continues). `fresh` discards the date's checkpoint and starts over.
    """
    logger = get_run_logger()
    day = settings.run_date(run_date)
    max_items = settings.positive("max_items", max_items)
    config = settings.resolve_daily_sync(
        batch_size=batch_size,
        concurrency=concurrency,
        price_days=price_days,
        builtin_api=builtin_api,
        market_api_block=market_api_block,
        database_block=database_block,
        checkpoint_block=checkpoint_block,
    )
    # Whoever may start a deployment run sets tickers_file: it is refused here, before the
    # run starts, unless the worker allows the file (resolve-universe checks it again
    # where it reads it).
    tickers_dir = settings.tickers_dir() if tickers_file else None
    if tickers_file:
        readable_tickers_file(tickers_file, tickers_dir)

    with config.api.session() as api:
        if config.api.builtin:
            logger.info("using the built-in market API at %s, as asked", api.base_url)
        with JobRun(
            JOB,
            day.isoformat(),
            data=config.data,
            store=config.checkpoints,
            stages=STAGES,
            params={
                "ticker_source": ticker_source,
                "tickers_file": tickers_file,
                "price_days": config.price_days,
            },
            fresh=fresh,
            logger=logger,
            resume_hint=f"Resume with: syncpoint run {JOB} --date {day.isoformat()}",
            retry_cooldown=config.retry_cooldown,
        ) as run:
            if run.already_complete:
                return run.publish(run.summary())
            run.stage(
                "universe", lambda: _universe(run, ticker_source, tickers_file, tickers_dir, api)
            )
            tickers = lambda: run.items_done("universe")  # noqa: E731
            run.map_stage(
                "prices",
                PricesSource(api, day - timedelta(days=config.price_days), day),
                items=tickers,
                batch_size=config.batch_size,
                max_items=max_items,
            )
            run.map_stage(
                "valuations",
                ValuationsSource(api),
                items=tickers,
                batch_size=config.batch_size,
                max_items=max_items,
            )
            return run.finish()


def _universe(
    run: JobRun,
    ticker_source: str,
    tickers_file: str | None,
    tickers_dir: Path | None,
    api: Any,
) -> StageRun | None:
    if run.ledger.has_items(run.run_id, "universe"):
        return None  # resolved by an earlier attempt: never ask the API for it twice
    universe = cast(
        Universe,
        resolve_universe.submit(ticker_source, tickers_file, api, tickers_dir=tickers_dir).result(),
    )
    for symbol, why in universe.rejected.items():
        run.logger.warning("skipping %r: %s", symbol, why)
    if universe.duplicates:
        run.logger.info("ignored %d duplicate tickers", universe.duplicates)
    if not universe.tickers:
        raise ConfigError("the ticker list has no valid tickers")
    run.register_settled("universe", universe.tickers, universe.rejected)
    return StageRun(requests=universe.requests)
