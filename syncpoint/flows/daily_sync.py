"""The nightly market sync: universe -> prices -> valuations, resumable per (job, date).

A failed stage is logged and the next one still runs; a rerun of the
same date continues where the last attempt stopped and never requests a done ticker.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Literal, cast

from prefect import get_run_logger

from syncpoint import settings
from syncpoint.blocks.market_api import MarketApi
from syncpoint.core.errors import ConfigError
from syncpoint.engine.batch_map import StageRun
from syncpoint.engine.job_run import JobRun
from syncpoint.engine.shards import StageWork
from syncpoint.flows.job_flow import UNSET, Count, Day, Switch, Text, job_flow
from syncpoint.sources.market import PricesSource, ValuationsSource
from syncpoint.sources.source import Source
from syncpoint.sources.universe import Universe, readable_tickers_file
from syncpoint.tasks.universe import resolve_universe

JOB = "daily-sync"
STAGES = ("universe", "prices", "valuations")
# What a shard rebuilds its stage from (besides the run date): the settings as resolved
# by the parent, and the names of the blocks each worker loads itself.
SHARD_SETTINGS = (
    "batch_size",
    "concurrency",
    "price_days",
    "builtin_api",
    "market_api_block",
    "database_block",
    "checkpoint_block",
)


def run_name(parameters: Mapping[str, Any]) -> str:
    """What the run syncs, as its name in the Prefect UI: "daily-sync 2026-11-20"."""
    return f"{JOB} {settings.run_date(parameters.get('run_date')).isoformat()}"


# A retry (automatic, from the dashboard or `prefect flow-run retry`) resumes the run.
@job_flow(JOB, run_name=run_name)
def daily_sync(
    run_date: Day = UNSET,
    tickers_file: Text = UNSET,
    ticker_source: Literal["sp500", "all"] = "sp500",
    batch_size: Count = UNSET,
    concurrency: Count = UNSET,
    max_items: Count = UNSET,
    price_days: Count = UNSET,
    fresh: bool = False,
    builtin_api: Switch = False,
    market_api_block: Text = UNSET,
    database_block: Text = UNSET,
    checkpoint_block: Text = UNSET,
    shards: Count = UNSET,
) -> dict[str, Any]:
    """Sync one day of market data: the tickers, their recent daily prices and their
    latest DCF valuations, into stock_prices and dcf_valuations.

    A run is one date. Running a date again continues where the last attempt stopped and
    never requests a ticker that is done; a completed date does nothing.

    Args:
        run_date: The day to sync; its checkpoint is this date's. Empty: today (UTC).
        tickers_file: A file on the worker with one ticker per line, synced instead of
            the ticker source. The worker reads it only from the folder it allows for
            ticker files.
        ticker_source: The ticker list the API publishes: sp500 (the S&P 500) or all.
        batch_size: Tickers per batch (one fetch and one store each; progress and
            checkpoints move per batch). Empty: the worker's default, 50.
        concurrency: Requests in flight at once. Empty: the Market API block's or the
            worker's setting, else 16.
        max_items: Stop each stage after this many tickers; the run ends partial and the
            next run of the date (or Retry) continues. Empty: all of them.
        price_days: How many days of prices, up to the run date. Empty: the worker's
            setting, else 5.
        fresh: Forget this date's checkpoint and start over. Rows already stored stay
            and are updated, never duplicated.
        builtin_api: Read the built-in API on the worker instead of the configured one.
            It serves made-up prices: for demos and tests only.
        market_api_block: Name of a Syncpoint Market API block (URL, key, pacing).
            Empty: the worker's market API settings.
        database_block: Name of a SqlAlchemy Connector block for the synced tables.
            Empty: the worker's database.
        checkpoint_block: Name of a Syncpoint Checkpoint Store block. Empty: checkpoints
            are kept in the data database.
        shards: Workers to spread the prices and valuations over: child runs of the
            syncpoint-shard/shard deployment, on any worker of its pool. Needs the data
            and checkpoints in PostgreSQL. Empty: 1, this run alone.
    """
    logger = get_run_logger()
    day = settings.run_date(run_date)
    max_items = settings.positive("max_items", max_items)
    config = settings.resolve_daily_sync(
        batch_size=batch_size,
        concurrency=concurrency,
        price_days=price_days,
        # Off means "not asked for here": the worker's SYNCPOINT_BUILTIN_API still counts.
        builtin_api=builtin_api or None,
        market_api_block=market_api_block,
        database_block=database_block,
        checkpoint_block=checkpoint_block,
        shards=shards,
    )
    if config.shards > 1 and max_items is not None:
        raise ConfigError("max_items goes with a run of one worker (shards 1)")
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
            resume_command=resume_command(day, config.batch_size),
            retry_cooldown=config.retry_cooldown,
        ) as run:
            if run.already_complete:
                return run.publish(run.summary())
            run.stage(
                "universe", lambda: _universe(run, ticker_source, tickers_file, tickers_dir, api)
            )
            tickers = lambda: run.items_done("universe")  # noqa: E731
            sources = stage_sources(api, day, config.price_days)
            spread_over = config.spread(
                JOB,
                day.isoformat(),
                {
                    "run_date": day.isoformat(),
                    "batch_size": config.batch_size,
                    "concurrency": config.api.concurrency,
                    "price_days": config.price_days,
                    "builtin_api": config.api.builtin or None,
                    "market_api_block": market_api_block,
                    "database_block": database_block,
                    "checkpoint_block": checkpoint_block,
                },
            )
            for stage in ("prices", "valuations"):
                run.map_stage(
                    stage,
                    sources[stage],
                    items=tickers,
                    batch_size=config.batch_size,
                    max_items=max_items,
                    shards=spread_over,
                )
            return run.finish()


def stage_sources(api: MarketApi, day: date, price_days: int) -> dict[str, Source]:
    """The mapped stages' sources of the run of `day`: one place for the parent and the
    shards."""
    return {
        "prices": PricesSource(api, day - timedelta(days=price_days), day),
        "valuations": ValuationsSource(api),
    }


@contextmanager
def stage_work(stage: str, parameters: Mapping[str, Any]) -> Iterator[StageWork]:
    """One stage of a daily-sync run as a shard rebuilds it from its parameters."""
    day = settings.run_date(parameters.get("run_date"))
    config = settings.resolve_daily_sync(**{k: parameters.get(k) for k in SHARD_SETTINGS})
    with config.api.session() as api:
        sources = stage_sources(api, day, config.price_days)
        if stage not in sources:
            raise ConfigError(f"{JOB} has no stage {stage!r} a shard can work on")
        yield StageWork(config.data, config.checkpoints, sources[stage], config.batch_size)


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
    run.register_universe(universe)
    return StageRun(requests=universe.requests)


def resume_command(day: date, batch_size: int) -> str:
    """The command that continues this run. With its batch size unless it is the default:
    the fetch cache keeps a record per batch, so a rerun in batches of another size
    fetches again what was fetched and not yet stored."""
    size = "" if batch_size == settings.DAILY_BATCH_SIZE else f" --batch-size {batch_size}"
    return f"syncpoint run {JOB} --date {day.isoformat()}{size}"
