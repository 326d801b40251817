"""What a user sees on a flow run's page in the Prefect UI.

Three artifacts, keyed per job so each night's run adds a new version under the same
key (Prefect's rule: lowercase letters, digits and dashes); a rerun of a completed run
publishes the summary alone:
- `<job>-progress`: a progress bar over the whole run, updated after every batch;
- `<job>-summary`: markdown with counts, duration, throughput and, while running, the
  estimated time left; refreshed at most every few seconds and at the end;
- `<job>-failed-items`: a table of failed items with their reasons, at the end.

Artifacts are a view: if the Prefect API refuses one, the run goes on and says so once.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from syncpoint.core.ledger import ItemFailure
from syncpoint.core.redact import redact

SUMMARY_EVERY_SECONDS = 5.0


def artifact_key(*parts: str) -> str:
    """A key Prefect accepts: lowercase letters, digits and dashes."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


class RunPage:
    def __init__(
        self,
        job: str,
        run_key: str,
        stages: Sequence[str],
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self.job, self.run_key, self.stages, self.logger = job, run_key, list(stages), logger
        self.enabled = _in_flow_run()
        self._progress_id: UUID | None = None
        self._last_summary = 0.0
        self._warned = False
        self._started = time.monotonic()

    # --- progress -------------------------------------------------------------------------

    def progress(
        self, stage: str, settled: int, total: int, rate: float, eta: float | None
    ) -> None:
        """After each batch: move the bar; refresh the summary now and then."""
        percent = self.overall_percent(stage, settled, total)
        self._call(self._set_progress, percent)
        if time.monotonic() - self._last_summary >= SUMMARY_EVERY_SECONDS:
            self._last_summary = time.monotonic()
            self._call(self._markdown, self.running_markdown(stage, settled, total, rate, eta))

    def overall_percent(self, stage: str, settled: int, total: int) -> float:
        """Each stage an equal share of the bar; within a stage, its settled items."""
        index = self.stages.index(stage) if stage in self.stages else 0
        fraction = settled / total if total else 1.0
        return round(100.0 * (index + fraction) / max(1, len(self.stages)), 2)

    def running_markdown(
        self, stage: str, settled: int, total: int, rate: float, eta: float | None
    ) -> str:
        elapsed = time.monotonic() - self._started
        left = f"~{_duration(eta)}" if eta is not None else "unknown"
        return "\n".join(
            [
                f"# {self.job} {self.run_key}: running",
                "",
                f"**{stage}**: {settled} of {total} items settled "
                f"({100.0 * settled / total if total else 100.0:.1f}%)",
                "",
                "| elapsed | throughput | estimated time left |",
                "| --- | --- | --- |",
                f"| {_duration(elapsed)} | {rate:.1f} items/s | {left} |",
            ]
        )

    # --- the end --------------------------------------------------------------------------

    def finished(self, summary: dict[str, Any], failures: Sequence[ItemFailure]) -> None:
        """The final word: the bar at 100% if done, the summary, the failed items."""
        if summary["status"] == "completed":
            self._call(self._set_progress, 100.0)
        self._call(self._markdown, final_markdown(summary))
        rows = [
            {
                "stage": f.stage,
                "item": f.item,
                "kind": f.error_kind,
                "attempts": f.attempts,
                "reason": f.error,
            }
            for f in failures
        ]
        self._call(self._failed_table, rows)

    def already_complete(self, summary: dict[str, Any]) -> None:
        """A rerun of a completed run: the summary alone, saying nothing was done."""
        self._call(self._markdown, final_markdown(summary))

    # --- Prefect calls --------------------------------------------------------------------

    def _set_progress(self, percent: float) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        if self._progress_id is None:
            # Prefect types the sync call as "UUID or coroutine"; in a sync context it is a UUID.
            self._progress_id = create_progress_artifact(  # type: ignore[assignment]
                progress=percent,
                key=artifact_key(self.job, "progress"),
                description=f"{self.job} {self.run_key}: share of items settled, all stages",
            )
        else:
            update_progress_artifact(self._progress_id, percent)

    def _markdown(self, text: str) -> None:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(
            markdown=text,
            key=artifact_key(self.job, "summary"),
            description=f"{self.job} {self.run_key}: counts, duration, throughput",
        )

    def _failed_table(self, rows: list[dict[str, Any]]) -> None:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(
            table=rows
            or [{"stage": "", "item": "", "kind": "", "attempts": 0, "reason": "no failed items"}],
            key=artifact_key(self.job, "failed-items"),
            description=f"{self.job} {self.run_key}: items that failed, with reasons",
        )

    def _call(self, fn: Any, *args: Any) -> None:
        if not self.enabled:
            return
        try:
            fn(*args)
        except Exception as exc:  # a view must never stop the sync
            if not self._warned:
                self._warned = True
                self.logger.warning("could not update the run page: %s", redact(str(exc)))


def final_markdown(summary: dict[str, Any]) -> str:
    seconds = float(summary.get("seconds") or 0.0)
    settled_now = sum(
        s["counts"]["done"] + s["counts"]["failed"] for s in summary.get("stages", [])
    )
    lines = [
        f"# {summary['job']} {summary['run_key']}: {summary['status']}",
        "",
        f"Run `{summary['run_id']}`{' (resumed)' if summary.get('resumed') else ''} · "
        f"{_duration(seconds)} · {summary['requests']} API requests · "
        f"{summary['rows_written']} rows written",
        "",
        "| stage | status | done | failed | to retry | left | rows | requests |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summary.get("stages", []):
        c = s["counts"]
        lines.append(
            f"| {s['name']} | {s['status']} | {c['done']} | {c['failed']} | {c['retrying']} "
            f"| {c['untouched']} | {s['rows_written']} | {s['requests']} |"
        )
    if summary.get("already_complete"):
        lines += [
            "",
            f"Already complete: run `{summary['run_id']}` finished this {summary['run_key']} "
            "before, so this one did nothing. Start it over with `--fresh`.",
        ]
        return "\n".join(lines)
    rate = settled_now / seconds if seconds > 0 else 0.0
    lines += ["", f"Throughput: {rate:.1f} items/s settled (all stages)."]
    errors = [f"- **{s['name']}**: {s['error']}" for s in summary.get("stages", []) if s["error"]]
    if errors:
        lines += ["", "## Errors", "", *errors]
    if summary.get("failures_total"):
        lines += [
            "",
            f"{summary['failures_total']} failed items: see `{summary['job']}-failed-items`.",
        ]
    if summary.get("interrupted"):
        lines += ["", f"Stopped: {summary['interrupted']}. {summary.get('resume_hint', '')}"]
    elif summary["status"] in ("partial", "failed"):
        lines += ["", "Retry this flow run, or run it again: it resumes from its checkpoint."]
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


def _in_flow_run() -> bool:
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None
