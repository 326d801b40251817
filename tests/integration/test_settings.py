"""Settings resolved once, in one precedence, the same for the CLI and deployment runs.

flow parameter > block > environment variable > default; no API configured is an error
that does not burn automatic retries; database blocks are honoured with their connect
arguments.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from syncpoint import settings
from syncpoint.blocks.market_api import MarketApi
from syncpoint.core.errors import ConfigError
from syncpoint.simulator import MarketSimulator
from tests.conftest import _fresh_pg_database, tickers_file


def test_defaults_then_environment_then_parameter(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MARKET_API_URL", "http://127.0.0.1:9/")
    base = settings.resolve_daily_sync()
    assert (base.batch_size, base.api.concurrency, base.price_days) == (50, 16, 5)
    assert base.api.api is not None
    assert base.api.api.base_url == "http://127.0.0.1:9"

    monkeypatch.setenv("SYNC_BATCH_SIZE", "7")
    monkeypatch.setenv("SYNC_CONCURRENCY", "3")
    monkeypatch.setenv("SYNC_DAYS_STOCK_PRICES", "9")
    env = settings.resolve_daily_sync()
    assert (env.batch_size, env.api.concurrency, env.price_days) == (7, 3, 9)
    assert env.api.api is not None
    assert env.api.api.concurrency == 3

    given = settings.resolve_daily_sync(batch_size=11, concurrency=5, price_days=2)
    assert (given.batch_size, given.api.concurrency, given.price_days) == (11, 5, 2)


def test_concurrency_applies_to_the_builtin_api_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SYNC_CONCURRENCY", "4")
    config = settings.resolve_daily_sync(builtin_api=True)
    assert config.api.builtin
    with config.api.session() as api:
        assert api.concurrency == 4


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("SYNC_BATCH_SIZE", "0", "SYNC_BATCH_SIZE"),
        ("SYNC_CONCURRENCY", "many", "SYNC_CONCURRENCY"),
        ("MARKET_API_RATE_LIMIT", "-1", "MARKET_API_RATE_LIMIT"),
        ("SYNCPOINT_STALE_AFTER_SECONDS", "0", "SYNCPOINT_STALE_AFTER_SECONDS"),
    ],
    ids=["batch-zero", "concurrency-text", "rate-negative", "stale-zero"],
)
def test_a_bad_variable_is_one_error_naming_it(
    variable: str, value: str, fragment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MARKET_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=fragment):
        settings.resolve_daily_sync()


def test_no_api_is_an_error_unless_the_builtin_one_is_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigError, match="MARKET_API_URL"):
        settings.resolve_fill_cache()
    with pytest.raises(ConfigError, match="DIP_API_URL"):
        settings.resolve_document_sync()
    monkeypatch.setenv("SYNCPOINT_BUILTIN_API", "1")
    assert settings.resolve_fill_cache().api.builtin
    # A parameter beats the variable: False means "not the built-in one".
    with pytest.raises(ConfigError, match="MARKET_API_URL"):
        settings.resolve_fill_cache(builtin_api=False)


def test_a_block_beats_the_environment_and_a_parameter_beats_the_block(
    prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    MarketApi(
        base_url="http://127.0.0.1:8/",
        api_key=SecretStr("block-key"),
        concurrency=6,
    ).save("settings-precedence", overwrite=True)
    monkeypatch.setenv("MARKET_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("SYNC_CONCURRENCY", "3")

    from_block = settings.resolve_daily_sync(market_api_block="settings-precedence")
    assert from_block.api.api is not None
    assert from_block.api.api.base_url == "http://127.0.0.1:8/"
    assert from_block.api.concurrency == 6

    given = settings.resolve_daily_sync(market_api_block="settings-precedence", concurrency=2)
    assert given.api.api is not None
    assert given.api.api.concurrency == 2

    with pytest.raises(ConfigError, match="no-such-block"):
        settings.resolve_daily_sync(market_api_block="no-such-block")


def test_a_deployment_style_run_reads_sync_batch_size(
    sync_env: MarketSimulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No batch_size parameter, as a deployment run has none: the variable decides."""
    from syncpoint.flows.daily_sync import daily_sync

    url = f"sqlite:///{tmp_path / 'sync.db'}"
    monkeypatch.setenv("SYNCPOINT_DATABASE_URL", url)
    monkeypatch.setenv("SYNC_BATCH_SIZE", "3")
    tickers = list(sync_env.data.symbols[:7])
    summary = daily_sync(run_date="2026-11-20", tickers_file=str(tickers_file(tmp_path, tickers)))
    assert summary["status"] == "completed"
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        batches = conn.execute(
            sa.text("SELECT MAX(batch_no) FROM sync_items WHERE stage = 'prices'")
        ).scalar()
    engine.dispose()
    assert batches == 3  # 7 tickers in batches of 3


def test_a_configuration_error_fails_the_run_without_its_automatic_retries(
    prefect_api: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client

    from syncpoint.flows.daily_sync import daily_sync

    monkeypatch.chdir(tmp_path)
    flow = daily_sync.with_options(retries=2, retry_delay_seconds=0)
    state = flow(run_date="2026-11-20", return_state=True)
    assert state.is_failed()
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.run_count == 1  # failed once, not three times
    assert "MARKET_API_URL" in (state.message or "") + str(state.result(raise_on_failure=False))


@pytest.mark.postgres
def test_a_connector_block_is_used_with_its_connect_args(pg_root_url: str) -> None:
    from prefect_sqlalchemy import ConnectionComponents, SqlAlchemyConnector

    from syncpoint.core.db import Database, dispose_engines

    parsed = sa.engine.make_url(_fresh_pg_database(pg_root_url))
    connector = SqlAlchemyConnector(
        # psycopg2 is what the block's form suggests; syncpoint reaches it with psycopg 3.
        connection_info=ConnectionComponents(
            driver="postgresql+psycopg2",
            database=parsed.database,
            username=parsed.username,
            password=parsed.password,
            host=parsed.host,
            port=parsed.port,
            query=dict(parsed.query) or None,
        ),
        connect_args={"application_name": "syncpoint-settings-test"},
    )
    database = Database.from_connector(connector)
    assert "syncpoint-settings-test" not in database.describe()
    try:
        with database.engine().connect() as conn:
            name = conn.execute(sa.text("SHOW application_name")).scalar()
    finally:
        dispose_engines()
    assert name == "syncpoint-settings-test"
