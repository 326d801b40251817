"""Case 7: a first full sync of one DIP entity at scale, against a hand-written cursor loop.

The DIP simulator runs as its own process (`python -m syncpoint.simulator`), serving
200,000 records an entity in pages of 100 (10 for the full-text entities) after 20 ms
of latency, as DIP documents them. `syncpoint run document-sync --entity aktivitaet`
streams the entity into a fresh SQLite file, never holding more than 500 records that
are not yet stored (the default DIP_CHECKPOINT_RECORDS); the baseline `python -m
bench.dip_loop` is the loop a person writes by hand (httpx, one upsert and commit per
page into the same table, no checkpoint). Judged:

- records per second, first to last request, at least 0.9x the loop's (also for
  drucksache-text, 20,000 records in 10-record pages);
- peak memory (the process's max RSS) flat: the same at 50,000 and 200,000 records;
- a SIGKILL half-way, then `--resume`: at most one checkpoint interval read twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import (
    PYTHON,
    Bench,
    CaseResult,
    Failed,
    bench_module,
    free_port,
    median,
    spread,
    sqlite_scalar,
    syncpoint_cli,
)

LATENCY_MS = 20
ENTITY, TEXT_ENTITY = "aktivitaet", "drucksache-text"
CHECKPOINT_RECORDS = 500  # syncpoint's default DIP_CHECKPOINT_RECORDS
TARGET_RATIO = 0.9
# "Flat": the peak at four times the records within 10% of the smaller run's.
MEMORY_SLACK = 1.10
WATCH_SECONDS = 0.05
RECORDS_SQL = (
    "SELECT json_extract(state, '$.stream.records') FROM sync_runs "
    f"WHERE job = 'document-sync' AND run_key = '{ENTITY}'"
)


# --- the simulator as its own process ---------------------------------------------------------


class RemoteSimulator:
    """`python -m syncpoint.simulator` on a free port; its counters over /_sim/stats."""

    def __init__(self, records: int, log: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        args = [
            PYTHON,
            "-m",
            "syncpoint.simulator",
            "--port",
            str(self.port),
            "--latency-ms",
            str(LATENCY_MS),
            "--dip-records-per-entity",
            str(records),
        ]
        self._log = log.open("w")
        self._proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            args, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 60
        while not self._healthy():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise Failed(f"the simulator did not start; see {log}")
            time.sleep(0.1)

    def _healthy(self) -> bool:
        with contextlib.suppress(OSError):
            self.stats()
            return True
        return False

    def stats(self) -> dict[str, Any]:
        url = f"{self.base_url}/_sim/stats"
        with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 - loopback
            return dict(json.load(answer))

    def requests(self, entity: str | None = None) -> int:
        stats = self.stats()
        if entity is None:
            return int(stats["requests"])
        return int(stats["by_endpoint"].get(f"dip/{entity}", 0))

    def warm(self, *entities: str) -> None:
        """Generate the entities' records now, outside every timed run."""
        for entity in entities:
            url = f"{self.base_url}/api/v1/{entity}"
            with urllib.request.urlopen(url, timeout=300) as answer:  # noqa: S310
                answer.read()

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._log.close()


@contextlib.contextmanager
def simulators(bench: Bench, **sizes: int) -> Iterator[dict[str, RemoteSimulator]]:
    started: dict[str, RemoteSimulator] = {}
    try:
        for name, records in sizes.items():
            started[name] = RemoteSimulator(records, bench.workdir / f"simulator-{name}.log")
        yield started
    finally:
        for sim in started.values():
            sim.stop()


# --- a measured run -----------------------------------------------------------------------------


@dataclass
class Run:
    returncode: int
    output: str
    requests: int  # requests the simulator saw during the run
    span: float  # first -> last request, seconds (at WATCH_SECONDS resolution)
    peak_rss_mib: float  # the process's own max RSS

    def rate(self, records: int) -> float:
        return records / self.span if self.span else float("nan")


