"""What a person sees on a flow run's page in the Prefect UI.

One artifact per concern per flow run, created once and then updated in place (the
Prefect API's artifact update), so the run's Artifacts tab holds exactly:
- `<job>-progress`: a bar over the run's real work, moved after every batch;
- `<job>-summary`: counts, duration, throughput, how the run stopped and what to do
  next; published when a stage ends and when the run ends, not on a timer;
- `<job>-failed-items`: the failed items with their reasons, only if something failed.
The keys are the same every night, so the Artifacts page lists each night as a version.

A retry is a new attempt of the same flow run, in a new process. It adopts the artifacts
the earlier attempt left on the run, so the page keeps one bar and one summary, and the
summary says which attempt it describes and that it replaces the earlier attempt's
figures: nothing on the page still says "running" about an attempt that crashed.

A flow run can hold several checkpoints (document-sync: one per entity): they share the
run's artifacts, the summary has a section per checkpoint and the bar averages them.

Artifacts are a view: if the Prefect API refuses one, the run goes on and says so once.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from syncpoint.core.ledger import ItemFailure, StageCounts
from syncpoint.core.redact import redact
from syncpoint.engine.origin import Origin
from syncpoint.engine.report import batches

Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]

PROGRESS, SUMMARY, FAILED_ITEMS = "progress", "summary", "failed-items"
# The bar moves by at least this many points, and at most once a second, per update: a
# 5,000-item stage in batches of 5 would otherwise make 1,000 API calls to move it by a
# hair each, every one of them on the loop that feeds the fetches. A stage's end always
# moves it.
MIN_BAR_STEP = 0.5
MIN_BAR_SECONDS = 1.0
_EPOCH = datetime.min.replace(tzinfo=UTC)


def artifact_key(*parts: str) -> str:
    """A key Prefect accepts: lowercase letters, digits and dashes."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


# --- how much of a run's work is done -----------------------------------------------------


@dataclass
class Work:
    """The share of one checkpoint's work that is done, weighted by real work.

    A stage that maps batches weighs as many items as it has; a one-step stage (resolving
    the ticker list: one request or a file) weighs one, so it no longer fills a third of
    the bar in its first second. A stage not started yet is assumed to have as many items
    as the largest stage known so far: a job's stages go over the same tickers.
    """

    stages: list[str]
    weight: dict[str, int] = field(default_factory=dict)
    settled: dict[str, int] = field(default_factory=dict)
    size_hint: int = 0

    def stage(self, name: str, settled: int, total: int, *, one_step: bool = False) -> None:
        self.size_hint = max(self.size_hint, total)
        if one_step:
            self.weight[name], self.settled[name] = 1, 1
        else:
            self.weight[name], self.settled[name] = total, min(settled, total)

    def fraction(self) -> float:
        total = done = 0
        for name in self.stages:
            if name in self.weight:
                total += self.weight[name]
                done += self.settled[name]
            else:
                total += self.size_hint
        return done / total if total else 0.0


# --- the artifacts of one flow run ---------------------------------------------------------


@dataclass
class _Section:
    markdown: str
    fraction: float = 0.0
    failed_rows: list[dict[str, Any]] = field(default_factory=list)


