"""Every setting of a run, resolved once into one typed object.

Precedence, the same for the CLI and for deployment runs: a flow parameter, then a named
block, then an environment variable, then the built-in default. The CLI passes its
options as flow parameters and calls the same `resolve_*` functions to check them before
Prefect starts, so a setting cannot behave differently by entry point.

The built-in API (the simulator on loopback) is used only when asked for
(`builtin_api=True`, `--builtin-api` or SYNCPOINT_BUILTIN_API=1): a worker without an API
configured fails at once instead of syncing made-up prices into production tables.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from pydantic import AliasChoices, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from syncpoint.core.db import Database
from syncpoint.core.errors import ConfigError
from syncpoint.core.ledger import STALE_AFTER_SECONDS

if TYPE_CHECKING:
    # Imported where they are used: the blocks import Prefect (a second of start-up), which
    # `syncpoint status` and the other checkpoint commands never need.
    from syncpoint.blocks.checkpoint import CheckpointStore
    from syncpoint.blocks.dip_api import DipApi
    from syncpoint.blocks.market_api import MarketApi
    from syncpoint.engine.shards import Shards

DEFAULT_DATABASE_FILE = "syncpoint.db"
DAILY_BATCH_SIZE = 50
FILL_CACHE_BATCH_SIZE = 5
CONCURRENCY = 16
PRICE_DAYS = 5
DIP_CHECKPOINT_RECORDS = 500
DIP_CHECKPOINT_SECONDS = 30.0
# DIP: "about 15 minutes" pass before a change is visible; windows overlap by that much.
DIP_VISIBILITY_DELAY_MINUTES = 15.0
RETRY_COOLDOWN_SECONDS = 30.0
# Sharded runs: one worker unless asked; a lease long enough that a live worker renews it
# many times over (every quarter of it) and short enough that a dead worker's items wait
# two minutes, not the night.
SHARDS = 1
LEASE_SECONDS = 120.0
SHARD_DEPLOYMENT = "syncpoint-shard/shard"  # flow name / deployment name in prefect.yaml


def _env(name: str) -> Any:
    return Field(default=None, validation_alias=AliasChoices(name))


class Environment(BaseSettings):
    """The environment variables syncpoint reads (README, Configuration), validated."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=True)

    database_url: SecretStr | None = _env("SYNCPOINT_DATABASE_URL")
    checkpoint_url: SecretStr | None = _env("SYNCPOINT_CHECKPOINT_URL")
    checkpoint_retention_days: int | None = Field(
        default=None, ge=1, validation_alias=AliasChoices("SYNCPOINT_CHECKPOINT_RETENTION_DAYS")
    )
    stale_after_seconds: float | None = Field(
        default=None, gt=0, validation_alias=AliasChoices("SYNCPOINT_STALE_AFTER_SECONDS")
    )
    builtin_api: bool | None = _env("SYNCPOINT_BUILTIN_API")
    market_api_url: str | None = _env("MARKET_API_URL")
    market_api_key: SecretStr | None = _env("MARKET_API_KEY")
    market_api_rate_limit: float | None = Field(
        default=None, gt=0, validation_alias=AliasChoices("MARKET_API_RATE_LIMIT")
    )
    market_api_global_rate_limit: str | None = _env("MARKET_API_GLOBAL_RATE_LIMIT")
    dip_api_url: str | None = _env("DIP_API_URL")
    dip_api_key: SecretStr | None = _env("DIP_API_KEY")
    dip_api_rate_limit: float | None = Field(
        default=None, gt=0, validation_alias=AliasChoices("DIP_API_RATE_LIMIT")
    )
    dip_api_global_rate_limit: str | None = _env("DIP_API_GLOBAL_RATE_LIMIT")
    batch_size: int | None = Field(
        default=None, ge=1, validation_alias=AliasChoices("SYNC_BATCH_SIZE")
    )
    concurrency: int | None = Field(
        default=None, ge=1, le=256, validation_alias=AliasChoices("SYNC_CONCURRENCY")
    )
    price_days: int | None = Field(
        default=None, ge=1, validation_alias=AliasChoices("SYNC_DAYS_STOCK_PRICES")
    )
    dip_checkpoint_records: int | None = Field(
        default=None, ge=1, validation_alias=AliasChoices("DIP_CHECKPOINT_RECORDS")
    )
    dip_checkpoint_seconds: float | None = Field(
        default=None, gt=0, validation_alias=AliasChoices("DIP_CHECKPOINT_SECONDS")
    )
    dip_visibility_delay_minutes: float | None = Field(
        default=None, ge=0, validation_alias=AliasChoices("DIP_VISIBILITY_DELAY_MINUTES")
    )
    retry_cooldown_seconds: float | None = Field(
        default=None, ge=0, validation_alias=AliasChoices("SYNCPOINT_RETRY_COOLDOWN_SECONDS")
    )
    lease_seconds: float | None = Field(
        default=None, ge=5, validation_alias=AliasChoices("SYNCPOINT_LEASE_SECONDS")
    )
    shard_deployment: str | None = _env("SYNCPOINT_SHARD_DEPLOYMENT")
    # The worker's setting only, never a flow parameter: it bounds what the tickers_file
    # parameter, which anyone starting a deployment run may set, can read.
    tickers_dir: Path | None = _env("SYNCPOINT_TICKERS_DIR")
    flow_retries: int = Field(default=2, ge=0, validation_alias="SYNCPOINT_FLOW_RETRIES")
    flow_retry_delay_seconds: int = Field(
        default=300, ge=0, validation_alias="SYNCPOINT_FLOW_RETRY_DELAY_SECONDS"
    )


