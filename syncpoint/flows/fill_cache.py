"""The historical backfill: fill stock_prices for many tickers in small batches.

A run is (ticker source, start, end). Tickers whose range is already stored are settled
before any request; the rest go in batches of `batch_size` (default 5, the grain of
progress and of checkpoints) until done, or until `max_batches` for a time-boxed run
(status partial; the next run continues).
`retry_failed` reopens the run and reprocesses only the tickers that failed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import date
from typing import Any, Literal, cast

from prefect import get_run_logger

from syncpoint import settings
from syncpoint.blocks.market_api import MarketApi
from syncpoint.core.errors import ConfigError
from syncpoint.core.store import cached_tickers
from syncpoint.engine.batch_map import StageRun
from syncpoint.engine.job_run import JobRun
from syncpoint.engine.shards import StageWork
from syncpoint.flows.job_flow import UNSET, Count, Day, Switch, Text, Texts, job_flow
from syncpoint.sources.market import PricesSource
from syncpoint.sources.universe import Universe
from syncpoint.tasks.universe import resolve_universe

JOB = "fill-cache"
STAGES = ("universe", "history")
# What a shard rebuilds the history stage from (besides the range): the settings as
# resolved by the parent, and the names of the blocks each worker loads itself.
SHARD_SETTINGS = (
    "batch_size",
    "concurrency",
    "builtin_api",
    "market_api_block",
    "database_block",
    "checkpoint_block",
)


def run_name(parameters: Mapping[str, Any]) -> str:
    """What the run fills, as its name: "fill-cache sp500 2021-11-22..2026-11-21"."""
    first, last = settings.history_range(parameters.get("start"), parameters.get("end"))
    source = parameters.get("ticker_source") or "sp500"
    if source == "custom":
        source = f"{len(set(parameters.get('tickers') or []))} tickers"
    return f"{JOB} {source} {first.isoformat()}..{last.isoformat()}"


@job_flow(JOB, run_name=run_name)
def fill_cache(
    ticker_source: Literal["sp500", "all", "custom"] = "sp500",
    tickers: Texts = UNSET,
    batch_size: Count = UNSET,
    concurrency: Count = UNSET,
    start: Day = UNSET,
    end: Day = UNSET,
    max_batches: Count = UNSET,
    retry_failed: bool = False,
    builtin_api: Switch = False,
    market_api_block: Text = UNSET,
    database_block: Text = UNSET,
    checkpoint_block: Text = UNSET,
    shards: Count = UNSET,
) -> dict[str, Any]:
    """Fill the daily price history of a ticker set between two dates into stock_prices.

    A run is (ticker set, start, end): run it again, or press Retry, to continue it.
    Tickers whose history is already stored are counted as done and never requested.

    Args:
        ticker_source: Which tickers: sp500 (the S&P 500), all (every ticker the API
            lists) or custom (the tickers below).
        tickers: With ticker_source custom: the tickers to fill, one per item.
        batch_size: Tickers per batch (progress and checkpoints move per batch). Empty:
            5.
        concurrency: Requests in flight at once. Empty: the Market API block's or the
            worker's setting, else 16.
        start: First day of the history. Empty: five years before the end.
        end: Last day of the history. Empty: yesterday (UTC).
        max_batches: Stop after this many batches, for a time-boxed run; the run ends
            partial and the next run (or Retry) continues. Empty: no limit.
        retry_failed: Reprocess only the tickers that failed in this run before.
        builtin_api: Read the built-in API on the worker instead of the configured one.
            It serves made-up prices: for demos and tests only.
        market_api_block: Name of a Syncpoint Market API block (URL, key, pacing).
            Empty: the worker's market API settings.
        database_block: Name of a SqlAlchemy Connector block for the synced tables.
            Empty: the worker's database.
        checkpoint_block: Name of a Syncpoint Checkpoint Store block. Empty: checkpoints
            are kept in the data database.
        shards: Workers to spread the history over: child runs of the
            syncpoint-shard/shard deployment, on any worker of its pool. Needs the data
            and checkpoints in PostgreSQL. Empty: 1, this run alone.
    """
    logger = get_run_logger()
    first, last = settings.history_range(start, end)
    max_batches = settings.positive("max_batches", max_batches)
    config = settings.resolve_fill_cache(
        batch_size=batch_size,
        concurrency=concurrency,
        # Off means "not asked for here": the worker's SYNCPOINT_BUILTIN_API still counts.
        builtin_api=builtin_api or None,
        market_api_block=market_api_block,
        database_block=database_block,
        checkpoint_block=checkpoint_block,
        shards=shards,
    )
    if config.shards > 1 and max_batches is not None:
        raise ConfigError("max_batches goes with a run of one worker (shards 1)")
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
            resume_command=resume_command(ticker_source, tickers, first, last, config.batch_size),
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
            shards=config.spread(
                JOB,
                key,
                {
                    "start": first.isoformat(),
                    "end": last.isoformat(),
                    "batch_size": config.batch_size,
                    "concurrency": config.api.concurrency,
                    "builtin_api": config.api.builtin or None,
                    "market_api_block": market_api_block,
                    "database_block": database_block,
                    "checkpoint_block": checkpoint_block,
                },
            ),
        )
        return run.finish()


@contextmanager
def stage_work(stage: str, parameters: Mapping[str, Any]) -> Iterator[StageWork]:
    """The history stage of a fill-cache run as a shard rebuilds it from its parameters."""
    if stage != "history":
        raise ConfigError(f"{JOB} has no stage {stage!r} a shard can work on")
    first, last = settings.history_range(parameters.get("start"), parameters.get("end"))
    config = settings.resolve_fill_cache(**{k: parameters.get(k) for k in SHARD_SETTINGS})
    with config.api.session() as api:
        yield StageWork(
            config.data, config.checkpoints, PricesSource(api, first, last), config.batch_size
        )


def resume_command(
    source: str,
    tickers: list[str] | None,
    first: date,
    last: date,
    batch_size: int = settings.FILL_CACHE_BATCH_SIZE,
) -> str:
    """The command that continues this run (the same ticker set and range), with its
    batch size unless it is the default: the fetch cache keeps a record per batch, so a
    rerun in batches of another size fetches again what was fetched and not yet stored."""
    chosen = f" --tickers {','.join(sorted(set(tickers or [])))}" if source == "custom" else ""
    size = "" if batch_size == settings.FILL_CACHE_BATCH_SIZE else f" --batch-size {batch_size}"
    return (
        f"syncpoint run {JOB} --ticker-source {source}{chosen} "
        f"--start {first.isoformat()} --end {last.isoformat()}{size}"
    )


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
    run.register_universe(universe)
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