class FlowRunPage:
    """The artifacts of one flow run for one job, shared by its checkpoints' RunPages."""

    def __init__(self, job: str, origin: Origin, logger: Logger) -> None:
        self.job, self.origin, self.logger = job, origin, logger
        self.ids: dict[str, UUID] = {}
        self.sections: dict[str, _Section] = {}
        self.planned: list[str] = []
        self.previous_attempt: str | None = None  # what the attempt before this one left
        self._bar: float | None = None
        self._bar_at = 0.0  # time.monotonic() of the last bar update
        self._warned = False
        if origin.retried:
            self._call(self._adopt)

    def key(self, concern: str) -> str:
        return artifact_key(self.job, concern)

    # --- what the checkpoints report ------------------------------------------------------

    def plan(self, run_keys: Sequence[str]) -> None:
        """The checkpoints this flow run will go through (so the bar can count them all)."""
        self.planned = list(run_keys)

    def section(self, run_key: str, markdown: str) -> None:
        self.sections.setdefault(run_key, _Section(markdown)).markdown = markdown
        self._call(self._put_summary)

    def progress(self, run_key: str, fraction: float, *, force: bool = False) -> None:
        self.sections.setdefault(run_key, _Section("")).fraction = fraction
        percent = self.percent()
        due = self._bar is None or (
            abs(percent - self._bar) >= MIN_BAR_STEP
            and time.monotonic() - self._bar_at >= MIN_BAR_SECONDS
        )
        if force or due:
            self._call(self._put_progress, percent)

    def failed(self, run_key: str, rows: list[dict[str, Any]]) -> None:
        self.sections.setdefault(run_key, _Section("")).failed_rows = rows
        self._call(self._put_failed)

    def percent(self) -> float:
        keys = self.planned or list(self.sections)
        if not keys:
            return 0.0
        fractions = [self.sections[k].fraction if k in self.sections else 0.0 for k in keys]
        return round(100.0 * sum(fractions) / len(keys), 1)

    def summary_markdown(self) -> str:
        parts = [s.markdown for s in self.sections.values() if s.markdown]
        if self.origin.retried:
            note = f"Attempt {self.origin.attempt} of this flow run (a retry)"
            if self.previous_attempt:
                note += f"; attempt {self.origin.attempt - 1} ended {self.previous_attempt}"
            note = (
                f"_{note}. This summary replaces the earlier attempt's: the figures are this "
                "attempt's, counted from the checkpoint it resumed._"
            )
            # Right under the first title, where a person looks first.
            title, _, rest = (parts[0] if parts else "").partition("\n\n")
            parts[:1] = ["\n\n".join(p for p in (title, note, rest) if p)]
        return "\n\n".join(parts)

    # --- Prefect calls --------------------------------------------------------------------

    def _adopt(self) -> None:
        """A retry: take over the artifacts the earlier attempts left on this flow run."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterFlowRunId,
            ArtifactFilterKey,
        )

        flow_run_id = self.origin.flow_run_id
        assert flow_run_id is not None
        keys = {self.key(c): c for c in (PROGRESS, SUMMARY, FAILED_ITEMS)}
        with get_client(sync_client=True) as client:
            found = client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                    key=ArtifactFilterKey(any_=list(keys)),
                )
            )
            for artifact in sorted(found, key=lambda a: a.created or _EPOCH):
                if artifact.key in keys:
                    self.ids[keys[artifact.key]] = artifact.id  # the newest of each wins
            states = client.read_flow_run_states(flow_run_id)
        ended = [s for s in sorted(states, key=lambda s: s.timestamp) if s.is_final()]
        if ended:
            last = ended[-1]
            # Its first sentence: Prefect's crash message goes on about memory limits.
            said = _one_line(last.message or "").split(". ")[0].rstrip(".")
            self.previous_attempt = f"{last.name or last.type.value}{f' ({said})' if said else ''}"

    def _description(self, what: str) -> str:
        keys = ", ".join(self.sections) or self.job
        attempt = f" (attempt {self.origin.attempt})" if self.origin.retried else ""
        return f"{self.job} {keys}: {what}{attempt}"

    def _put_progress(self, percent: float) -> None:
        self._put(
            PROGRESS,
            "progress",
            percent,
            self._description("share of the run's work done, weighted by items per stage"),
        )
        self._bar, self._bar_at = percent, time.monotonic()

    def _put_summary(self) -> None:
        self._put(
            SUMMARY,
            "markdown",
            self.summary_markdown(),
            self._description("counts, duration and throughput; updated when a stage ends"),
        )

    def _put_failed(self) -> None:
        rows = [row for s in self.sections.values() for row in s.failed_rows]
        if rows:
            self._put(
                FAILED_ITEMS,
                "table",
                json.dumps(rows),
                self._description(f"{len(rows)} failed items, with their reasons"),
            )
        elif FAILED_ITEMS in self.ids:
            # An earlier attempt's failures were all fixed by this one: no stale table.
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                client.delete_artifact(self.ids.pop(FAILED_ITEMS))

    def _put(self, concern: str, kind: str, data: Any, description: str) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate

        with get_client(sync_client=True) as client:
            if concern in self.ids:
                client.update_artifact(
                    self.ids[concern], ArtifactUpdate(data=data, description=description)
                )
                return
            created = client.create_artifact(
                ArtifactCreate(
                    key=self.key(concern),
                    type=kind,
                    description=description,
                    data=data,
                    flow_run_id=self.origin.flow_run_id,
                )
            )
            self.ids[concern] = created.id

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # a view must never stop the sync
            if not self._warned:
                self._warned = True
                self.logger.warning("could not update the run page: %s", _one_line(str(exc)))


# One page per (flow run, job) in this process; a retry in a new process starts afresh.
_pages: dict[tuple[UUID, str], FlowRunPage] = {}
_pages_lock = threading.Lock()


def flow_run_page(job: str, origin: Origin, logger: Logger) -> FlowRunPage | None:
    """The current flow run's page for `job`; None outside a flow run (no artifacts)."""
    if origin.flow_run_id is None:
        return None
    with _pages_lock:
        key = (origin.flow_run_id, job)
        page = _pages.get(key)
        if page is None or page.origin.attempt != origin.attempt:
            page = _pages[key] = FlowRunPage(job, origin, logger)
        return page


