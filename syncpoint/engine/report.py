"""Plain-text rendering of run summaries and status for the terminal."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from syncpoint.core.errors import CheckpointError
from syncpoint.core.ledger import Ledger, Run, StageCounts


def summary_text(summary: dict[str, Any]) -> str:
    if "entities" in summary:
        return entities_text(summary)
    job, key = summary["job"], summary["run_key"]
    if summary.get("already_complete"):
        return (
            f"{job} {key} is already complete (run {summary['run_id']}): nothing to do, "
            f"0 API requests.\nStart it over with --fresh."
        )
    reused = summary.get("batches_reused", 0)
    lines = [
        f"{job} {key}: {summary['status'].upper()}"
        f"{' (resumed)' if summary.get('resumed') else ''} in {summary['seconds']:.1f}s, "
        f"{summary['requests']} API requests"
        f"{f', {batches(reused)} reused from the cache' if reused else ''}, "
        f"{summary['rows_written']} rows written (run {summary['run_id']})",
        "",
        f"  {'stage':<12}{'status':<9}{'done':>7}{'failed':>8}{'retry':>7}{'left':>7}"
        f"{'rows':>9}{'requests':>10}",
    ]
    for stage in summary["stages"]:
        c = stage["counts"]
        lines.append(
            f"  {stage['name']:<12}{stage['status']:<9}{c['done']:>7}{c['failed']:>8}"
            f"{c['retrying']:>7}{c['untouched']:>7}{stage['rows_written']:>9}"
            f"{stage['requests']:>10}"
        )
        if stage.get("error"):
            lines.append(f"    error: {stage['error']}")
    failures = summary.get("failures") or []
    if failures:
        lines += ["", f"Failed items ({summary['failures_total']}):"]
        lines += [
            f"  {f['stage']}/{shown(f['item'])}: {f['error_kind']}, {f['attempts']} run(s): "
            f"{f['error']}"
            for f in failures
        ]
        more = summary["failures_total"] - len(failures)
        if more > 0:
            lines.append(f"  ... and {more} more: syncpoint status {job} --key {key}")
    if summary["status"] == "partial":
        lines += ["", "More to do: run the same command again to continue."]
    elif summary["status"] == "failed":
        lines += ["", "The run failed; run the same command again to resume it."]
    return "\n".join(lines)


def summary_line(summary: dict[str, Any]) -> str:
    """A run's last line in its own log: what it did, how it ended, what to do next."""
    job, key, status = summary["job"], summary["run_key"], summary["status"]
    if summary.get("already_complete"):
        return (
            f"{job} {key} is already complete (run {summary['run_id']}): nothing to do, "
            "0 API requests"
        )
    stages = []
    for stage in summary.get("stages", []):
        c = stage["counts"]
        parts = [f"{c['done']} done"]
        parts += [
            f"{n} {what}"
            for n, what in (
                (c["failed"], "failed"),
                (c["retrying"], "to retry"),
                (c["untouched"], "left"),
            )
            if n
        ]
        stages.append(f"{stage['name']} {', '.join(parts)}")
    reused = summary.get("batches_reused", 0)
    text = (
        f"{job} {key} {status} in {summary['seconds']:.1f} s"
        f"{' (resumed)' if summary.get('resumed') else ''}: {'; '.join(stages) or 'no stage ran'}. "
        f"{summary['requests']} API requests"
        f"{f', {batches(reused)} reused from the cache' if reused else ''}, "
        f"{summary['rows_written']} rows written."
    )
    stage_errors = any(s.get("error") for s in summary.get("stages", []))
    if summary.get("error") and not stage_errors:
        text += f" {summary['error'].rstrip('.')}."
    if summary.get("stopped_by"):
        text += f" Stopped by {summary['stopped_by']}."
    if status != "completed" and summary.get("resume_hint"):
        text += f" {summary['resume_hint']}"
    return text


def batches(count: int) -> str:
    return f"{count} batch" if count == 1 else f"{count} batches"


def shown(item: str) -> str:
    """An item as it can be read on a terminal: invisible or odd characters escaped."""
    return item if item.isprintable() and item.isascii() else ascii(item)


def counts_cells(c: StageCounts) -> str:
    pct = 100.0 * c.settled / c.total if c.total else 100.0
    return (
        f"{c.settled}/{c.total} ({pct:.0f}%) done {c.done}, failed {c.failed}, "
        f"retry {c.retrying}, untouched {c.untouched}"
    )


