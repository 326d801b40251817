"""What every case shares: results, timing of subprocesses, the request watch, the Prefect
server, environments and the machine description.

Timings of a run are taken from the outside: the bench starts the process, and a thread
polls the simulator's request counter every 10 ms to see when its first and last requests
arrived (the simulator counts requests but does not timestamp them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import resource
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from syncpoint.simulator import MarketSimulator
from syncpoint.simulator.market_data import MarketData

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
RESULTS = ROOT / "bench" / "results"
# A fixed run date: the simulator serves any date, and a fixed key keeps runs comparable.
DAY = "2026-11-20"
POLL_SECONDS = 0.01
# A stretch this long with no new request is a stall: at 32 requests in flight and 20 ms
# latency (or 100 requests a second under the rate limit) requests arrive every few ms.
STALL_SECONDS = 0.1
# Variables of the caller's shell that would change what a run does.
_SCRUB_PREFIXES = ("MARKET_API", "SYNC_", "SYNCPOINT_", "DIP_API", "PREFECT_")


# --- results --------------------------------------------------------------------------


@dataclass
class Figure:
    """One measured figure; `ok` is None when it has no target (context only)."""

    name: str
    value: str
    target: str = ""
    ok: bool | None = None

    @property
    def verdict(self) -> str:
        return "" if self.ok is None else ("pass" if self.ok else "MISS")


@dataclass
class CaseResult:
    number: int
    title: str
    setup: str
    command: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    # Set by a case whose judged figures are alternatives (case 1's batch sizes).
    verdict_override: str | None = None

    @property
    def verdict(self) -> str:
        if self.error:
            return "error"
        if self.verdict_override:
            return self.verdict_override
        judged = [f.ok for f in self.figures if f.ok is not None]
        if not judged:
            return "info"
        return "pass" if all(judged) else "miss"

    def add(self, name: str, value: str, target: str = "", ok: bool | None = None) -> Figure:
        figure = Figure(name, value, target, ok)
        self.figures.append(figure)
        print(
            f"  [{self.number}] {name}: {value}"
            + (f"   target {target}: {figure.verdict}" if target else ""),
            flush=True,
        )
        return figure


# --- statistics -----------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def spread(values: Sequence[float], unit: str = "s", digits: int = 2) -> str:
    """'median (min-max, n=3)': the median and what it summarises."""
    if not values:
        return "n/a"
    med = f"{median(values):.{digits}f}{unit}"
    if len(values) == 1:
        return f"{med} (n=1)"
    return f"{med} ({min(values):.{digits}f}-{max(values):.{digits}f}, n={len(values)})"


# --- the request watch ----------------------------------------------------------------


class RequestWatch:
    """When the simulator saw its first and last request while armed, and how many."""

    def __init__(self, sim: MarketSimulator) -> None:
        self.sim = sim
        self.base = 0
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.stalls: list[float] = []  # lengths of the gaps >= STALL_SECONDS between requests
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RequestWatch:
        self.base = self._requests()
        self._thread = threading.Thread(target=self._poll, name="bench-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    @property
    def span(self) -> float:
        """Seconds from the first to the last request (0 when fewer than two)."""
        if self.first is None or self.last is None:
            return 0.0
        return self.last - self.first

    def _requests(self) -> int:
        return int(self.sim.stats()["requests"])

    def _sample(self) -> None:
        seen = self._requests() - self.base
        if seen != self.count:
            now = time.monotonic()
            if self.first is None:
                self.first = now
            elif self.last is not None and now - self.last >= STALL_SECONDS:
                self.stalls.append(now - self.last)
            self.last = now
            self.count = seen

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(POLL_SECONDS)


# --- the API as its own process -------------------------------------------------------


class SimProcess:
    """The market API in its own process (`python -m bench.sim_process`), so the runs
    measured never share a process, or a GIL, with the API they call.

    It offers what the cases use of an in-process MarketSimulator: `base_url`, `data`
    (the symbol universe, generated the same way here), `stats()` and `reset_stats()`;
    its requests are timed by the API process itself (see `watched`).
    """

    def __init__(self, *, latency_ms: float = 0, rate_limit_per_minute: int | None = None):
        self.latency_ms = latency_ms
        self.rate_limit_per_minute = rate_limit_per_minute
        self.data = MarketData()
        self.base_url = ""
        self.control_url = ""
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> SimProcess:
        args = [PYTHON, "-m", "bench.sim_process", "--latency-ms", str(self.latency_ms)]
        if self.rate_limit_per_minute:
            args += ["--rate-limit-per-minute", str(self.rate_limit_per_minute)]
        env = clean_environ()
        env["PYTHONPATH"] = str(ROOT)
        self._proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            args, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise Failed(f"bench.sim_process exited {self._proc.wait()} before it was ready")
        urls = json.loads(line)
        self.base_url, self.control_url = urls["base_url"], urls["control_url"]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is not None:
            _stop_group(self._proc)
            self._proc = None

    def _call(self, method: str, path: str) -> Any:
        request = urllib.request.Request(f"{self.control_url}{path}", method=method)  # noqa: S310
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
            return json.loads(answer.read())

    def stats(self) -> dict[str, Any]:
        return dict(self._call("GET", "/stats"))

    def reset_stats(self) -> None:
        self._call("POST", "/reset")

    def start_watch(self) -> None:
        self._call("POST", "/watch/start")

    def stop_watch(self) -> dict[str, Any]:
        return dict(self._call("POST", "/watch/stop"))


Simulator = MarketSimulator | SimProcess


# --- processes ------------------------------------------------------------------------


@dataclass
class Timed:
    """A finished subprocess: exit code, output and times (monotonic seconds)."""

    returncode: int
    stdout: str
    stderr: str
    started: float
    ended: float
    cpu: float  # user + system seconds of the process and its children

    @property
    def total(self) -> float:
        return self.ended - self.started

    def tail(self, lines: int = 15) -> str:
        text = (self.stdout + "\n" + self.stderr).strip().splitlines()
        return "\n".join(text[-lines:])


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_timed(
    args: Sequence[str],
    *,
    env: dict[str, str],
    cwd: Path,
    timeout: float = 900,
) -> Timed:
    """Run a process to the end. Cases run one process at a time, so the children's CPU
    delta is this process's CPU."""
    cpu0 = _children_cpu()
    started = time.monotonic()
    proc = subprocess.run(  # noqa: S603 - our own interpreter and arguments
        list(args),
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    ended = time.monotonic()
    return Timed(proc.returncode, proc.stdout, proc.stderr, started, ended, _children_cpu() - cpu0)


@dataclass
class Sample:
    """A run against the simulator, timed from the outside."""

    timed: Timed
    requests: int  # requests the simulator saw during the run
    span: float  # first -> last request
    startup: float  # process start -> first request
    tail: float  # last request -> process exit
    responses: dict[str, int]
    stalls: list[float]  # gaps of >= STALL_SECONDS without a request, first -> last
    # Requests in each second from the first on (an API in its own process only).
    per_second: list[int] = field(default_factory=list)

    @property
    def stalled(self) -> float:
        return sum(self.stalls)

    @property
    def total(self) -> float:
        return self.timed.total


def watched(
    sim: Simulator,
    args: Sequence[str],
    *,
    env: dict[str, str],
    cwd: Path,
    what: str,
    codes: Sequence[int] = (0,),
    timeout: float = 900,
) -> Sample:
    """Run a process against `sim` (its counters reset first) and time its requests."""
    sim.reset_stats()
    if isinstance(sim, SimProcess):
        sim.start_watch()
        try:
            timed = run_timed(args, env=env, cwd=cwd, timeout=timeout)
        finally:
            seen = sim.stop_watch()
        count, first_seen, last_seen = seen["count"], seen["first"], seen["last"]
        stalls = list(seen["stalls"])
        per_second = list(seen.get("per_second") or [])
    else:
        with RequestWatch(sim) as watch:
            timed = run_timed(args, env=env, cwd=cwd, timeout=timeout)
        count, first_seen, last_seen, stalls = watch.count, watch.first, watch.last, watch.stalls
        per_second = []
    require(timed, what, codes)
    first = first_seen if first_seen is not None else timed.ended
    last = last_seen if last_seen is not None else timed.ended
    return Sample(
        timed=timed,
        requests=count,
        span=last - first,
        startup=first - timed.started,
        tail=timed.ended - last,
        responses=dict(sim.stats()["responses"]),
        stalls=stalls,
        per_second=per_second,
    )


def watched_together(
    sim: SimProcess,
    runs: Sequence[tuple[Sequence[str], dict[str, str], Path]],
    *,
    what: str,
    timeout: float = 900,
) -> Sample:
    """Run several processes at once against `sim` (each as (args, env, cwd)) and time
    their requests together, as one sample: first request of any to last of any."""
    sim.reset_stats()
    sim.start_watch()
    cpu0 = _children_cpu()
    started = time.monotonic()
    try:
        procs = [
            subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
                list(args),
                env=env,
                cwd=cwd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for args, env, cwd in runs
        ]
        outputs = [proc.communicate(timeout=timeout) for proc in procs]
    finally:
        seen = sim.stop_watch()
    ended = time.monotonic()
    cpu = _children_cpu() - cpu0
    for proc, (out, err) in zip(procs, outputs, strict=True):
        require(Timed(proc.returncode, out, err, started, ended, cpu), what)
    first = seen["first"] if seen["first"] is not None else ended
    last = seen["last"] if seen["last"] is not None else ended
    return Sample(
        timed=Timed(0, "", "", started, ended, cpu),
        requests=seen["count"],
        span=last - first,
        startup=first - started,
        tail=ended - last,
        responses=dict(sim.stats()["responses"]),
        stalls=list(seen["stalls"]),
    )


def syncpoint_cli(*args: str) -> list[str]:
    return [PYTHON, "-m", "syncpoint.cli", *args]


def daily_sync_cli(tickers: Path, concurrency: int, *extra: str) -> list[str]:
    """`syncpoint run daily-sync` of the bench's date over a tickers file."""
    return syncpoint_cli(
        "run",
        "daily-sync",
        "--date",
        DAY,
        "--tickers-file",
        str(tickers),
        "--concurrency",
        str(concurrency),
        *extra,
    )


def bench_module(module: str, *args: str) -> list[str]:
    return [PYTHON, "-m", f"bench.{module}", *args]


def baseline_sync(
    base_url: str,
    tickers: Path,
    database: Path,
    *,
    concurrency: int,
    day: str = DAY,
    extra: Sequence[str] = (),
) -> list[str]:
    """The hand-written script's command line (bench/baseline_sync.py) against `base_url`."""
    return bench_module(
        "baseline_sync",
        "--base-url",
        base_url,
        "--tickers-file",
        str(tickers),
        "--database",
        str(database),
        "--date",
        day,
        "--concurrency",
        str(concurrency),
        *extra,
    )


class Failed(RuntimeError):
    """A run the case needed did not do what it had to; the case reports an error."""


def require(timed: Timed, what: str, codes: Sequence[int] = (0,)) -> Timed:
    if timed.returncode not in codes:
        raise Failed(f"{what} exited {timed.returncode}:\n{timed.tail()}")
    return timed


# --- environments ---------------------------------------------------------------------


def clean_environ() -> dict[str, str]:
    """The caller's environment without anything that configures syncpoint or Prefect."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB_PREFIXES)}


@dataclass
class Bench:
    """One invocation: options, the work folder and the Prefect API every run talks to."""

    quick: bool
    workdir: Path
    prefect_api_url: str
    client_home: Path
    reps_override: int | None = None
    bulk_rows_all: bool = False
    _counter: int = 0

    def reps(self, full: int, quick: int = 1) -> int:
        """Repetitions of a case: --reps if given, else the case's own count."""
        if self.reps_override is not None:
            return self.reps_override
        return quick if self.quick else full

    def env(self, **extra: str) -> dict[str, str]:
        env = clean_environ()
        env.update(
            {
                "PREFECT_API_URL": self.prefect_api_url,
                # Persisted task results of the runs live in the work folder, not ~/.prefect.
                "PREFECT_HOME": str(self.client_home),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "SYNCPOINT_FLOW_RETRIES": "0",
                "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(ROOT),
            }
        )
        env.update(extra)
        return env

    def folder(self, name: str) -> Path:
        """A new, empty folder for one run."""
        self._counter += 1
        path = self.workdir / f"{self._counter:03d}-{name}"
        path.mkdir(parents=True)
        return path


def tickers_file(folder: Path, tickers: Sequence[str]) -> Path:
    path = folder / "tickers.txt"
    path.write_text("\n".join(tickers) + "\n")
    return path


def sqlite_scalar(db: Path, sql: str) -> int:
    """One integer from a SQLite file another process may be writing; 0 if not there yet."""
    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as c:
            row = c.execute(sql).fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0]) if row and row[0] is not None else 0


