"""Shared fixtures: a throwaway Prefect server, the simulator, SQLite and PostgreSQL.

Everything is real: flows run against a real Prefect API, HTTP goes to the simulator on
loopback, data lands in real SQLite files and a real PostgreSQL 16 (pgserver wheel).
"""

from __future__ import annotations

import os
import tempfile

# Before anything imports prefect: its settings are read from the environment once.
_PREFECT_HOME = tempfile.mkdtemp(prefix="syncpoint-tests-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
# In-process flow calls answer at once; deployment tests set their own retries.
os.environ["SYNCPOINT_FLOW_RETRIES"] = "0"
# In-process flow runs read tickers files the tests write under the temp folder.
os.environ["SYNCPOINT_TICKERS_DIR"] = tempfile.gettempdir()
# The second pass over transient failures waits this long; real runs wait 30 s.
os.environ["SYNCPOINT_RETRY_COOLDOWN_SECONDS"] = "0.2"
for _name in (
    "PREFECT_API_URL",
    "MARKET_API_URL",
    "MARKET_API_KEY",
    "MARKET_API_RATE_LIMIT",
    "SYNCPOINT_DATABASE_URL",
    "SYNCPOINT_CHECKPOINT_URL",
    "SYNC_BATCH_SIZE",
    "SYNC_CONCURRENCY",
    "SYNC_DAYS_STOCK_PRICES",
    "SYNCPOINT_BUILTIN_API",
    "DIP_API_URL",
    "DIP_API_KEY",
):
    os.environ.pop(_name, None)

import itertools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from syncpoint.core.db import dispose_engines
from syncpoint.simulator import MarketSimulator, SimulatorConfig

ROOT = Path(__file__).resolve().parent.parent
_db_counter = itertools.count()


@pytest.fixture(autouse=True)
def no_stop_left_over() -> Iterator[None]:
    """A stop requested by one test (a signal, a refused claim) must not end the next
    test's waits: the stop event is process-wide, as it is in a real run."""
    from syncpoint.core.interrupts import clear_stop_request

    clear_stop_request()
    yield
    clear_stop_request()


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A Prefect API server for the whole session; its URL for subprocesses."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


@pytest.fixture(scope="session")
def pg_root_url() -> Iterator[str]:
    pgserver = pytest.importorskip("pgserver")
    # Not under pytest's tmp root: that is mode 0700, and as root pgserver runs postgres
    # as its own unprivileged user, which must be able to reach the data directory.
    datadir = tempfile.mkdtemp(prefix="syncpoint-pgdata-")
    server = pgserver.get_server(datadir, cleanup_mode="delete")
    yield server.get_uri()
    server.cleanup()


def _fresh_pg_database(root_url: str) -> str:
    name = f"syncpoint_test_{os.getpid()}_{next(_db_counter)}"
    url = sa.engine.make_url(root_url).set(drivername="postgresql+psycopg")
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new, empty database of each kind."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'sync.db'}"
    else:
        url = _fresh_pg_database(request.getfixturevalue("pg_root_url"))
    yield url
    dispose_engines()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    yield f"sqlite:///{tmp_path / 'sync.db'}"
    dispose_engines()


@pytest.fixture
def market() -> Iterator[MarketSimulator]:
    with MarketSimulator(SimulatorConfig()) as sim:
        yield sim


@pytest.fixture
def sync_env(
    monkeypatch: pytest.MonkeyPatch, market: MarketSimulator, prefect_api: str
) -> MarketSimulator:
    """In-process runs: the flow reads MARKET_API_URL like a deployment would."""
    monkeypatch.setenv("MARKET_API_URL", market.base_url)
    return market


def tickers_file(directory: Path, tickers: list[str]) -> Path:
    path = directory / "tickers.txt"
    path.write_text("\n".join(tickers) + "\n")
    return path


def cli_env(prefect_api: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MARKET_", "DIP_", "SYNC"))}
    env.update({"PREFECT_API_URL": prefect_api, "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def run_cli(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncpoint.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def table_rows(url: str, table: str, columns: str = "*") -> list[tuple[Any, ...]]:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT {columns} FROM {table} ORDER BY 1, 2")).all()
    engine.dispose()
    return [tuple(r) for r in rows]
