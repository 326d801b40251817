"""Resolving a run's universe: the tickers it covers, from a file, a list or the API."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from syncpoint.blocks.market_api import MarketApi
from syncpoint.core.errors import ConfigError
from syncpoint.sources.market import LISTS, fetch_symbols
from syncpoint.sources.universe import (
    SOURCES,
    Universe,
    readable_tickers_file,
    tickers_from_file,
    validate,
)


@task(name="resolve-universe", cache_policy=NO_CACHE)
async def resolve_universe(
    ticker_source: str,
    tickers_file: str | None,
    api: MarketApi,
    tickers: list[str] | None = None,
    tickers_dir: Path | None = None,
) -> Universe:
    """The run's tickers: a file, an explicit list (custom), or a list the API publishes.

    `tickers_file` is a flow parameter: it is read only if the CLI was given it or it is
    inside `tickers_dir` (SYNCPOINT_TICKERS_DIR); see readable_tickers_file.
    """
    if tickers_file:
        return tickers_from_file(readable_tickers_file(tickers_file, tickers_dir))
    if ticker_source == "custom":
        if not tickers:
            raise ConfigError("ticker source 'custom' needs tickers (--tickers A,B,...)")
        return validate(tickers)
    if ticker_source not in LISTS:
        raise ConfigError(
            f"unknown ticker source {ticker_source!r}: use {', '.join(SOURCES)} or a tickers file"
        )
    symbols, requests = await fetch_symbols(api, ticker_source)
    universe = validate(symbols)
    universe.requests = requests
    return universe