# --- the Prefect server ---------------------------------------------------------------


def ensure_global_limit(api_url: str, name: str, *, slots: int, per_minute: float) -> None:
    """A Prefect global limit of `slots` decaying at `per_minute` / 60 a second on the server
    at `api_url`: created, or reset if it is there from an earlier invocation."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL, temporary_settings

    decay = per_minute / 60
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=slots, slot_decay_per_second=decay)
            )
        except ObjectAlreadyExists:
            client.update_global_concurrency_limit(
                name,
                GlobalConcurrencyLimitUpdate(
                    limit=slots, slot_decay_per_second=decay, active_slots=0
                ),
            )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def prefect_server(home: Path, log: Path, timeout: float = 180) -> Iterator[tuple[str, float]]:
    """`prefect server start` on a free loopback port; yields (API URL, start-up seconds).

    Its home (database) is kept between invocations under bench/results/, so only the first
    invocation pays for the schema migrations.
    """
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = clean_environ()
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
        }
    )
    prefect = [PYTHON, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(  # noqa: S603
            [*prefect, "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole below
        )
    url = f"http://127.0.0.1:{port}/api"
    try:
        while True:
            if proc.poll() is not None:
                raise Failed(f"prefect server exited {proc.returncode}; see {log}")
            if time.monotonic() - started > timeout:
                raise Failed(f"prefect server not healthy after {timeout:.0f}s; see {log}")
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(f"{url}/health", timeout=2) as answer,  # noqa: S310
            ):
                if answer.status == 200:
                    break
            time.sleep(0.2)
        yield url, time.monotonic() - started
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM the server's own process group (only processes this bench started)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# --- the machine ----------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import prefect

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "prefect": prefect.__version__,
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        **code_version(),
    }


# What the figures measure: a commit that only touches bench/ or the docs changes nothing.
PRODUCT_PATHS = ("syncpoint", "pyproject.toml", "prefect.yaml")


def code_version() -> dict[str, Any]:
    """The last commit of the product code, its uncommitted changes, and their digest."""
    paths = ["--", *PRODUCT_PATHS]
    changed = _git("diff", "HEAD", "--name-only", *paths).split()
    digest = hashlib.sha256(_git("diff", "HEAD", *paths).encode()).hexdigest()[:12]
    return {
        "commit": _git("log", "-1", "--format=%h", *paths),
        "head": _git("rev-parse", "--short", "HEAD"),
        "changed": changed,
        "diff": digest,
    }


def _git(*args: str) -> str:
    try:
        out = subprocess.run(  # noqa: S603
            ["git", *args],  # noqa: S607
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()
