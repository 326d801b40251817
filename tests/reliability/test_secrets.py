"""The API key (and a database password) never leave the process in clear text.

Real `syncpoint` runs against a simulator that demands the key, with faults that make
the product log retries and record errors (their URLs carry `apikey=`), then a run with
a wrong key. The secret is then searched for everywhere a user or an operator could see
it: stdout, stderr, every row of every table, the status and checkpoint commands, the
flow runs, task runs, logs and artifacts on the Prefect server, and the raw bytes of
the Prefect server's database and of PREFECT_HOME (persisted results).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from syncpoint.simulator import MarketSimulator, SimulatorConfig
from tests.conftest import cli_env, run_cli, tickers_file

SECRET = "mkt-SECRET-k3y-9f41c07be2d8"
WRONG = "mkt-WRONG-k3y-5a77e31d90c4"
DB_PASSWORD = "pg-PASSW0RD-6c2e8a14f3b9"
DAY = "2026-11-20"
DAY_401 = "2026-11-19"

# Log everything an operator might switch on: Prefect at DEBUG, the root at INFO (httpx
# logs every request URL, syncpoint.core.http every retry), and those libraries' loggers
# shipped to the Prefect API as well.
VERBOSE = {
    "PREFECT_LOGGING_LEVEL": "DEBUG",
    "PREFECT_LOGGING_ROOT_LEVEL": "INFO",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "httpx,syncpoint",
}


@dataclass
class Evidence:
    """Everything the runs printed or left behind, as text, by where it came from."""

    texts: dict[str, str] = field(default_factory=dict)

    def add(self, where: str, result: subprocess.CompletedProcess[str]) -> None:
        self.texts[f"{where} stdout"] = result.stdout
        self.texts[f"{where} stderr"] = result.stderr

    def leaks(self, secret: str) -> list[str]:
        return [where for where, text in self.texts.items() if secret in text]


def sqlite_rows_text(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return "\n".join(
            f"{name}: {row!r}" for name in names for row in conn.execute(f'SELECT * FROM "{name}"')
        )
    finally:
        conn.close()


def url_rows_text(url: str) -> str:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return "\n".join(
                f"{name}: {tuple(row)!r}"
                for name in sa.inspect(conn).get_table_names()
                for row in conn.execute(sa.text(f'SELECT * FROM "{name}"'))
            )
    finally:
        engine.dispose()


def _contents(path: Path) -> bytes:
    """A file's bytes; for a Prefect result record, also its decoded (pickled) result,
    whose strings are plain UTF-8 once the base64 layer is gone.
    """
    data = path.read_bytes()
    if data.startswith(b"{"):
        try:
            record = json.loads(data)
            if isinstance(record, dict) and isinstance(record.get("result"), str):
                data += b"\n" + base64.b64decode(record["result"])
        except ValueError:
            pass
    return data


def files_containing(root: Path, needle: str) -> list[str]:
    """Files under `root` whose bytes (or decoded result records) hold `needle`."""
    raw = needle.encode()
    hits = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and raw in _contents(path):
                hits.append(str(path))
        except OSError:
            continue
    return hits


async def _prefect_records(since: datetime) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterStartTime,
        LogFilter,
        LogFilterFlowRunId,
    )

    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since))
        )
        ids = [r.id for r in runs]
        out = {f"flow run {r.name}": r.model_dump_json() for r in runs}
        if not ids:
            return out
        logs = []
        while True:
            page = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)),
                limit=200,
                offset=len(logs),
            )
            logs += page
            if len(page) < 200:
                break
        out["logs"] = "\n".join(f"{log.name} {log.level} {log.message}" for log in logs)
        task_runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))
        )
        out["task runs"] = "\n".join(t.model_dump_json() for t in task_runs)
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids))
        )
        out["artifacts"] = "\n".join(a.model_dump_json() for a in artifacts)
        out["flow run count"] = str(len(ids))
    return out


def prefect_records(since: datetime, expect: list[str]) -> dict[str, str]:
    """The Prefect server's view of the runs started after `since`, once its logs hold
    every `expect` marker (the CLI ships logs in the background as it exits).
    """
    deadline = time.monotonic() + 60
    while True:
        records = asyncio.run(_prefect_records(since))
        logs = records.get("logs", "")
        if all(marker in logs for marker in expect) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def prefect_server_db() -> Path:
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    url = sa.engine.make_url(PREFECT_SERVER_DATABASE_CONNECTION_URL.value())
    assert url.get_backend_name() == "sqlite", url
    return Path(str(url.database)).parent


def assert_nowhere(secret: str, evidence: Evidence, *roots: Path) -> None:
    leaks = evidence.leaks(secret)
    for root in roots:
        leaks += files_containing(root, secret)
    assert leaks == [], f"{secret!r} found in: {leaks}"


# --- the market API key ----------------------------------------------------------------


@dataclass
class KeyedRuns:
    workdir: Path
    evidence: Evidence
    since: datetime
    stats: dict[str, Any]


@pytest.fixture(scope="module")
def keyed_runs(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> KeyedRuns:
    workdir = tmp_path_factory.mktemp("secrets")
    evidence = Evidence()
    since = datetime.now(UTC)
    with MarketSimulator(SimulatorConfig(api_key=SECRET)) as sim:
        universe = list(sim.data.symbols[700:712])
        sim.set_fault(universe[0], "server_error")  # retried, then transient
        sim.set_fault(universe[1], "reset")  # transport errors carry the URL
        sim.set_fault(universe[2], "not_found")  # the 404 body is quoted in the error
        sim.set_fault(universe[3], "garbage")
        sim.set_fault(universe[4], "flaky", failures=2)
        sim.set_fault(universe[5], "rate_limited", retry_after=0.1)
        file = tickers_file(workdir, universe)
        env = cli_env(prefect_api, MARKET_API_URL=sim.base_url, MARKET_API_KEY=SECRET, **VERBOSE)
        common = ["--tickers-file", str(file), "--batch-size", "4"]

        run = run_cli(["run", "daily-sync", "--date", DAY, *common], env, workdir)
        assert run.returncode == 3, run.stdout + run.stderr  # transient failures left
        evidence.add("run", run)
        for symbol in universe[:6]:
            if symbol not in universe[2:4]:  # the permanent ones stay failed regardless
                sim.clear_fault(symbol)
        as_json = run_cli(["run", "daily-sync", "--date", DAY, "--json", *common], env, workdir)
        assert as_json.returncode == 0, as_json.stdout + as_json.stderr
        evidence.add("rerun --json", as_json)

        wrong_env = {**env, "MARKET_API_KEY": WRONG}
        refused = run_cli(["run", "daily-sync", "--date", DAY_401, *common], wrong_env, workdir)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "rejected the key" in refused.stderr
        evidence.add("wrong-key run", refused)
        stats = sim.stats()

    for where, args in {
        "status --json": ["status", "--json", "--failures", "100"],
        "status": ["status", "daily-sync", "--failures", "100"],
        "checkpoints show": ["checkpoints", "show", "daily-sync", "--date", DAY],
        "checkpoints show 401": ["checkpoints", "show", "daily-sync", "--date", DAY_401],
        "checkpoints list": ["checkpoints", "list"],
    }.items():
        result = run_cli(args, env, workdir)
        assert result.returncode == 0, result.stderr
        evidence.add(where, result)
    evidence.texts["database rows"] = sqlite_rows_text(workdir / "syncpoint.db")
    return KeyedRuns(workdir, evidence, since, stats)


def test_the_faults_really_exercised_errors_and_retries(keyed_runs: KeyedRuns) -> None:
    """The haystack is real: the errors that would carry a URL were produced and recorded."""
    responses = keyed_runs.stats["responses"]
    assert responses.get("500", 0) >= 2
    assert responses.get("404", 0) >= 1
    assert responses.get("429", 0) >= 2
    assert responses.get("401", 0) >= 1
    assert keyed_runs.stats["resets"] >= 2
    first_run = keyed_runs.evidence.texts["run stdout"]
    assert "answered 500" in first_run
    assert "apikey=***" in first_run  # the errors quote the request URL, key masked
    assert "retrying in" in keyed_runs.evidence.texts["run stderr"]
    assert "HTTP Request" in keyed_runs.evidence.texts["run stderr"]
    rows = keyed_runs.evidence.texts["database rows"]
    assert "apikey=***" in rows
    assert "answered 404" in rows
    assert "rejected the key" in rows
    assert "permanent" in keyed_runs.evidence.texts["checkpoints show stdout"]
    assert "transient" in keyed_runs.evidence.texts["checkpoints show 401 stdout"]


@pytest.mark.parametrize("secret", [SECRET, WRONG], ids=["right-key", "wrong-key"])
def test_key_is_not_in_output_status_checkpoints_or_tables(
    keyed_runs: KeyedRuns, secret: str
) -> None:
    assert_nowhere(secret, keyed_runs.evidence, keyed_runs.workdir)


@pytest.mark.parametrize("secret", [SECRET, WRONG], ids=["right-key", "wrong-key"])
def test_key_is_not_on_the_prefect_server(keyed_runs: KeyedRuns, secret: str) -> None:
    records = prefect_records(
        keyed_runs.since, expect=["rejected the key", "retrying in", "HTTP Request"]
    )
    assert int(records["flow run count"]) >= 3
    logs = records["logs"]
    # The verbose loggers did reach the server: retries and request lines were logged.
    assert "rejected the key" in logs
    assert "retrying in" in logs
    assert "HTTP Request" in logs
    evidence = Evidence({f"prefect {k}": v for k, v in records.items()})
    # The server's own database (logs, events, states) and PREFECT_HOME (persisted task
    # results, local settings), byte for byte. Both hold what the runs produced:
    server_db, home = prefect_server_db(), Path(os.environ["PREFECT_HOME"])
    assert files_containing(server_db, "rejected the key")
    assert files_containing(home, "answered 404")  # a fetched batch's record
    assert_nowhere(secret, evidence, server_db, home)


# --- the database password ----------------------------------------------------------


@pytest.fixture
def pg_url_with_password(pg_root_url: str) -> Iterator[str]:
    """A PostgreSQL database owned by a role with a password, as a URL that carries it."""
    root = sa.engine.make_url(pg_root_url).set(drivername="postgresql+psycopg")
    name = f"syncpoint_pw_{os.getpid()}"
    engine = sa.create_engine(root, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
        conn.execute(sa.text(f"DROP ROLE IF EXISTS {name}"))
        conn.execute(sa.text(f"CREATE ROLE {name} LOGIN PASSWORD '{DB_PASSWORD}'"))
        conn.execute(sa.text(f"CREATE DATABASE {name} OWNER {name}"))
    engine.dispose()
    url = root.set(username=name, password=DB_PASSWORD, database=name)
    yield url.render_as_string(hide_password=False)
    from syncpoint.core.db import dispose_engines

    dispose_engines()


def test_database_password_is_never_shown(
    prefect_api: str, pg_url_with_password: str, tmp_path: Path
) -> None:
    assert DB_PASSWORD in pg_url_with_password
    since = datetime.now(UTC)
    evidence = Evidence()
    with MarketSimulator(SimulatorConfig()) as sim:
        universe = list(sim.data.symbols[740:746])
        sim.set_fault(universe[0], "not_found")
        sim.set_fault(universe[1], "rate_limited", retry_after=0.1)
        env = cli_env(
            prefect_api,
            MARKET_API_URL=sim.base_url,
            SYNCPOINT_DATABASE_URL=pg_url_with_password,
            **VERBOSE,
        )
        args = ["run", "daily-sync", "--date", DAY, "--tickers-file"]
        run = run_cli([*args, str(tickers_file(tmp_path, universe))], env, tmp_path)
        assert run.returncode == 3, run.stdout + run.stderr
        evidence.add("run", run)

    for where, cli_args in {
        "status --json": ["status", "--json"],
        "checkpoints show": ["checkpoints", "show", "daily-sync", "--date", DAY],
    }.items():
        result = run_cli(cli_args, env, tmp_path)
        assert result.returncode == 0, result.stderr
        evidence.add(where, result)

    # A database that cannot be opened: the error names the URL, without the password.
    missing = sa.engine.make_url(pg_url_with_password).set(database="no_such_db")
    bad_env = {**env, "SYNCPOINT_DATABASE_URL": missing.render_as_string(hide_password=False)}
    refused = run_cli(["status"], bad_env, tmp_path)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "no_such_db" in refused.stderr
    assert "Traceback" not in refused.stderr
    evidence.add("bad database", refused)
    bad_run = run_cli([*args, str(tmp_path / "tickers.txt")], bad_env, tmp_path)
    assert bad_run.returncode == 2, bad_run.stdout + bad_run.stderr
    assert "cannot open database" in bad_run.stderr
    evidence.add("bad database run", bad_run)

    evidence.texts["database rows"] = url_rows_text(pg_url_with_password)
    assert "answered 404" in evidence.texts["database rows"]
    records = prefect_records(since, expect=["HTTP Request"])
    evidence.texts.update({f"prefect {k}": v for k, v in records.items()})
    assert_nowhere(
        DB_PASSWORD, evidence, tmp_path, prefect_server_db(), Path(os.environ["PREFECT_HOME"])
    )


# --- a tickers file that is not one ------------------------------------------------------

ENV_SECRET = "env-s3cret-7d1c0a9e55b2"


def test_a_rejected_tickers_file_line_is_never_echoed(prefect_api: str, tmp_path: Path) -> None:
    """`--tickers-file .env` by mistake: each line is rejected as a symbol, and reported
    by its number only; neither the line nor its upper-cased form is shown or stored."""
    since = datetime.now(UTC)
    evidence = Evidence()
    private, workdir = tmp_path / "private", tmp_path / "work"
    private.mkdir()
    workdir.mkdir()
    with MarketSimulator(SimulatorConfig()) as sim:
        universe = list(sim.data.symbols[760:763])
        file = private / ".env"
        lines = [universe[0], f"DB_PASSWORD={ENV_SECRET}", *universe[1:], f"TOKEN:{ENV_SECRET}"]
        file.write_text("\n".join(lines) + "\n")
        env = cli_env(prefect_api, MARKET_API_URL=sim.base_url, **VERBOSE)
        run = run_cli(
            ["run", "daily-sync", "--date", DAY, "--tickers-file", str(file)], env, workdir
        )
        assert run.returncode == 0, run.stdout + run.stderr
        evidence.add("run", run)

    assert "universe/line 2: permanent" in run.stdout
    assert "universe/line 5: permanent" in run.stdout
    for where, cli_args in {
        "status --json": ["status", "--json", "--failures", "100"],
        "checkpoints show": ["checkpoints", "show", "daily-sync", "--date", DAY],
    }.items():
        result = run_cli(cli_args, env, workdir)
        assert result.returncode == 0, result.stderr
        evidence.add(where, result)
    evidence.texts["database rows"] = sqlite_rows_text(workdir / "syncpoint.db")
    assert "'line 2'" in evidence.texts["database rows"]
    records = prefect_records(since, expect=["skipping 'line 5'"])
    assert "skipping 'line 2'" in records["logs"]
    evidence.texts.update({f"prefect {k}": v for k, v in records.items()})
    roots = (workdir, prefect_server_db(), Path(os.environ["PREFECT_HOME"]))
    for secret in (ENV_SECRET, ENV_SECRET.upper()):
        assert_nowhere(secret, evidence, *roots)
