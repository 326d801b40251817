"""One invocation of a job on a run: open the checkpoint, run stages, record status.

Flows stay a table of contents; this is where a stage's failure is caught, logged to
sync_logs and turned into the run's status (a failed stage does not stop the next one,
a rejected API key stops everything), and where the run explains itself in its own log:
a line per batch (at most one every few seconds), every stop as it happens, in the
terms of the interface the run came from, and a last line saying how it ended.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from syncpoint.blocks.checkpoint import CheckpointStore
from syncpoint.core.db import Database, storage_errors
from syncpoint.core.errors import ConfigError, FatalApiError, SyncError
from syncpoint.core.heartbeat import Heartbeat
from syncpoint.core.interrupts import StopFlag, graceful_stop
from syncpoint.core.ledger import (
    ErrorKind,
    ItemOutcome,
    ItemStatus,
    Ledger,
    RunStatus,
    StageCounts,
    new_owner,
)
from syncpoint.core.redact import redact
from syncpoint.core.sync_log import StageLog
from syncpoint.engine.batch_map import (
    MIN_FETCHES_IN_FLIGHT,
    Progress,
    StageRun,
    fetches_in_flight,
    map_batches,
)
from syncpoint.engine.origin import Origin
from syncpoint.engine.report import summary_line
from syncpoint.engine.run_page import RunPage
from syncpoint.engine.shards import Shards, run_shards
from syncpoint.sources.source import Source
from syncpoint.sources.universe import Universe

FAILURES_SHOWN = 20
FAILED_ROWS_SHOWN = 200  # on the run page
# A stage's progress line at most this often (and always for its first and last batch):
# a run of small batches would otherwise bury the log in lines a second apart.
PROGRESS_LOG_SECONDS = 5.0


class RunFailed(SyncError):
    """The run ended failed; `summary` says how far it got. A rerun resumes it."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


class RunIncomplete(RunFailed):
    """The run ended partial with items whose transient failures outlasted their retries
    and a second pass. Raised so that a deployment's automatic retries pick the run up
    again (a Prefect run only retries a Failed state); the CLI reports it as partial."""


@dataclass
class StageReport:
    name: str
    status: str  # success | partial | failed | skipped
    counts: StageCounts = field(default_factory=StageCounts)
    rows_written: int = 0
    requests: int = 0  # requests that went out in this invocation
    batches_reused: int = 0  # fetched batches served from the fetch cache: no requests
    error: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["counts"] = {**asdict(self.counts), "pending": self.counts.pending}
        return out