def measured(
    args: list[str],
    *,
    env: dict[str, str],
    cwd: Path,
    sim: RemoteSimulator,
    what: str,
    kill_when: Callable[[], bool] | None = None,
) -> Run:
    """Run `args` to its end (or SIGKILL it once `kill_when()` holds) while watching the
    simulator's request counter; the peak RSS is the child's own (wait4)."""
    base = sim.requests()
    seen = [base]
    first: list[float] = []
    last: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            count = sim.requests()
            if count != seen[-1]:
                now = time.monotonic()
                if not first:
                    first.append(now)
                last[:] = [now]
                seen.append(count)
            time.sleep(WATCH_SECONDS)

    out = cwd / f"{what.replace(' ', '-')}.log"
    with out.open("w") as log:
        proc = subprocess.Popen(  # noqa: S603
            args, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT
        )
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            if kill_when is not None:
                while not kill_when():
                    if proc.poll() is not None:
                        raise Failed(f"{what}: ended (exit {proc.returncode}) before the kill")
                    time.sleep(0.02)
                proc.send_signal(signal.SIGKILL)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            done.set()
            watcher.join()
    total = sim.requests() - base
    span = (last[0] - first[0]) if first and last else 0.0
    return Run(proc.returncode, out.read_text(), total, span, usage.ru_maxrss / 1024)


def require(run: Run, what: str, code: int = 0) -> Run:
    if run.returncode != code:
        tail = "\n".join(run.output.strip().splitlines()[-15:])
        raise Failed(f"{what} exited {run.returncode}:\n{tail}")
    return run


def loop_report(run: Run) -> dict[str, Any]:
    return dict(json.loads(run.output.strip().splitlines()[-1]))


# --- the case -------------------------------------------------------------------------------------


