"""The real parts of the end-to-end tests and the ways to look at them.

`prefect server start`, `prefect worker start` and every other `prefect` command run as
subprocesses of the real CLI, each in its own process group with its own PREFECT_HOME;
the market API is the simulator on loopback; data and checkpoints land in a SQLite file
the tests read directly. Nothing here sleeps a fixed time: every wait polls with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import httpx
import psutil

from syncpoint.simulator import MarketSimulator

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "syncpoint"  # prefect.yaml's work pool
DEPLOYMENT = "daily-sync/market-nightly"  # flow name / deployment name in prefect.yaml
PRICES = "historical-price-eod/full"
DCF = "discounted-cash-flow"
CHROMIUM = Path("/usr/bin/chromium")

T = TypeVar("T")


# --- processes -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Prefect, market or syncpoint setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MARKET_", "SYNC"))}
    env.update(PYTHONUNBUFFERED="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.update(extra)
    return env


@dataclass
class Proc:
    """A long-running subprocess in its own process group, output in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def spawn(cls, name: str, args: list[str], env: dict[str, str], log: Path) -> Proc:
        with log.open("wb") as out:
            popen = subprocess.Popen(
                args,
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(name, popen, log)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 60) -> str:
        return f"--- last lines of {self.name} ({self.log}) ---\n" + "\n".join(
            self.output().splitlines()[-lines:]
        )

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the group (the worker's flow-run children too), SIGKILL if it lingers."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)


def prefect_cli(
    args: list[str], env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PREFECT, "--no-prompt", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def poll(
    what: str,
    check: Callable[[], T | None],
    timeout: float,
    *,
    interval: float = 0.25,
    context: Callable[[], str] | None = None,
) -> T:
    """Call `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{context()}" if context is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)


# --- the Prefect server --------------------------------------------------------------------


@dataclass
class Server:
    backend: str
    port: int
    workdir: Path
    proc: Proc
    database_url: str | None  # PostgreSQL (SQLAlchemy URL) or None for SQLite

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.ui_url}/api"

    def cli_env(self, **extra: str) -> dict[str, str]:
        home = self.workdir / "cli-home"
        home.mkdir(exist_ok=True)
        return base_env(PREFECT_API_URL=self.api_url, PREFECT_HOME=str(home), **extra)


@contextlib.contextmanager
def prefect_server(
    backend: str, workdir: Path, database_url: str | None = None, timeout: float = 240
) -> Iterator[Server]:
    """`prefect server start` on a free loopback port until the block ends."""
    port = free_port()
    home = workdir / "server-home"
    home.mkdir()
    env = base_env(
        PREFECT_HOME=str(home),
        PREFECT_UI_ENABLED="true",
        # Without it the UI asks the API on the default port 4200, not --port.
        PREFECT_SERVER_UI_API_URL=f"http://127.0.0.1:{port}/api",
    )
    if database_url is not None:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    proc = Proc.spawn(
        f"prefect server ({backend})",
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env,
        workdir / "server.log",
    )
    server = Server(backend, port, workdir, proc, database_url)
    try:

        def healthy() -> bool:
            if not proc.alive():
                raise AssertionError(f"prefect server exited early\n{proc.tail()}")
            try:
                return httpx.get(f"{server.api_url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        poll("the Prefect server's /api/health", healthy, timeout, interval=0.5)
        yield server
    finally:
        proc.stop()


def deploy(server: Server) -> str:
    """`prefect work-pool create` and `prefect deploy --all` from the repository root, as
    the README says; their output."""
    env = server.cli_env()
    pool = prefect_cli(["work-pool", "create", POOL, "--type", "process"], env)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    done = prefect_cli(["deploy", "--all"], env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@contextlib.contextmanager
def api(server: Server) -> Iterator[Any]:
    """A sync Prefect client for `server` (the in-process settings are left untouched)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: server.api_url}),
        get_client(sync_client=True) as client,
    ):
        yield client


# --- a deployed syncpoint with its worker --------------------------------------------------


@dataclass
class Stack:
    """A server with syncpoint deployed, a simulator and a process worker on the pool."""

    server: Server
    deployment_id: UUID
    sim: MarketSimulator
    worker: Proc
    data_db: Path  # the worker's SYNCPOINT_DATABASE_URL (data and checkpoints)
    results: Path  # the worker's PREFECT_LOCAL_STORAGE_PATH

    @property
    def workdir(self) -> Path:
        return self.server.workdir

    def logs(self) -> str:
        return f"{self.worker.tail(80)}\n{self.server.proc.tail(20)}"


@dataclass
class Deployed:
    server: Server
    deployment: Any  # the deployment as read back right after `prefect deploy --all`
    deploy_output: str


def tickers(sim: MarketSimulator, start: int, stop: int) -> list[str]:
    """A slice of the S&P 500 symbols, sorted: the order the ledger hands out batches."""
    return sorted(sim.data.sp500_symbols[start:stop])