def environment() -> Environment:
    """The environment, read now; a bad value is one ConfigError naming the variable."""
    try:
        # Empty values count as unset, as a shell user means by `export X=`.
        return Environment(_env_parse_none_str="")  # type: ignore[call-arg]
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "a variable"
        raise ConfigError(f"{name} {_reason(first)}, got {first.get('input')!r:.60}") from None


def _reason(error: Any) -> str:
    """Pydantic's verdict on one variable, in the words the rest of syncpoint uses."""
    bounds = error.get("ctx") or {}
    return {
        "greater_than_equal": f"must be at least {bounds.get('ge')}",
        "greater_than": f"must be more than {bounds.get('gt')}",
        "less_than_equal": f"must be at most {bounds.get('le')}",
        "int_parsing": "must be a whole number",
        "int_from_float": "must be a whole number",
        "float_parsing": "must be a number",
        "bool_parsing": "must be 1 or 0 (true or false)",
    }.get(error.get("type"), f"is not valid ({error.get('msg')})")


def flow_retries() -> tuple[int, int]:
    """Automatic retries of a deployment's flow run (each resumes): count, delay in seconds.

    Read when a flow module is imported, i.e. by the worker's process.
    """
    env = environment()
    return env.flow_retries, env.flow_retry_delay_seconds


# --- values given as parameters -----------------------------------------------------------


def positive(name: str, value: int | None) -> int | None:
    """`value` if it is a whole number >= 1 (None passes: not given)."""
    if value is not None and value < 1:
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


def history_range(start: str | date | None, end: str | date | None) -> tuple[date, date]:
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


def tickers_dir(env: Environment | None = None) -> Path | None:
    """The folder a flow run's `tickers_file` may read from (SYNCPOINT_TICKERS_DIR), or
    None: then only the files the `syncpoint` command was given."""
    folder = (env or environment()).tickers_dir
    if folder is not None and not folder.is_dir():
        raise ConfigError(f"SYNCPOINT_TICKERS_DIR: {folder} is not a directory")
    return folder


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


# --- databases ------------------------------------------------------------------------


def database(block_name: str | None = None, env: Environment | None = None) -> Database:
    """The data database: a SqlAlchemyConnector block, SYNCPOINT_DATABASE_URL, or SQLite."""
    env = env or environment()
    if block_name:
        from prefect_sqlalchemy import SqlAlchemyConnector

        return Database.from_connector(_load(SqlAlchemyConnector, block_name))
    if env.database_url is not None:
        return Database.from_url(env.database_url.get_secret_value())
    return Database.from_url(f"sqlite:///{Path.cwd() / DEFAULT_DATABASE_FILE}")


def checkpoint_store(
    block_name: str | None = None, env: Environment | None = None
) -> CheckpointStore:
    """Where checkpoints live and how long they are kept: a block, or the environment."""
    from syncpoint.blocks.checkpoint import CheckpointStore

    if block_name:
        return _load(CheckpointStore, block_name)
    env = env or environment()
    return CheckpointStore(
        database_url=env.checkpoint_url,
        retention_days=_first(env.checkpoint_retention_days, 30),
        stale_after_seconds=_first(env.stale_after_seconds, STALE_AFTER_SECONDS),
    )


def checkpoint_database(data: Database, env: Environment | None = None) -> Database:
    """The checkpoint database the environment names (else `data`), without a block: what
    checkpoint_store().target(data) gives, for commands that read checkpoints only."""
    env = env or environment()
    if env.checkpoint_url is not None:
        return Database.from_url(env.checkpoint_url.get_secret_value())
    return data


BlockT = TypeVar("BlockT")