class JobRun:
    """A job's run (job, run key) as seen by one invocation; use it as a context manager.

    Entering claims the run (one process at a time), starts its heartbeat and routes
    SIGINT/SIGTERM to a clean stop; leaving on an exception records the run as failed.
    """

    def __init__(
        self,
        job: str,
        run_key: str,
        *,
        data: Database,
        store: CheckpointStore,
        stages: Sequence[str],
        params: dict[str, Any],
        fresh: bool,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
        resume_command: str,
        reopen: bool = False,
        stop: StopFlag | None = None,
        retry_cooldown: float | None = None,
    ) -> None:
        self.job, self.run_key, self.data, self.logger = job, run_key, data, logger
        # Seconds before a stage's transient failures get their second pass; None: no pass.
        self.retry_cooldown = retry_cooldown
        # The command that continues this run from a shell; a deployment run says "Retry".
        self.resume_command = resume_command
        self.origin = Origin.current()
        self._mapped: set[str] = set()  # stages that fetch items (not one-step stages)
        self._passes: list[StageRun] = []  # the current stage's batch passes, as they count
        self._stopped_by: str | None = None
        # Batches the current stage fetches at once (its pipeline depth), for the stop notice.
        self._fetching = MIN_FETCHES_IN_FLIGHT
        self._last_progress_log = 0.0
        self.checkpoints = store.target(data)
        self.ledger = Ledger(self.checkpoints.engine())
        expired = self.ledger.expire(store.retention_days)
        if expired:
            logger.info(
                "removed %d completed checkpoints older than %d days", expired, store.retention_days
            )
        self.owner = new_owner()
        self._stale_after = store.stale_after_seconds
        claim = self.ledger.open(
            job,
            run_key,
            stages=stages,
            params=params,
            fresh=fresh,
            owner=self.owner,
            stale_after=store.stale_after_seconds,
            reopen=reopen,
        )
        self.run, self.resumed = claim.run, claim.resumed
        # A caller that runs several JobRuns (one per entity) owns the signals and the flag.
        self._owns_signals = stop is None
        self.stop = stop if stop is not None else StopFlag()
        self.page = RunPage(job, run_key, stages, logger, self.origin)
        self.reports: list[StageReport] = []
        self.started = time.monotonic()
        self._exit = ExitStack()
        if claim.took_over:
            logger.warning(
                "took over %s %s from %s: continuing from its checkpoint",
                job,
                run_key,
                describe_holder(claim.took_over, store.stale_after_seconds),
            )
        if self.already_complete:
            logger.info(
                "%s %s is already complete (run %s): nothing to do", job, run_key, self.run.run_id
            )
        elif self.resumed:
            left = sum(c.pending for c in self.ledger.counts(self.run.run_id).values())
            logger.info(
                "resuming %s %s (run %s): %d items left", job, run_key, self.run.run_id, left
            )
        else:
            logger.info("starting %s %s (run %s)", job, run_key, self.run.run_id)

    def __enter__(self) -> JobRun:
        self._exit.callback(self.ledger.release, self.owner)
        if not self.already_complete:
            heartbeat = Heartbeat(
                self.ledger,
                self.run_id,
                self.owner,
                interval=max(0.5, min(30.0, self._stale_after / 4)),
                stop=self.stop,
                logger=self.logger,
            )
            heartbeat.start()
            self._exit.callback(heartbeat.close)
            if self._owns_signals:
                # The handler prints at once, to the terminal; the run's log hears it from
                # the announcer (a signal handler must not take the logging locks).
                self._exit.enter_context(
                    graceful_stop(self.stop, self.origin.resume_hint(self.resume_command))
                )
            announcer = _StopAnnouncer(self)
            announcer.start()
            self._exit.callback(announcer.close)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is not None and not isinstance(exc, RunFailed):
                self.fail(exc)
        finally:
            self._exit.close()
        if isinstance(exc, SQLAlchemyError):
            # Raised here so the flow ends with one explained line, not a driver traceback.
            with storage_errors(self.checkpoints.describe()):
                raise exc

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def already_complete(self) -> bool:
        return self.run.status is RunStatus.COMPLETED

    # --- stages -----------------------------------------------------------------------

    def stage(self, name: str, body: Callable[[], StageRun | None]) -> StageReport:
        """Run one stage, log it to sync_logs, and keep going unless the API key is dead."""
        log = StageLog(f"{self.job}.{name}")
        began = time.monotonic()
        report = StageReport(name, "success")
        fatal: FatalApiError | ConfigError | None = None
        self._passes = []
        try:
            ran = body()
            if ran is not None:
                report.rows_written, report.requests = ran.rows_written, ran.requests
                report.batches_reused = ran.batches_reused
                if ran.fatal:
                    fatal = FatalApiError(ran.fatal)
        except (FatalApiError, ConfigError) as exc:
            # Every later request or stage would fail the same way: stop the run.
            fatal = exc
            if isinstance(exc, FatalApiError):
                # The refusal is an answer, so its request went out; raised out of a task,
                # it left the client's count behind, and a refused run must not say
                # "0 API requests".
                report.requests += 1
        except (SyncError, SQLAlchemyError, OSError) as exc:
            report.status, report.error = "failed", _one_line(exc)
            self.logger.error("stage %s failed: %s", name, report.error)
            # What went out before the failure still went out.
            report.requests = sum(p.requests for p in self._passes)
            report.batches_reused = sum(p.batches_reused for p in self._passes)
            report.rows_written = sum(p.rows_written for p in self._passes)
        report.seconds = time.monotonic() - began
        report.counts = self._counts(name)
        if fatal is not None:
            report.status, report.error = "failed", redact(str(fatal))
            self.logger.error("stage %s stopped the run: %s", name, report.error)
        elif report.status == "success" and report.counts.pending:
            report.status = "partial"
        self.reports.append(report)
        self._write_log(log, report)
        self.page.stage_ended(
            name,
            report.counts,
            one_step=name not in self._mapped,
            stages=[r.to_dict() for r in self.reports],
            resumed=self.resumed,
        )
        if fatal is not None:
            raise fatal
        return report

    def map_stage(
        self,
        name: str,
        source: Source,
        *,
        items: Callable[[], Sequence[str]],
        batch_size: int,
        max_items: int | None = None,
        max_batches: int | None = None,
        only: frozenset[str] | None = None,
        shards: Shards | None = None,
    ) -> StageReport:
        """A stage that maps `source` over `items` (registered once per run) in batches.

        With `shards` (more than one), child runs of the shard deployment do the batches
        (engine.shards) and this process waits; the second pass over transient failures
        runs here, as it does for a run of one process.
        """

        def body() -> StageRun:
            universe = items()
            if not universe and not self.ledger.has_items(self.run_id, name):
                raise SyncError(f"no items to process for {name}")
            # Items already known (settled early, or by an earlier attempt) are kept as is.
            self.ledger.add_items(self.run_id, name, universe)
            self._mapped.add(name)
            self._fetching = fetches_in_flight(source.concurrency, batch_size)
            self.page.stage_started(name, self._counts(name))

            def one_pass(
                max_items: int | None, max_batches: int | None, only: frozenset[str] | None
            ) -> StageRun:
                self._passes.append(StageRun())
                return map_batches(
                    ledger=self.ledger,
                    data=self.data,
                    checkpoints=self.checkpoints,
                    run_id=self.run_id,
                    stage=name,
                    source=source,
                    batch_size=batch_size,
                    max_items=max_items,
                    stop=self.stop,
                    on_progress=self.progress,
                    max_batches=max_batches,
                    only=only,
                    into=self._passes[-1],
                )

            if shards is not None and shards.count > 1 and only is None:
                ran = self._sharded(name, shards, batch_size)
                again = self._transient_items(
                    ran, lambda: self.ledger.transient_failures(self.run_id, name)
                )
            else:
                ran = one_pass(max_items, max_batches, only)
                again = self._transient_items(ran, lambda: ran.transient)
            if again and self._cool_down(name, len(again)):
                ran = ran.merged(one_pass(None, None, frozenset(again)))
            return ran

        return self.stage(name, body)

    def _transient_items(self, ran: StageRun, items: Callable[[], Sequence[str]]) -> list[str]:
        """Items this pass left with a transient failure, if a second pass may run."""
        if self.retry_cooldown is None or ran.fatal or self.stop.requested:
            return []
        return list(items())

    def _sharded(self, name: str, shards: Shards, batch_size: int) -> StageRun:
        """The stage's batches done by child runs; progress from the ledger as they go."""
        start = self._counts(name)
        planned = start.untouched
        began = time.monotonic()
        batches_total = -(-planned // batch_size)
        shown = 0  # items settled by the children, as last shown

        def on_wait(counts: StageCounts) -> None:
            nonlocal shown
            processed = max(0, counts.settled - start.settled)
            if processed == shown:
                return
            shown = processed
            self.progress(
                Progress(
                    stage=name,
                    batches_done=min(batches_total, -(-processed // batch_size)),
                    batches_total=batches_total,
                    done=counts.done,
                    failed=counts.failed,
                    retrying=counts.retrying,
                    total=counts.total,
                    processed_now=processed,
                    planned_now=planned,
                    elapsed=time.monotonic() - began,
                )
            )

        self._passes.append(StageRun())
        ran = run_shards(
            shards,
            ledger=self.ledger,
            run_id=self.run_id,
            stage=name,
            stop=self.stop,
            logger=self.logger,
            on_wait=on_wait,
        )
        self._passes[-1] = ran
        return ran

    def _cool_down(self, stage: str, count: int) -> bool:
        """Wait before the second pass (an overloaded API often recovers in seconds); a
        stop request ends the wait and skips the pass. True if the pass should run."""
        cooldown = self.retry_cooldown or 0.0
        self.logger.info(
            "%s: %d items failed transiently; trying them once more in %.0fs",
            stage,
            count,
            cooldown,
        )
        deadline = time.monotonic() + cooldown
        while not self.stop.requested and time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        return not self.stop.requested

    def progress(self, progress: Progress) -> None:
        now = time.monotonic()
        if (
            progress.batches_done in (1, progress.batches_total)
            or now - self._last_progress_log >= PROGRESS_LOG_SECONDS
        ):
            self._last_progress_log = now
            self.logger.info(progress.line())
        self.page.progress(progress.stage, progress.done + progress.failed, progress.total)

    def publish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Show the summary and failed items on the run's page, and say in the run's log
        how it ended; returns the summary."""
        self._log_summary(summary)
        if self.already_complete:
            # The run that completed the date has the bar and the failed items already;
            # a rerun says what it found, in one API call, so a no-op rerun stays fast.
            self.page.already_complete(summary)
            return summary
        try:
            failures = self.ledger.failures(self.run_id, limit=FAILED_ROWS_SHOWN)
        except SQLAlchemyError:
            failures = []
        self.page.finished(summary, failures)
        return summary

    def _log_summary(self, summary: dict[str, Any]) -> None:
        level = {"completed": logging.INFO, "partial": logging.WARNING}.get(
            summary["status"], logging.ERROR
        )
        self.logger.log(level, summary_line(summary))

    def register_settled(self, stage: str, done: Sequence[str], failed: dict[str, str]) -> None:
        """Record a stage whose items were settled without fetching (e.g. validation)."""
        outcomes = [ItemOutcome.done(i) for i in done] + [
            ItemOutcome.failed(i, ErrorKind.PERMANENT, why) for i, why in failed.items()
        ]
        self.ledger.add_items(self.run_id, stage, [o.item for o in outcomes])
        with self.checkpoints.engine().begin() as conn:
            self.ledger.mark(conn, self.run_id, stage, outcomes)

    def register_universe(self, universe: Universe) -> None:
        """Record the run's tickers as the universe stage: rejected ones failed with their
        reason (logged), none at all a configuration error."""
        for symbol, why in universe.rejected.items():
            self.logger.warning("skipping %r: %s", symbol, why)
        if universe.duplicates:
            self.logger.info("ignored %d duplicate tickers", universe.duplicates)
        if not universe.tickers:
            raise ConfigError("the ticker list has no valid tickers")
        self.register_settled("universe", universe.tickers, universe.rejected)

    def items_done(self, stage: str) -> list[str]:
        return self.ledger.items(self.run_id, stage, ItemStatus.DONE)

    # --- ending -----------------------------------------------------------------------

    def finish(self, incomplete: str | None = None) -> dict[str, Any]:
        """Record the run's status; returns the summary, or raises RunFailed.

        `incomplete` says why work is left that the item ledger cannot see (a stream
        ended early): the run is then partial.
        """
        failed = [r for r in self.reports if r.status == "failed"]
        pending = sum(c.pending for c in self.ledger.counts(self.run_id).values())
        if failed:
            status = RunStatus.FAILED
        elif pending or self.stop.requested or incomplete:
            status = RunStatus.PARTIAL
        else:
            status = RunStatus.COMPLETED
        summary = self.summary(status)
        if incomplete:
            summary["incomplete"] = incomplete
        summary = self.publish(summary)
        if not self.ledger.heartbeat(self.run_id, self.owner):
            # Taken over as stale while we worked: the new holder owns the status now.
            self.logger.warning("%s %s belongs to another process now", self.job, self.run_key)
            return summary
        self.ledger.set_status(self.run_id, status, summary)
        retrying = sum(c.retrying for c in self.ledger.counts(self.run_id).values())
        if status is RunStatus.PARTIAL and retrying and not self.stop.requested:
            raise explained(
                RunIncomplete(
                    f"{self.job} {self.run_key} is partial: {retrying} items failed "
                    "transiently after their retries and a second pass; running it again "
                    "resumes them",
                    summary,
                )
            )
        if status is RunStatus.FAILED:
            names = ", ".join(f"{r.name} ({r.error})" for r in failed)
            raise explained(RunFailed(f"{self.job} {self.run_key} failed in {names}", summary))
        return summary

    def fail(self, exc: BaseException) -> None:
        """Record a run stopped by `exc` (fatal API error, interrupt, crash of the flow)."""
        try:
            summary = self.summary(RunStatus.FAILED)
            summary["error"] = _one_line(exc) if not isinstance(exc, SyncError) else str(exc)
            self.publish(summary)
            explained(exc)
            self.ledger.set_status(self.run_id, RunStatus.FAILED, summary)
        except SQLAlchemyError as db_exc:
            self.logger.warning("could not record the failed status: %s", _one_line(db_exc))

    def summary(self, status: RunStatus | None = None) -> dict[str, Any]:
        counts = self.ledger.counts(self.run_id)
        status = status or self.run.status
        return {
            "job": self.job,
            "run_key": self.run_key,
            "run_id": self.run_id,
            "status": status.value,
            "resumed": self.resumed,
            "already_complete": self.already_complete,
            "stages": [r.to_dict() for r in self.reports],
            "totals": {stage: {**asdict(c), "pending": c.pending} for stage, c in counts.items()},
            "requests": sum(r.requests for r in self.reports),
            "rows_written": sum(r.rows_written for r in self.reports),
            "seconds": round(time.monotonic() - self.started, 3),
            "failures": [
                asdict(f) for f in self.ledger.failures(self.run_id, limit=FAILURES_SHOWN)
            ],
            "failures_total": sum(c.failed + c.retrying for c in counts.values()),
            "batches_reused": sum(r.batches_reused for r in self.reports),
            "interrupted": self.stop.reason,
            "signal": self.stop.signum,
            "stopped_by": self.stopped_by(),
            "resume_hint": self.origin.resume_hint(self.resume_command, self._done_work(counts)),
        }

    @property
    def resume_hint(self) -> str:
        """What to do to continue this run, for where it came from (Retry, or a command)."""
        try:
            counts = self.ledger.counts(self.run_id)
        except SQLAlchemyError:
            counts = {}
        return self.origin.resume_hint(self.resume_command, self._done_work(counts))

    def _done_work(self, counts: dict[str, StageCounts]) -> int | None:
        """Items done in the stages that fetch them: what a retry will not fetch again."""
        if not self._mapped:
            return None
        return sum(c.done for stage, c in counts.items() if stage in self._mapped)

    def stopped_by(self) -> str | None:
        """What stopped the run early, in the words of the person who reads its log."""
        if not self.stop.requested:
            return None
        if self._stopped_by is None:
            self._stopped_by = self._stop_cause()
        return self._stopped_by

    def _stop_cause(self) -> str:
        signum = self.stop.signum
        if signum == signal.SIGINT:
            return "Ctrl+C (SIGINT)"
        if signum == signal.SIGTERM:
            if self.origin.from_deployment and _cancelling(self.origin):
                return "Cancel on this run's page (or `prefect flow-run cancel`)"
            return "SIGTERM (the worker or the machine is stopping this process)"
        return self.stop.reason or "a stop request"

    def _counts(self, stage: str) -> StageCounts:
        try:
            return self.ledger.counts(self.run_id).get(stage, StageCounts())
        except SQLAlchemyError:
            return StageCounts()

    def _write_log(self, log: StageLog, report: StageReport) -> None:
        try:
            log.write(
                self.data.engine(),
                status=report.status,
                rows_updated=report.rows_written,
                error_message=report.error,
                metadata={
                    "job": self.job,
                    "run_key": self.run_key,
                    "run_id": self.run_id,
                    "requests": report.requests,
                    **asdict(report.counts),
                },
            )
        except SQLAlchemyError as exc:
            self.logger.warning("could not write sync_logs for %s: %s", report.name, _one_line(exc))


def _one_line(exc: BaseException) -> str:
    text = redact(str(getattr(exc, "orig", None) or exc)).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


E = TypeVar("E", bound=BaseException)
_EXPLAINED = "_syncpoint_explained"


def explained(exc: E) -> E:
    """Mark `exc` as told in the run's log already (its summary line), so the flow does
    not log it a second time with a traceback (see flows.job_flow)."""
    setattr(exc, _EXPLAINED, True)
    return exc


def is_explained(exc: BaseException) -> bool:
    return bool(getattr(exc, _EXPLAINED, False))


def describe_holder(owner: str, stale_after: float) -> str:
    """A run's holder ("host:pid:token") as a person reads it: which process, and why it
    counts as gone (dead on this host, or silent for too long on another)."""
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return f"{owner}, which stopped sending heartbeats"
    host, pid, _token = parts
    if host == socket.gethostname():
        return f"process {pid} on this host ({host}), which is no longer alive"
    return (
        f"process {pid} on host {host}, which sent no heartbeat for over "
        f"{stale_after:.0f} s and is presumed dead"
    )


def _cancelling(origin: Origin) -> bool:
    """Whether the flow run is being cancelled: Prefect's worker sends SIGTERM for that."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    if origin.flow_run_id is None:
        return False
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(origin.flow_run_id).state
    except Exception:  # the API is only asked to word the message better
        return False
    return state is not None and state.type in (StateType.CANCELLING, StateType.CANCELLED)


class _StopAnnouncer:
    """Says in the run's own log, within a moment, that a signal is stopping the run.

    The signal handler itself only sets the flag and writes to the terminal: logging from
    a handler can deadlock on a lock the interrupted code holds. This thread watches the
    flag instead and logs through the run's logger, so a Cancel pressed in the Prefect UI
    is explained on the run's page, not only on the worker's stderr.
    """

    POLL_SECONDS = 0.1

    def __init__(self, run: JobRun) -> None:
        self._run = run
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="syncpoint-stop", daemon=True)

    def start(self) -> None:
        if not self._run.stop.requested:  # one already announced (an earlier entity's run)
            self._thread.start()

    def close(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        run = self._run
        while not self._done.wait(self.POLL_SECONDS):
            if not run.stop.requested:
                continue
            if run.stop.signum is None:
                return  # a lost claim: the heartbeat has said so already
            run.logger.warning(
                "%s: no new batch starts; the batches started (at most %d fetching) "
                "finish and are stored with those already fetched, then the run stops. "
                "Nothing done so far is lost. %s",
                run.stopped_by(),
                run._fetching,
                run.resume_hint,
            )
            return