def run(bench: Bench) -> CaseResult:
    big = 20_000 if bench.quick else 200_000
    small = 5_000 if bench.quick else 50_000
    texts = 2_000 if bench.quick else 20_000
    reps = bench.reps(2)
    pages = big // 100 + 1  # full pages, then the empty answer that ends the stream
    result = CaseResult(
        7,
        "First full sync at scale (DIP)",
        setup=(
            f"Simulator as its own process (`python -m syncpoint.simulator "
            f"--latency-ms {LATENCY_MS} --dip-records-per-entity N`), DIP's paging: 100 "
            f"records a page, 10 for -text entities, Solr cursors. `syncpoint run "
            f"document-sync --entity {ENTITY}` ({big:,} records, fresh SQLite file, at most "
            f"{CHECKPOINT_RECORDS} records not yet stored: the default DIP_CHECKPOINT_RECORDS) "
            "against `python -m bench.dip_loop` "
            f"(httpx, one upsert and commit per page), {reps} interleaved repetition(s); the "
            f"same for {TEXT_ENTITY} ({texts:,} records, 10 a page) once each. Memory: the "
            f"syncpoint process's peak RSS at {small:,} and at {big:,} records. Crash: SIGKILL "
            f"once {big // 2:,} records are checkpointed and the next segment is half fetched, "
            "then the same command with `--resume`."
        ),
        command="scripts/bench --case 7" + (" --quick" if bench.quick else ""),
    )

    def syncpoint(sim: RemoteSimulator, folder: Path, entity: str, *extra: str) -> tuple:
        args = syncpoint_cli("run", "document-sync", "--entity", entity, *extra)
        env = bench.env(
            DIP_API_URL=sim.base_url, SYNCPOINT_DATABASE_URL=f"sqlite:///{folder / 'sync.db'}"
        )
        return args, env

    def loop(sim: RemoteSimulator, folder: Path, entity: str) -> list[str]:
        return bench_module(
            "dip_loop",
            "--base-url",
            sim.base_url,
            "--entity",
            entity,
            "--database",
            str(folder / "loop.db"),
        )

    rates: dict[str, list[float]] = {"syncpoint": [], "loop": []}
    ratios: list[float] = []
    rss: dict[str, list[float]] = {"syncpoint": [], "loop": []}
    with simulators(bench, big=big, small=small, text=texts) as sims:
        sims["big"].warm(ENTITY)
        sims["small"].warm(ENTITY)
        sims["text"].warm(TEXT_ENTITY)

        # 1. Throughput and memory at full size, interleaved.
        for rep in range(reps):
            this: dict[str, Run] = {}
            for who in ("loop", "syncpoint") if rep % 2 == 0 else ("syncpoint", "loop"):
                folder = bench.folder(f"full-{who}-{rep}")
                if who == "loop":
                    done = require(
                        measured(
                            loop(sims["big"], folder, ENTITY),
                            env=bench.env(),
                            cwd=folder,
                            sim=sims["big"],
                            what=f"loop {rep}",
                        ),
                        "case 7 loop",
                    )
                    stored = loop_report(done)["stored"]
                else:
                    args, env = syncpoint(sims["big"], folder, ENTITY)
                    done = require(
                        measured(args, env=env, cwd=folder, sim=sims["big"], what=f"sp {rep}"),
                        "case 7 syncpoint",
                    )
                    stored = sqlite_scalar(folder / "sync.db", "SELECT count(*) FROM dip_documents")
                if stored != big or done.requests != pages:
                    raise Failed(
                        f"case 7 {who}: {stored:,} records stored in {done.requests:,} requests,"
                        f" expected {big:,} in {pages:,}"
                    )
                this[who] = done
                rates[who].append(done.rate(big))
                rss[who].append(done.peak_rss_mib)
                print(
                    f"  [7] rep {rep + 1}/{reps} {who:<9} first->last {done.span:6.2f}s  "
                    f"{done.rate(big):7.0f} records/s  peak RSS {done.peak_rss_mib:6.1f} MiB",
                    flush=True,
                )
            ratios.append(this["syncpoint"].rate(big) / this["loop"].rate(big))

        # 2. The full-text entity: ten records a page.
        text_rates: dict[str, float] = {}
        for who in ("loop", "syncpoint"):
            folder = bench.folder(f"text-{who}")
            if who == "loop":
                args, env = loop(sims["text"], folder, TEXT_ENTITY), bench.env()
            else:
                args, env = syncpoint(sims["text"], folder, TEXT_ENTITY)
            done = require(
                measured(args, env=env, cwd=folder, sim=sims["text"], what=f"text {who}"),
                f"case 7 text {who}",
            )
            if done.requests != texts // 10 + 1:
                raise Failed(f"case 7 text {who}: {done.requests} requests")
            text_rates[who] = done.rate(texts)
            print(f"  [7] {TEXT_ENTITY} {who:<9} {text_rates[who]:7.0f} records/s", flush=True)

        # 3. Memory at a quarter of the records.
        folder = bench.folder("small-syncpoint")
        args, env = syncpoint(sims["small"], folder, ENTITY)
        smaller = require(
            measured(args, env=env, cwd=folder, sim=sims["small"], what="sp small"),
            "case 7 small syncpoint",
        )
        print(f"  [7] {small:,} records: peak RSS {smaller.peak_rss_mib:.1f} MiB", flush=True)

        # 4. SIGKILL half-way, then --resume.
        folder = bench.folder("crash")
        args, env = syncpoint(sims["big"], folder, ENTITY)
        mark: list[int] = []

        def half_way() -> bool:
            # Past the half-way checkpoint, wait until the next segment is half fetched:
            # a kill right after a commit would find nothing in flight and prove nothing.
            if not mark:
                if sqlite_scalar(folder / "sync.db", RECORDS_SQL) < big // 2:
                    return False
                mark.append(sims["big"].requests(ENTITY))
            return sims["big"].requests(ENTITY) >= mark[0] + CHECKPOINT_RECORDS // 100 // 2

        killed = measured(
            args, env=env, cwd=folder, sim=sims["big"], what="sp killed", kill_when=half_way
        )
        at_kill = sqlite_scalar(folder / "sync.db", RECORDS_SQL)
        resumed = require(
            measured([*args, "--resume"], env=env, cwd=folder, sim=sims["big"], what="sp resumed"),
            "case 7 resumed syncpoint",
        )
        stored = sqlite_scalar(folder / "sync.db", "SELECT count(*) FROM dip_documents")
        if stored != big:
            raise Failed(f"case 7 crash: {stored:,} records stored after the resume")
        twice_pages = killed.requests + resumed.requests - pages
        twice = twice_pages * 100

    ratio = median(ratios)
    result.add("loop: records/s (first -> last request)", spread(rates["loop"], "", 0))
    result.add("syncpoint: records/s (first -> last request)", spread(rates["syncpoint"], "", 0))
    result.add(
        f"syncpoint vs loop, {ENTITY} ({big:,} records)",
        f"{ratio:.2f}x ({', '.join(f'{r:.2f}' for r in ratios)})",
        f">= {TARGET_RATIO}x",
        ratio >= TARGET_RATIO,
    )
    text_ratio = text_rates["syncpoint"] / text_rates["loop"]
    result.add(
        f"syncpoint vs loop, {TEXT_ENTITY} ({texts:,} records, 10 a page)",
        f"{text_ratio:.2f}x ({text_rates['syncpoint']:.0f} vs {text_rates['loop']:.0f} records/s)",
        f">= {TARGET_RATIO}x",
        text_ratio >= TARGET_RATIO,
    )
    peak_big, peak_small = max(rss["syncpoint"]), smaller.peak_rss_mib
    result.add(
        f"syncpoint peak RSS, {small:,} vs {big:,} records",
        f"{peak_small:.0f} vs {peak_big:.0f} MiB ({peak_big / peak_small:.2f}x)",
        f"<= {MEMORY_SLACK:.2f}x",
        peak_big <= MEMORY_SLACK * peak_small,
    )
    result.add("loop peak RSS", spread(rss["loop"], " MiB", 0))
    result.add(
        "killed at (records checkpointed)", f"{at_kill:,} of {big:,}; requests {killed.requests:,}"
    )
    result.add(
        "records read twice after the kill (--resume)",
        f"{twice:,} ({twice_pages} pages; {killed.requests:,} + {resumed.requests:,} requests "
        f"for {pages:,})",
        f"<= {CHECKPOINT_RECORDS} (one checkpoint interval)",
        twice <= CHECKPOINT_RECORDS,
    )
    result.notes.append(
        f"syncpoint reads pages on a thread of its own while the segment before them is "
        f"stored, never more than {CHECKPOINT_RECORDS} records (DIP_CHECKPOINT_RECORDS) "
        f"beyond the last checkpoint; the cursor is saved every {CHECKPOINT_RECORDS // 2} "
        "records at most (two pages of 100), each segment in its own transaction, and one "
        "store task run stores the segments of about 10 seconds. So storing does not stop "
        "reading, and Prefect's per-task cost is paid a few times a minute, not per "
        "checkpoint."
    )
    result.notes.append(
        f"The kill landed with the segment after the {at_kill:,}th record half read: the "
        f"records read twice ({twice:,}) are those read after the last checkpoint. The loop "
        f"commits every page and so, killed, keeps what it stored, but it has no cursor to "
        f"resume from: its rerun reads all {big:,} records again."
    )
    result.notes.append(
        f"Per-repetition ratios ({', '.join(f'{r:.2f}' for r in ratios)}) spread with the "
        "load of this shared machine (see the load average above): each pair of runs met "
        "the same conditions, and their median is the figure. syncpoint uses more CPU than "
        "the loop (SQLAlchemy in the store, Prefect's task runs), which the "
        "20 ms of latency hides on an idle machine and a busy one shows."
    )
    return result