def start_worker(server: Server, sim: MarketSimulator, **extra_env: str) -> tuple[Proc, Path, Path]:
    data_db = server.workdir / "data.db"
    results = server.workdir / "results"
    results.mkdir()
    home = server.workdir / "worker-home"
    home.mkdir()
    env = base_env(
        PREFECT_API_URL=server.api_url,
        PREFECT_HOME=str(home),
        PREFECT_WORKER_QUERY_SECONDS="1",
        MARKET_API_URL=sim.base_url,
        SYNCPOINT_DATABASE_URL=f"sqlite:///{data_db}",
        # The tests' ticker files are written here; a flow run reads no other folder.
        SYNCPOINT_TICKERS_DIR=str(server.workdir),
        SYNCPOINT_FLOW_RETRIES="0",
        PREFECT_LOCAL_STORAGE_PATH=str(results),
        **extra_env,
    )
    worker = Proc.spawn(
        "prefect worker",
        [PREFECT, "worker", "start", "--pool", POOL],
        env,
        server.workdir / "worker.log",
    )
    return worker, data_db, results


def write_tickers(stack: Stack, name: str, tickers: list[str]) -> Path:
    path = stack.workdir / f"tickers-{name}.txt"
    path.write_text("\n".join(tickers) + "\n")
    return path


def trigger(
    stack: Stack,
    run_date: str,
    tickers: list[str],
    *,
    batch_size: int = 5,
    env: dict[str, str] | None = None,
) -> UUID:
    """Create a run of the deployment through the API, as the UI's "Run" does."""
    path = write_tickers(stack, run_date, tickers)
    with api(stack.server) as client:
        flow_run = client.create_flow_run_from_deployment(
            stack.deployment_id,
            parameters={"run_date": run_date, "tickers_file": str(path), "batch_size": batch_size},
            job_variables={"env": env} if env else None,
        )
    return flow_run.id


def flow_run(stack: Stack, flow_run_id: UUID) -> Any:
    with api(stack.server) as client:
        return client.read_flow_run(flow_run_id)


def wait_state(
    stack: Stack, flow_run_id: UUID, accept: Callable[[Any], bool], what: str, timeout: float
) -> Any:
    def check() -> Any:
        run = flow_run(stack, flow_run_id)
        return run if run.state is not None and accept(run.state) else None

    return poll(f"flow run {flow_run_id}: {what}", check, timeout, interval=0.5, context=stack.logs)


def wait_final(stack: Stack, flow_run_id: UUID, timeout: float = 240) -> Any:
    return wait_state(stack, flow_run_id, lambda s: s.is_final(), "a terminal state", timeout)


def state_history(stack: Stack, flow_run_id: UUID) -> list[tuple[str, str, str]]:
    """(type, name, message) of every state the run went through, oldest first."""
    with api(stack.server) as client:
        states = client.read_flow_run_states(flow_run_id)
    return [
        (s.type.value, s.name or "", s.message or "")
        for s in sorted(states, key=lambda s: s.timestamp)
    ]


def collapsed_types(history: list[tuple[str, str, str]]) -> list[str]:
    types: list[str] = []
    for kind, _, _ in history:
        if not types or types[-1] != kind:
            types.append(kind)
    return types


def artifacts(stack: Stack, flow_run_id: UUID) -> dict[str, list[Any]]:
    """The run's artifacts by key, each list oldest first (every version of a key).

    Keyless ones are left out: Prefect's server keeps a failed state's data as one.
    """
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with api(stack.server) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    by_key: dict[str, list[Any]] = {}
    for artifact in sorted(found, key=lambda a: a.created):
        if artifact.key is not None:
            by_key.setdefault(artifact.key, []).append(artifact)
    return by_key


