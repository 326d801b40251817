"""One invocation of a job on a run: open the checkpoint, run stages, record status.

Flows stay a table of contents; this is where a stage's failure is caught, logged to
sync_logs and turned into the run's status (a failed stage does not stop the next one,
a rejected API key stops everything).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any

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
from syncpoint.engine.batch_map import Progress, StageRun, map_batches
from syncpoint.engine.run_page import RunPage
from syncpoint.sources.source import Source

FAILURES_SHOWN = 20
FAILED_ROWS_SHOWN = 200  # on the run page


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
    requests: int = 0
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
        resume_hint: str,
        reopen: bool = False,
        stop: StopFlag | None = None,
        retry_cooldown: float | None = None,
    ) -> None:
        self.job, self.run_key, self.data, self.logger = job, run_key, data, logger
        # Seconds before a stage's transient failures get their second pass; None: no pass.
        self.retry_cooldown = retry_cooldown
        self.resume_hint = resume_hint
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
        self.page = RunPage(job, run_key, stages, logger)
        self.reports: list[StageReport] = []
        self.started = time.monotonic()
        self._exit = ExitStack()
        if claim.took_over:
            logger.warning("took over %s %s, left running by %s", job, run_key, claim.took_over)
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
                self._exit.enter_context(graceful_stop(self.stop, self.resume_hint))
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
        try:
            ran = body()
            if ran is not None:
                report.rows_written, report.requests = ran.rows_written, ran.requests
                if ran.fatal:
                    fatal = FatalApiError(ran.fatal)
        except (FatalApiError, ConfigError) as exc:
            # Every later request or stage would fail the same way: stop the run.
            fatal = exc
        except (SyncError, SQLAlchemyError, OSError) as exc:
            report.status, report.error = "failed", _one_line(exc)
            self.logger.error("stage %s failed: %s", name, report.error)
        report.seconds = time.monotonic() - began
        report.counts = self._counts(name)
        if fatal is not None:
            report.status, report.error = "failed", redact(str(fatal))
            self.logger.error("stage %s stopped the run: %s", name, report.error)
        elif report.status == "success" and report.counts.pending:
            report.status = "partial"
        self.reports.append(report)
        self._write_log(log, report)
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
    ) -> StageReport:
        """A stage that maps `source` over `items` (registered once per run) in batches."""

        def body() -> StageRun:
            universe = items()
            if not universe and not self.ledger.has_items(self.run_id, name):
                raise SyncError(f"no items to process for {name}")
            # Items already known (settled early, or by an earlier attempt) are kept as is.
            self.ledger.add_items(self.run_id, name, universe)

            def one_pass(
                max_items: int | None, max_batches: int | None, only: frozenset[str] | None
            ) -> StageRun:
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
                )

            ran = one_pass(max_items, max_batches, only)
            again = self._transient_items(ran)
            if again and self._cool_down(name, len(again)):
                ran = ran.merged(one_pass(None, None, frozenset(again)))
            return ran

        return self.stage(name, body)

    def _transient_items(self, ran: StageRun) -> list[str]:
        """Items this pass left with a transient failure, if a second pass may run."""
        if self.retry_cooldown is None or ran.fatal or self.stop.requested:
            return []
        return [o.item for o in ran.outcomes if o.error_kind is ErrorKind.TRANSIENT]

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
        self.logger.info(progress.line())
        self.page.progress(
            progress.stage,
            progress.done + progress.failed,
            progress.total,
            progress.rate,
            progress.eta_seconds,
        )

    def publish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Show the summary and failed items on the run's page; returns the summary."""
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

    def register_settled(self, stage: str, done: Sequence[str], failed: dict[str, str]) -> None:
        """Record a stage whose items were settled without fetching (e.g. validation)."""
        outcomes = [ItemOutcome.done(i) for i in done] + [
            ItemOutcome.failed(i, ErrorKind.PERMANENT, why) for i, why in failed.items()
        ]
        self.ledger.add_items(self.run_id, stage, [o.item for o in outcomes])
        with self.checkpoints.engine().begin() as conn:
            self.ledger.mark(conn, self.run_id, stage, outcomes)

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
            raise RunIncomplete(
                f"{self.job} {self.run_key} is partial: {retrying} items failed transiently "
                "after their retries and a second pass; running it again resumes them",
                summary,
            )
        if status is RunStatus.FAILED:
            names = ", ".join(f"{r.name} ({r.error})" for r in failed)
            raise RunFailed(f"{self.job} {self.run_key} failed in {names}", summary)
        return summary

    def fail(self, exc: BaseException) -> None:
        """Record a run stopped by `exc` (fatal API error, interrupt, crash of the flow)."""
        try:
            summary = self.summary(RunStatus.FAILED)
            summary["error"] = _one_line(exc)
            self.publish(summary)
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
            "interrupted": self.stop.reason,
            "signal": self.stop.signum,
            "resume_hint": self.resume_hint,
        }

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