def _load(kind: type[BlockT], name: str) -> BlockT:
    try:
        return cast(BlockT, kind.load(name))  # type: ignore[attr-defined]
    except ValueError as exc:
        title = getattr(kind, "get_block_type_name", lambda: kind.__name__)()
        raise ConfigError(f"cannot load the {title} block {name!r}: {exc}") from None


# --- APIs -----------------------------------------------------------------------------

ApiT = TypeVar("ApiT", "MarketApi", "DipApi")


@dataclass(frozen=True)
class ApiChoice(Generic[ApiT]):
    """The API a run reads: a configured one, or the built-in one (started on use)."""

    kind: type[ApiT]
    api: ApiT | None  # None: the built-in API, whose address is known once it runs
    concurrency: int

    @property
    def builtin(self) -> bool:
        return self.api is None

    @contextmanager
    def session(self) -> Iterator[ApiT]:
        """The API's settings for the run; the built-in API serves until the block ends."""
        if self.api is not None:
            yield self.api
            return
        from syncpoint.simulator import MarketSimulator

        with MarketSimulator() as sim:
            yield self.kind(base_url=sim.base_url, concurrency=self.concurrency)


def _api(
    kind: type[ApiT],
    *,
    prefix: str,
    block_name: str | None,
    concurrency: int | None,
    builtin: bool | None,
    env: Environment,
) -> ApiChoice[ApiT]:
    env_values = {
        "url": getattr(env, f"{prefix}_api_url"),
        "key": getattr(env, f"{prefix}_api_key"),
        "rate": getattr(env, f"{prefix}_api_rate_limit"),
        "global": getattr(env, f"{prefix}_api_global_rate_limit"),
    }
    variable = f"{prefix.upper()}_API_URL"
    if block_name:
        api = _load(kind, block_name)
        chosen = _first(concurrency, api.concurrency)
        return ApiChoice(kind, api.model_copy(update={"concurrency": chosen}), chosen)
    chosen = _first(concurrency, env.concurrency, CONCURRENCY)
    if _first(builtin, env.builtin_api, False):
        return ApiChoice(kind, None, chosen)
    if not env_values["url"]:
        title = kind.get_block_type_name()
        raise ConfigError(
            f"no API configured: set {variable} (and {prefix.upper()}_API_KEY), name a "
            f"'{title}' block, or ask for the built-in simulator with --builtin-api "
            "(SYNCPOINT_BUILTIN_API=1)"
        )
    api = kind(
        base_url=str(env_values["url"]).rstrip("/"),
        api_key=env_values["key"],
        requests_per_minute=env_values["rate"],
        global_rate_limit=env_values["global"] or None,
        concurrency=chosen,
    )
    return ApiChoice(kind, api, chosen)


# --- per job --------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSettings(Generic[ApiT]):
    """One run's settings, resolved once; flows read nothing else."""

    data: Database
    checkpoints: CheckpointStore
    api: ApiChoice[ApiT]
    batch_size: int = 1
    price_days: int = PRICE_DAYS
    checkpoint_every_records: int = DIP_CHECKPOINT_RECORDS
    checkpoint_every_seconds: float = DIP_CHECKPOINT_SECONDS
    # document-sync: how far each window reaches back before the last one's end.
    visibility_delay_minutes: float = DIP_VISIBILITY_DELAY_MINUTES
    # Seconds before a stage's transient failures get a second pass within the run.
    retry_cooldown: float = RETRY_COOLDOWN_SECONDS
    # Workers a mapped stage is spread over (child runs of the shard deployment).
    shards: int = SHARDS
    lease_seconds: float = LEASE_SECONDS
    shard_deployment: str = SHARD_DEPLOYMENT

    def spread(self, job: str, run_key: str, parameters: Mapping[str, Any]) -> Shards | None:
        """How the run's mapped stages are spread if it asked for more than one worker;
        None: this process does them. `parameters` rebuild a stage in a shard (engine.shards)."""
        if self.shards <= 1:
            return None
        from syncpoint.engine.shards import Shards

        return Shards(
            count=self.shards,
            job=job,
            run_key=run_key,
            parameters=parameters,
            deployment=self.shard_deployment,
            lease_seconds=self.lease_seconds,
        )


def _common(
    kind: type[ApiT],
    prefix: str,
    *,
    api_block: str | None,
    database_block: str | None,
    checkpoint_block: str | None,
    concurrency: int | None,
    builtin_api: bool | None,
    shards: int | None = None,
) -> tuple[Environment, RunSettings[ApiT]]:
    """What every job resolves the same way, and the environment it was read from."""
    env = environment()
    positive("concurrency", concurrency)
    positive("shards", shards)
    api = _api(
        kind,
        prefix=prefix,
        block_name=api_block,
        concurrency=concurrency,
        builtin=builtin_api,
        env=env,
    )
    base = RunSettings(
        database(database_block, env),
        checkpoint_store(checkpoint_block, env),
        api,
        retry_cooldown=_first(env.retry_cooldown_seconds, RETRY_COOLDOWN_SECONDS),
        shards=_first(shards, SHARDS),
        lease_seconds=_first(env.lease_seconds, LEASE_SECONDS),
        shard_deployment=_first(env.shard_deployment, SHARD_DEPLOYMENT),
    )
    if base.shards > 1:
        check_shardable(base.data, base.checkpoints.target(base.data))
    return env, base