def plan_checkpoints(job: str, run_keys: Sequence[str], logger: Logger) -> None:
    """Tell the current flow run's page which checkpoints it will go through."""
    page = flow_run_page(job, Origin.current(), logger)
    if page is not None:
        page.plan(run_keys)


# --- one checkpoint's view -----------------------------------------------------------------


class RunPage:
    """One checkpoint's (job, run key) part of its flow run's page."""

    def __init__(
        self,
        job: str,
        run_key: str,
        stages: Sequence[str],
        logger: Logger,
        origin: Origin | None = None,
    ) -> None:
        self.job, self.run_key, self.logger = job, run_key, logger
        self.origin = origin or Origin.current()
        self.page = flow_run_page(job, self.origin, logger)
        self.work = Work(list(stages))
        self.started_at = datetime.now(UTC)
        self._started = time.monotonic()
        if self.page is not None and self.origin.retried:
            # The retry's first word: the page stops showing the earlier attempt as current.
            self.page.section(run_key, self.running_markdown([], resumed=True))
            self.page.progress(run_key, self.work.fraction(), force=True)

    @property
    def enabled(self) -> bool:
        return self.page is not None

    # --- while it runs --------------------------------------------------------------------

    def stage_started(self, stage: str, counts: StageCounts) -> None:
        self.work.stage(stage, counts.settled, counts.total)
        if self.page is not None:
            self.page.progress(self.run_key, self.work.fraction())

    def progress(self, stage: str, settled: int, total: int) -> None:
        """After each batch: move the bar."""
        self.work.stage(stage, settled, total)
        if self.page is not None:
            self.page.progress(self.run_key, self.work.fraction())

    def stage_ended(
        self,
        stage: str,
        counts: StageCounts,
        *,
        one_step: bool,
        stages: Sequence[dict[str, Any]],
        resumed: bool,
    ) -> None:
        """A stage is over: the bar to its place, the summary to the stages so far."""
        self.work.stage(stage, counts.settled, counts.total, one_step=one_step)
        if self.page is not None:
            self.page.progress(self.run_key, self.work.fraction(), force=True)
            self.page.section(self.run_key, self.running_markdown(stages, resumed=resumed))

    def running_markdown(self, stages: Sequence[dict[str, Any]], *, resumed: bool) -> str:
        now = datetime.now(UTC)
        last = f", when stage {stages[-1]['name']} ended" if stages else ""
        lines = [
            f"# {self.job} {self.run_key}: running",
            "",
            f"Started {self.started_at:%H:%M:%S} UTC"
            f"{', resuming its checkpoint' if resumed else ''}. This summary was updated at "
            f"{now:%H:%M:%S} UTC{last}; the bar `{artifact_key(self.job, PROGRESS)}` moves "
            "after every batch and the run's log has a line per batch.",
        ]
        if stages:
            lines += ["", *stage_table(stages)]
        return "\n".join(lines)

    # --- the end --------------------------------------------------------------------------

    def finished(self, summary: dict[str, Any], failures: Sequence[ItemFailure]) -> None:
        """The final word: the bar, the summary, and the failed items if there are any."""
        if self.page is None:
            return
        done = 1.0 if summary["status"] == "completed" else self.work.fraction()
        self.page.progress(self.run_key, done, force=True)
        self.page.section(self.run_key, final_markdown(summary))
        self.page.failed(
            self.run_key,
            [
                {
                    "stage": f.stage,
                    "item": f.item,
                    "kind": f.error_kind,
                    "attempts": f.attempts,
                    "reason": f.error,
                }
                for f in failures
            ],
        )

    def already_complete(self, summary: dict[str, Any]) -> None:
        """A rerun of a completed run: the summary alone, saying nothing was done."""
        if self.page is not None:
            self.page.section(self.run_key, final_markdown(summary))


