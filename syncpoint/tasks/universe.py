"""Resolving a run's universe: the tickers it covers, from a file, a list or the API."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from syncpoint.blocks.market_api import MarketApi
from syncpoint.core.errors import ConfigError
from syncpoint.sources.market import LISTS, fetch_symbols
from syncpoint.sources.universe import SOURCES, Universe, tickers_from_file, validate


@task(name="resolve-universe", cache_policy=NO_CACHE)
async def resolve_universe(
    ticker_source: str,
    tickers_file: str | None,
    api: MarketApi,
    tickers: list[str] | None = None,
) -> Universe:
    """The run's tickers: a file, an explicit list (custom), or a list the API publishes."""
    if tickers_file:
        return tickers_from_file(tickers_file)
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
