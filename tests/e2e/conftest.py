"""One Prefect server, one deployment and one process worker per backend, shared by a module.

`server` is parametrized over the server's database: SQLite (Prefect's default) and
PostgreSQL (PREFECT_SERVER_DATABASE_CONNECTION_URL=postgresql+asyncpg://...). Tests that
only need one backend override the parameter with `indirect=True`; pytest groups the
tests by backend, so one server runs at a time.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest
import sqlalchemy as sa

from syncpoint.simulator import MarketSimulator, SimulatorConfig
from tests.e2e.harness import (
    DEPLOYMENT,
    POOL,
    Deployed,
    Server,
    Stack,
    api,
    debian_postgres_bindir,
    deploy,
    pgserver_has_pg_trgm,
    poll,
    prefect_server,
    start_worker,
    throwaway_postgres,
)

PG_SKIP_REASON = (
    "no PostgreSQL with pg_trgm for the Prefect server: Prefect's migrations run "
    "CREATE EXTENSION pg_trgm, the pgserver wheel's PostgreSQL 16 ships no contrib "
    "extensions, and Debian's `postgresql` package is not installed (.ci/run installs it)"
)


@pytest.fixture(scope="module")
def prefect_pg_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """An empty PostgreSQL database for a Prefect server, as a SQLAlchemy URL (no driver)."""
    if pgserver_has_pg_trgm():
        root = sa.engine.make_url(request.getfixturevalue("pg_root_url"))
        name = f"prefect_e2e_{os.getpid()}"
        engine = sa.create_engine(
            root.set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT"
        )
        with engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        yield root.set(database=name).render_as_string(hide_password=False)
        return
    bindir = debian_postgres_bindir()
    if bindir is None:
        pytest.skip(PG_SKIP_REASON)
    with throwaway_postgres(bindir, "prefect") as url:
        yield url


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    backend = request.param
    database_url = None
    if backend == "postgres":
        url = sa.engine.make_url(request.getfixturevalue("prefect_pg_url"))
        # asyncpg takes the socket directory as the `host` query parameter.
        database_url = url.set(drivername="postgresql+asyncpg").render_as_string(
            hide_password=False
        )
    with prefect_server(backend, tmp_path_factory.mktemp(f"e2e-{backend}"), database_url) as s:
        yield s


@pytest.fixture(scope="module")
def deployed(server: Server) -> Deployed:
    """`prefect work-pool create` and `prefect deploy --all`, from the repository root."""
    output = deploy(server)
    with api(server) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
    return Deployed(server, deployment, output)


@pytest.fixture(scope="module")
def stack(deployed: Deployed) -> Iterator[Stack]:
    """A simulator and `prefect worker start --pool syncpoint`, ready for runs.

    The nightly schedule is switched off first, so no 05:00 UTC run of the whole S&P 500
    can ever interleave with the tests' runs (its runs are asserted before, on `deployed`).
    """
    server = deployed.server
    with api(server) as client:
        for schedule in deployed.deployment.schedules:
            client.update_deployment_schedule(deployed.deployment.id, schedule.id, active=False)
    with MarketSimulator(SimulatorConfig()) as sim:
        worker, data_db, results = start_worker(server, sim)
        stack = Stack(server, UUID(str(deployed.deployment.id)), sim, worker, data_db, results)
        try:

            def online() -> bool:
                if not worker.alive():
                    raise AssertionError(f"the worker exited\n{worker.tail()}")
                with api(server) as client:
                    return bool(client.read_workers_for_work_pool(POOL))

            poll("the worker to register with the pool", online, 120, context=stack.logs)
            yield stack
        finally:
            worker.stop()


@pytest.fixture
def market(stack: Stack) -> Iterator[MarketSimulator]:
    """The stack's simulator, clean for one test: no faults, no latency, zeroed counters."""
    sim = stack.sim
    sim.clear_faults()
    sim.config.latency_ms = 0
    sim.reset_stats()
    yield sim
    sim.clear_faults()
    sim.config.latency_ms = 0


@pytest.fixture
def screenshots(request: pytest.FixtureRequest) -> Path:
    """Where a browser test keeps a PNG of each step it takes, for a person to look at.

    Under $SYNCPOINT_E2E_SCREENSHOTS if set (CI keeps that folder), else a folder of its
    own under the system's temporary directory (not pytest's, which keeps only its last
    three runs); never in the repository. The session's summary prints it.
    """
    base = Path(os.environ.get("SYNCPOINT_E2E_SCREENSHOTS") or _SESSION_SHOTS)
    folder = base / re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)
    folder.mkdir(parents=True, exist_ok=True)
    request.node.user_properties.append(("screenshots", str(folder)))
    return folder


_SESSION_SHOTS = (
    Path(tempfile.gettempdir())
    / "syncpoint-e2e-screenshots"
    / (f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    shown = [
        (report.nodeid, value)
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
        for key, value in getattr(report, "user_properties", [])
        if key == "screenshots"
    ]
    if shown:
        terminalreporter.section("screenshots of the browser tests")
        for nodeid, folder in shown:
            terminalreporter.write_line(f"{nodeid}: {folder}")
