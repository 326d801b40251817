"""Settings from parameters, blocks and environment variables, validated in one place.

Precedence: an explicit parameter, then a named block, then an environment variable,
then the embedded default (SQLite in the working directory, the built-in API).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TypeVar, cast

from pydantic import SecretStr

from syncpoint.blocks.checkpoint import CheckpointStore
from syncpoint.blocks.dip_api import DipApi
from syncpoint.blocks.market_api import MarketApi
from syncpoint.core.db import Database
from syncpoint.core.errors import ConfigError
from syncpoint.core.ledger import STALE_AFTER_SECONDS

DEFAULT_DATABASE_FILE = "syncpoint.core.db"


def env_int(name: str, default: int, *, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def flow_retries() -> tuple[int, int]:
    """Prefect retries of a whole flow run (seed 000's platform retries): count, delay.

    Read when a flow module is imported, i.e. by the worker's process for deployments.
    """
    return (
        env_int("SYNCPOINT_FLOW_RETRIES", 2, minimum=0),
        env_int("SYNCPOINT_FLOW_RETRY_DELAY_SECONDS", 300, minimum=0),
    )


def env_float(name: str) -> float | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {raw}")
    return value


def positive(name: str, value: int | None, *, allow_none: bool = False) -> int | None:
    if value is None:
        if allow_none:
            return None
        raise ConfigError(f"{name} is required")
    if value < 1:
        raise ConfigError(f"{name} must be at least 1, got {value}")
    return value


def run_date(value: str | date | None) -> date:
    """The run key date: given, or today in UTC."""
    if value is None or value == "":
        return datetime.now(UTC).date()
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"bad date {value!r}: use YYYY-MM-DD") from None


def history_range(start: str | None, end: str | None) -> tuple[date, date]:
    """[start, end] for a backfill: default five years back to yesterday (UTC)."""
    last = run_date(end) if end else datetime.now(UTC).date() - timedelta(days=1)
    if start:
        first = run_date(start)
    else:
        try:
            first = last.replace(year=last.year - 5)
        except ValueError:  # 29 February
            first = last.replace(year=last.year - 5, day=28)
    if first > last:
        raise ConfigError(f"start {first} is after end {last}")
    return first, last


def database(block_name: str | None = None) -> Database:
    """The data database: a SqlAlchemyConnector block, SYNCPOINT_DATABASE_URL, or SQLite."""
    if block_name:
        from prefect_sqlalchemy import SqlAlchemyConnector

        connector = SqlAlchemyConnector.load(block_name)
        return Database.from_url(connector._rendered_url.render_as_string(hide_password=False))
    url = os.environ.get("SYNCPOINT_DATABASE_URL")
    if url:
        return Database.from_url(url)
    return Database.from_url(f"sqlite:///{Path.cwd() / DEFAULT_DATABASE_FILE}")


def checkpoint_store(block_name: str | None = None) -> CheckpointStore:
    if block_name:
        return cast(CheckpointStore, CheckpointStore.load(block_name))
    url = os.environ.get("SYNCPOINT_CHECKPOINT_URL")
    return CheckpointStore(
        database_url=SecretStr(url) if url else None,
        retention_days=env_int("SYNCPOINT_CHECKPOINT_RETENTION_DAYS", 30),
        stale_after_seconds=env_float("SYNCPOINT_STALE_AFTER_SECONDS") or STALE_AFTER_SECONDS,
    )


ApiBlock = TypeVar("ApiBlock", bound=MarketApi)


def http_api(
    kind: type[ApiBlock], env_prefix: str, block_name: str | None, concurrency: int | None
) -> ApiBlock | None:
    """An HTTP API's settings from a block or <env_prefix>_URL/_KEY/_RATE_LIMIT/...;
    None when the URL is unset and the built-in API should be used."""
    if block_name:
        api = cast(ApiBlock, kind.load(block_name))
    else:
        url = os.environ.get(f"{env_prefix}_URL")
        if not url:
            return None
        key = os.environ.get(f"{env_prefix}_KEY")
        api = kind(
            base_url=url.rstrip("/"),
            api_key=SecretStr(key) if key else None,
            requests_per_minute=env_float(f"{env_prefix}_RATE_LIMIT"),
            global_rate_limit=os.environ.get(f"{env_prefix}_GLOBAL_RATE_LIMIT") or None,
            concurrency=env_int("SYNC_CONCURRENCY", 16),
        )
    if concurrency is not None:
        api = api.model_copy(update={"concurrency": positive("concurrency", concurrency)})
    return api


def market_api(block_name: str | None = None, concurrency: int | None = None) -> MarketApi | None:
    """The configured market API (MARKET_API_*), or None for the built-in one."""
    return http_api(MarketApi, "MARKET_API", block_name, concurrency)


def dip_api(block_name: str | None = None) -> DipApi | None:
    """The configured documents API (DIP_API_*), or None for the built-in one."""
    return http_api(DipApi, "DIP_API", block_name, None)


@contextmanager
def api_session(
    kind: type[ApiBlock], configured: ApiBlock | None, concurrency: int | None = None
) -> Iterator[tuple[ApiBlock, bool]]:
    """The API for a run, starting the built-in one on loopback if none is configured.

    Yields (api, built_in). The built-in simulator serves the market and DIP endpoints.
    """
    if configured is not None:
        yield configured, False
        return
    from syncpoint.simulator import MarketSimulator

    with MarketSimulator() as sim:
        yield kind(base_url=sim.base_url, concurrency=concurrency or 16), True


def market_api_session(
    block_name: str | None = None, concurrency: int | None = None
) -> AbstractContextManager[tuple[MarketApi, bool]]:
    return api_session(MarketApi, market_api(block_name, concurrency), concurrency)


def dip_api_session(block_name: str | None = None) -> AbstractContextManager[tuple[DipApi, bool]]:
    return api_session(DipApi, dip_api(block_name))