def stage_counts(ledger: Ledger, run: Run) -> dict[str, StageCounts]:
    """Counts per stage in the job's stage order (stages not yet reached are absent)."""
    counts = ledger.counts(run.run_id)
    order = {stage: i for i, stage in enumerate(run.state.stages)}
    return dict(sorted(counts.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def run_status(ledger: Ledger, run: Run) -> dict[str, Any]:
    counts = stage_counts(ledger, run)
    return {
        "job": run.job,
        "run_key": run.run_key,
        "run_id": run.run_id,
        "status": run.status.value,
        "created_at": run.created_at.isoformat(),
        "updated_at": run.updated_at.isoformat(),
        "heartbeat_at": run.heartbeat_at.isoformat(),
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "stages": {
            stage: {
                "total": c.total,
                "done": c.done,
                "failed": c.failed,
                "retrying": c.retrying,
                "untouched": c.untouched,
            }
            for stage, c in counts.items()
        },
    }


def status_text(ledger: Ledger, runs: list[Run | CheckpointError], failures: int) -> str:
    if not runs:
        return "No runs recorded yet."
    lines = []
    for i, run in enumerate(runs):
        if isinstance(run, CheckpointError):
            lines.append(f"! {run}")
            continue
        lines.append(
            f"{run.job} {run.run_key}  {run.status.value:<9} run {run.run_id}  "
            f"updated {run.updated_at:%Y-%m-%d %H:%M:%S}Z"
        )
        for stage, c in stage_counts(ledger, run).items():
            lines.append(f"    {stage:<12} {counts_cells(c)}")
        if i == 0 and failures:
            listed = ledger.failures(run.run_id, limit=failures)
            if listed:
                lines.append("    failed items:")
                lines += [
                    f"      {f.stage}/{shown(f.item)}: {f.error_kind}, {f.attempts} run(s): "
                    f"{f.error}"
                    for f in listed
                ]
    return "\n".join(lines)


def batch_job_status(ledger: Ledger, run: Run, stage: str) -> dict[str, Any]:
    """A batch job's status as the fill-cache status JSON: progress, batches, message."""
    c = ledger.counts(run.run_id).get(stage, StageCounts())
    cached = ledger.settled_without_fetch(run.run_id, stage)
    batch_size = int(run.state.params.get("batch_size") or 5)
    successful, failed = c.done, c.failed + c.retrying
    processed = successful + failed
    total_batches = math.ceil(max(0, c.total - cached) / batch_size)
    completed = min(total_batches, ledger.last_batch_no(run.run_id, stage))
    if c.pending == 0:
        completed = total_batches
    remaining = total_batches - completed
    running = run.status.value == "running"
    end = run.finished_at if run.finished_at and not running else datetime.now(UTC)
    elapsed = max(0.0, (end - run.created_at).total_seconds())
    fetched = processed - cached
    eta = round(elapsed / fetched * c.pending) if fetched > 0 and c.pending else 0
    current = completed + 1 if running and remaining else completed
    if run.status.value == "completed":
        message = f"Completed: {successful} successful, {failed} failed."
    elif running:
        message = f"Processing batch {current} of {total_batches}. {remaining} batches remaining."
    elif run.status.value == "partial":
        message = (
            f"Stopped after batch {completed} of {total_batches}. {remaining} batches "
            "remaining: run it again to continue."
        )
    else:
        message = f"Failed after batch {completed} of {total_batches}: run it again to resume."
    return {
        "jobId": run.run_id,
        "runKey": run.run_key,
        "status": run.status.value,
        "progress": {
            "processed": processed,
            "total": c.total,
            "percentage": round(100.0 * processed / c.total, 1) if c.total else 100.0,
            "successful": successful,
            "failed": failed,
            "cached": cached,
            "elapsedTime": round(elapsed),
            "estimatedTimeRemaining": eta,
        },
        "batches": {
            "current": current,
            "total": total_batches,
            "completed": completed,
            "remaining": remaining,
        },
        "message": message,
    }


def entities_text(summary: dict[str, Any]) -> str:
    """A run over several checkpoints (one per entity)."""
    lines = [
        f"{summary['job']}: {summary['status'].upper()}, {summary['requests']} API requests, "
        f"{summary['rows_written']} records written",
        "",
    ]
    for e in summary["entities"]:
        if "stream" not in e:
            lines.append(f"  {e['entity']:<22}{e['status']:<10}{e.get('error') or ''}")
            continue
        s = e["stream"]
        note = f"  ({e['incomplete']})" if e.get("incomplete") else ""
        # The price of the overlapping windows, and what it caught.
        if s.get("overlap_until"):
            note += (
                f"; {s.get('overlap_records', 0)} re-read in the overlap, "
                f"{s.get('late_records', 0)} of them new"
            )
        lines.append(
            f"  {e['entity']:<22}{e['status']:<10}{e['recovery']:<19}"
            f"{s['records']:>7} records, {s['pages']} pages, {s['checkpoints']} checkpoints"
            f"{note}"
        )
    if summary["status"] != "completed":
        lines += ["", "Run it again to continue (--resume continues a stream from its cursor)."]
    return "\n".join(lines)


def stream_status(run: Run | CheckpointError) -> dict[str, Any]:
    if isinstance(run, CheckpointError):
        return {"error": str(run)}
    s = run.state.stream or {}
    return {
        "entity": run.run_key,
        "status": run.status.value,
        "run_id": run.run_id,
        "updated_at": run.updated_at.isoformat(),
        "window": f"{s.get('window_start') or 'ever'} .. {s.get('window_end')}",
        "cursor": s.get("cursor"),
        "finished": s.get("finished"),
        "records": s.get("records", 0),
        "total_records": s.get("total_records", 0),
        "newest": s.get("newest"),
        "watermark": s.get("watermark") or "the beginning",
        "loop_guard": s.get("guard"),
    }