def stage_table(stages: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| stage | status | done | failed | to retry | left | rows | API requests "
        "| batches reused |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in stages:
        c = s["counts"]
        lines.append(
            f"| {s['name']} | {s['status']} | {c['done']} | {c['failed']} | {c['retrying']} "
            f"| {c['untouched']} | {s['rows_written']} | {s['requests']} "
            f"| {s.get('batches_reused', 0)} |"
        )
    return lines


def final_markdown(summary: dict[str, Any]) -> str:
    seconds = float(summary.get("seconds") or 0.0)
    stages = summary.get("stages", [])
    settled_now = sum(s["counts"]["done"] + s["counts"]["failed"] for s in stages)
    reused = summary.get("batches_reused", 0)
    lines = [
        f"# {summary['job']} {summary['run_key']}: {summary['status']}",
        "",
        f"Run `{summary['run_id']}`{' (resumed)' if summary.get('resumed') else ''} · "
        f"{_duration(seconds)} · {summary['requests']} API requests"
        f"{f' · {batches(reused)} reused from the cache' if reused else ''} · "
        f"{summary['rows_written']} rows written",
    ]
    if stages:
        lines += ["", *stage_table(stages)]
    if summary.get("already_complete"):
        lines += [
            "",
            f"Already complete: run `{summary['run_id']}` finished {summary['run_key']} "
            "before, so this one did nothing. Start it over with the `fresh` parameter "
            "(`--fresh` on the command line).",
        ]
        return "\n".join(lines)
    rate = settled_now / seconds if seconds > 0 else 0.0
    lines += ["", f"Throughput: {rate:.1f} items/s settled (all stages)."]
    errors = [f"- **{s['name']}**: {s['error']}" for s in stages if s["error"]]
    if summary.get("error") and not errors:
        errors.append(f"- {summary['error']}")
    if errors:
        lines += ["", "## Errors", "", *errors]
    if summary.get("failures_total"):
        lines += [
            "",
            f"{summary['failures_total']} failed items: see "
            f"`{artifact_key(summary['job'], FAILED_ITEMS)}`.",
        ]
    if summary.get("stopped_by"):
        lines += ["", f"Stopped by {summary['stopped_by']}. {summary.get('resume_hint', '')}"]
    elif summary["status"] in ("partial", "failed"):
        lines += ["", summary.get("resume_hint") or "Run it again: it resumes from its checkpoint."]
    return "\n".join(lines)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def _one_line(text: str) -> str:
    lines = redact(text).strip().splitlines()
    return lines[0] if lines else ""