def run_log(stack: Stack, flow_run_id: UUID) -> list[Any]:
    """The flow run's log lines as its page lists them, oldest first."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    lines: list[Any] = []
    with api(stack.server) as client:
        while True:  # the API hands out at most 200 lines a page
            page = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                sort=LogSort.TIMESTAMP_ASC,
                limit=200,
                offset=len(lines),
            )
            lines += page
            if len(page) < 200:
                return lines


def table_rows(artifact: Any) -> list[dict[str, Any]]:
    data = artifact.data
    rows = json.loads(data) if isinstance(data, str) else data
    assert isinstance(rows, list)
    return rows


def wait_worker_done(stack: Stack, flow_run_id: UUID, attempts: int, timeout: float = 90) -> None:
    """Until the worker has reported `attempts` executions of the run as over.

    The worker keeps a finished attempt for a while (it tears down its watchers) and only
    then reports the process's exit; retrying before that lets a late "Crashed" land on
    the retried run (see the report in test_prefect_operations).
    """
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    def done() -> bool:
        with api(stack.server) as client:
            page = client.read_events(
                filter=EventFilter(
                    event=EventNameFilter(name=["prefect.worker.executed-flow-run"]),
                    related=EventRelatedFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
                ),
                limit=50,
            )
        return len(page.events) >= attempts

    poll(f"the worker to finish attempt {attempts} of {flow_run_id}", done, timeout, interval=0.5)


def retry_from_cli(stack: Stack, flow_run_id: UUID) -> subprocess.CompletedProcess[str]:
    result = prefect_cli(["flow-run", "retry", str(flow_run_id)], stack.server.cli_env())
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def engine_process(stack: Stack, flow_run_id: UUID, timeout: float = 60) -> psutil.Process:
    """The worker's child process that executes the flow run (`python -m prefect.engine`)."""

    def find() -> psutil.Process | None:
        for child in psutil.Process(stack.worker.popen.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.environ().get("PREFECT__FLOW_RUN_ID") == str(flow_run_id):
                    return child
        return None

    return poll(f"the process of flow run {flow_run_id}", find, timeout, context=stack.logs)


# --- the checkpoint and the data, read straight from SQLite --------------------------------


@dataclass
class Ledger:
    db: Path

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        if not self.db.exists():
            return []
        try:
            with contextlib.closing(
                sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
            ) as conn:
                return [tuple(r) for r in conn.execute(sql, args).fetchall()]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []  # the run has not created its schema yet
            raise

    def items(self, run_key: str, stage: str, status: str = "done") -> set[str]:
        rows = self.query(
            "SELECT i.item FROM sync_items i JOIN sync_runs r ON r.run_id = i.run_id "
            "WHERE r.job = 'daily-sync' AND r.run_key = ? AND i.stage = ? AND i.status = ?",
            run_key,
            stage,
            status,
        )
        return {r[0] for r in rows}

    def run(self, run_key: str) -> tuple[str, dict[str, Any]]:
        """(status, recorded summary) of the checkpoint's run."""
        rows = self.query(
            "SELECT status, state FROM sync_runs WHERE job = 'daily-sync' AND run_key = ?",
            run_key,
        )
        assert rows, f"no checkpoint for daily-sync {run_key}"
        status, state = rows[0]
        return status, json.loads(state).get("summary") or {}

    def tickers_in(self, table: str) -> set[str]:
        return {r[0] for r in self.query(f"SELECT DISTINCT ticker FROM {table}")}


def requests_per_ticker(sim: MarketSimulator, tickers: list[str], endpoint: str) -> dict[str, int]:
    return {t: sim.requests_for(t, endpoint) for t in tickers}


# --- the UI in headless Chromium -----------------------------------------------------------


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def visible_text(html: str) -> str:
    parser = _Text()
    parser.feed(html)
    return " ".join(" ".join(parser.parts).split())


def chromium_text(url: str, profile: Path, budget_ms: int = 15000, timeout: float = 120) -> str:
    """The page's text after the SPA rendered (headless Chromium's --dump-dom)."""
    profile.mkdir(parents=True, exist_ok=True)
    args = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={budget_ms}",
        "--dump-dom",
        url,
    ]
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert out, f"chromium printed no DOM for {url}: {err.decode(errors='replace')[-2000:]}"
    return visible_text(out.decode(errors="replace"))


# --- PostgreSQL for the Prefect server -----------------------------------------------------


def pgserver_has_pg_trgm() -> bool:
    """Prefect's PostgreSQL migrations run CREATE EXTENSION pg_trgm; pgserver's build lacks it."""
    try:
        import pgserver
    except ImportError:
        return False
    ext = Path(pgserver.__file__).parent / "pginstall" / "share" / "postgresql" / "extension"
    return (ext / "pg_trgm.control").exists()


def debian_postgres_bindir() -> Path | None:
    """Debian's PostgreSQL (package `postgresql`, contrib included), if installed."""
    for bindir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        version = bindir.parent.name
        control = Path(f"/usr/share/postgresql/{version}/extension/pg_trgm.control")
        if (bindir / "initdb").exists() and control.exists():
            return bindir
    return None


@contextlib.contextmanager
def throwaway_postgres(bindir: Path, database: str) -> Iterator[str]:
    """A new PostgreSQL cluster on a unix socket only; yields a SQLAlchemy URL (no driver)."""
    base = Path(tempfile.mkdtemp(prefix="syncpoint-e2e-pg-"))
    as_user: dict[str, Any] = {}
    if os.geteuid() == 0:  # postgres refuses to run as root
        owner = pwd.getpwnam("postgres")
        os.chown(base, owner.pw_uid, owner.pw_gid)
        as_user = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}

    def run(*args: str | Path) -> None:
        result = subprocess.run(
            [str(a) for a in args],
            cwd=base,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            **as_user,
        )
        assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout}\n{result.stderr}"

    data = base / "data"
    run(bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    run(
        bindir / "pg_ctl",
        "-D",
        data,
        "-l",
        base / "postgres.log",
        "-o",
        f"-k {base} -c listen_addresses='' -c fsync=off",
        "-w",
        "start",
    )
    try:
        run(bindir / "createdb", "-h", base, "-U", "postgres", database)
        yield f"postgresql://postgres@/{database}?host={base}"
    finally:
        with contextlib.suppress(AssertionError):
            run(bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)