def check_shardable(data: Database, checkpoints: Database) -> None:
    """A run spread over several workers needs databases they all reach and that take
    concurrent writers with row locks: PostgreSQL, for the data and the checkpoints."""
    for role, db in (("data", data), ("checkpoint", checkpoints)):
        if db.dialect != "postgresql":
            raise ConfigError(
                f"a run over several workers (shards > 1) needs its {role} database in "
                f"PostgreSQL, which every worker reaches; this one is {db.dialect} "
                f"({db.describe()}). Set SYNCPOINT_DATABASE_URL (or a database block) to a "
                "PostgreSQL database, or run with shards 1"
            )


def resolve_daily_sync(
    *,
    batch_size: int | None = None,
    concurrency: int | None = None,
    price_days: int | None = None,
    builtin_api: bool | None = None,
    market_api_block: str | None = None,
    database_block: str | None = None,
    checkpoint_block: str | None = None,
    shards: int | None = None,
) -> RunSettings[MarketApi]:
    from syncpoint.blocks.market_api import MarketApi

    positive("batch_size", batch_size)
    positive("price_days", price_days)
    env, base = _common(
        MarketApi,
        "market",
        api_block=market_api_block,
        database_block=database_block,
        checkpoint_block=checkpoint_block,
        concurrency=concurrency,
        builtin_api=builtin_api,
        shards=shards,
    )
    return replace(
        base,
        batch_size=_first(batch_size, env.batch_size, DAILY_BATCH_SIZE),
        price_days=_first(price_days, env.price_days, PRICE_DAYS),
    )


def resolve_fill_cache(
    *,
    batch_size: int | None = None,
    concurrency: int | None = None,
    builtin_api: bool | None = None,
    market_api_block: str | None = None,
    database_block: str | None = None,
    checkpoint_block: str | None = None,
    shards: int | None = None,
) -> RunSettings[MarketApi]:
    from syncpoint.blocks.market_api import MarketApi

    positive("batch_size", batch_size)
    _env, base = _common(
        MarketApi,
        "market",
        api_block=market_api_block,
        database_block=database_block,
        checkpoint_block=checkpoint_block,
        concurrency=concurrency,
        builtin_api=builtin_api,
        shards=shards,
    )
    # Five tickers a batch is the backfill's progress and checkpoint grain; SYNC_BATCH_SIZE
    # is the nightly sync's and does not apply here.
    return replace(base, batch_size=_first(batch_size, FILL_CACHE_BATCH_SIZE))


def resolve_document_sync(
    *,
    checkpoint_every_records: int | None = None,
    checkpoint_every_seconds: float | None = None,
    visibility_delay_minutes: float | None = None,
    builtin_api: bool | None = None,
    dip_api_block: str | None = None,
    database_block: str | None = None,
    checkpoint_block: str | None = None,
) -> RunSettings[DipApi]:
    from syncpoint.blocks.dip_api import DipApi

    positive("checkpoint_every_records", checkpoint_every_records)
    if checkpoint_every_seconds is not None and checkpoint_every_seconds <= 0:
        raise ConfigError(
            f"checkpoint_every_seconds must be positive, got {checkpoint_every_seconds}"
        )
    if visibility_delay_minutes is not None and not visibility_delay_minutes >= 0:
        raise ConfigError(
            f"visibility_delay_minutes must be 0 or more, got {visibility_delay_minutes}"
        )
    env, base = _common(
        DipApi,
        "dip",
        api_block=dip_api_block,
        database_block=database_block,
        checkpoint_block=checkpoint_block,
        concurrency=None,
        builtin_api=builtin_api,
    )
    return replace(
        base,
        checkpoint_every_records=_first(
            checkpoint_every_records,
            env.dip_checkpoint_records,
            DIP_CHECKPOINT_RECORDS,
        ),
        checkpoint_every_seconds=_first(
            checkpoint_every_seconds, env.dip_checkpoint_seconds, DIP_CHECKPOINT_SECONDS
        ),
        visibility_delay_minutes=_first(
            visibility_delay_minutes,
            env.dip_visibility_delay_minutes,
            DIP_VISIBILITY_DELAY_MINUTES,
        ),
    )
