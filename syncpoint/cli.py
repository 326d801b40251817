"""The `syncpoint` command: run jobs, show status, manage checkpoints, serve the built-in API.

Exit codes: 0 completed, 3 partial (run again to continue), 1 failed, 2 usage or
configuration error, 130/143 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from syncpoint.core.errors import CheckpointError, ConfigError, SyncError
from syncpoint.core.interrupts import exit_code

if TYPE_CHECKING:
    from syncpoint.core.db import Database

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3
EXIT_BY_STATUS = {"completed": EXIT_OK, "partial": EXIT_PARTIAL, "failed": EXIT_FAILED}
JOBS = ("daily-sync", "fill-cache", "document-sync")
# Jobs with the batch-job status (progress and batches of one stage): that stage.
BATCH_JOBS = {"fill-cache": "history"}
# Jobs with one cursor checkpoint per run key (entity).
STREAM_JOBS = ("document-sync",)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        # Ctrl+C before a run started (or outside one): nothing to flush.
        print("syncpoint: interrupted", file=sys.stderr)
        return exit_code(signal.SIGINT)
    except ConfigError as exc:
        print(f"syncpoint: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SyncError as exc:
        print(f"syncpoint: {exc}", file=sys.stderr)
        return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="syncpoint",
        description="Checkpointed, resumable nightly syncs from HTTP APIs into SQL, on Prefect.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a job as a Prefect flow run (resumes an unfinished run)")
    jobs = run.add_subparsers(dest="job", required=True)
    daily = jobs.add_parser("daily-sync", help="tickers -> prices -> DCF valuations")
    daily.add_argument("--date", help="run date YYYY-MM-DD (default: today, UTC)")
    source = daily.add_mutually_exclusive_group()
    source.add_argument("--tickers-file", help="one ticker per line, or CSV with symbol/ticker")
    source.add_argument("--ticker-source", choices=["sp500"], default="sp500")
    daily.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="tickers per batch (default: SYNC_BATCH_SIZE, else 50)",
    )
    daily.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="requests in flight at once (default: SYNC_CONCURRENCY, else 16)",
    )
    daily.add_argument(
        "--max-items",
        type=int,
        default=None,
        help="process at most N tickers per stage, then stop as partial",
    )
    _shards_option(daily)
    daily.add_argument("--fresh", action="store_true", help="discard this date's checkpoint")
    daily.add_argument("--json", action="store_true", help="print the summary as JSON")
    _builtin_api_option(daily)
    daily.set_defaults(handler=cmd_run_daily_sync)

    fill = jobs.add_parser("fill-cache", help="backfill price history in resumable batches")
    fill.add_argument("--ticker-source", choices=["sp500", "all", "custom"], default="sp500")
    fill.add_argument("--tickers", help="comma-separated tickers (with --ticker-source custom)")
    fill.add_argument("--batch-size", type=int, default=None, help="tickers per batch (default 5)")
    fill.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="requests in flight at once (default: SYNC_CONCURRENCY, else 16)",
    )
    fill.add_argument("--start", help="first day YYYY-MM-DD (default: five years before --end)")
    fill.add_argument("--end", help="last day YYYY-MM-DD (default: yesterday, UTC)")
    fill.add_argument(
        "--max-batches", type=int, default=None, help="stop after N batches as partial"
    )
    fill.add_argument(
        "--retry-failed", action="store_true", help="reprocess only the tickers that failed"
    )
    _shards_option(fill)
    fill.add_argument("--json", action="store_true", help="print the summary as JSON")
    _builtin_api_option(fill)
    fill.set_defaults(handler=cmd_run_fill_cache)

    docs = jobs.add_parser("document-sync", help="incremental cursor sync of DIP documents")
    which = docs.add_mutually_exclusive_group(required=True)
    which.add_argument("--entity", help="one entity, e.g. drucksache")
    which.add_argument("--all", action="store_true", help="every entity, each on its own")
    how = docs.add_mutually_exclusive_group()
    how.add_argument(
        "--resume", action="store_true", help="continue an interrupted stream from its cursor"
    )
    how.add_argument(
        "--resume-all", action="store_true", help="with --all: resume every interrupted stream"
    )
    docs.add_argument("--end", help="only records updated up to this day (default: now)")
    docs.add_argument("--since", help="only records updated from this day (default: last sync)")
    docs.add_argument("--json", action="store_true", help="print the summary as JSON")
    _builtin_api_option(docs)
    docs.set_defaults(handler=cmd_run_document_sync)

    status = sub.add_parser("status", help="latest runs, progress and failed items")
    status.add_argument("job", nargs="?", choices=JOBS)
    status.add_argument("--key", "--date", dest="key", help="one run key (date)")
    status.add_argument("--limit", type=int, default=5, help="how many runs (default 5)")
    status.add_argument("--failures", type=int, default=20, help="failed items to list")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_status)

    ckpt = sub.add_parser("checkpoints", help="list, show or reset checkpoints")
    ckpt_sub = ckpt.add_subparsers(dest="action", required=True)
    lst = ckpt_sub.add_parser("list", help="all checkpoints, newest first")
    lst.add_argument("job", nargs="?")
    lst.set_defaults(handler=cmd_checkpoints_list)
    for name, handler, text in (
        ("show", cmd_checkpoints_show, "one checkpoint in full"),
        ("reset", cmd_checkpoints_reset, "delete a checkpoint: the next run starts over"),
    ):
        p = ckpt_sub.add_parser(name, help=text)
        p.add_argument("job")
        p.add_argument("--key", "--date", dest="key", help="run key (date)")
        if name == "reset":
            p.add_argument("--all", action="store_true", help="every run key of the job")
        p.set_defaults(handler=handler)

    dbp = sub.add_parser("db", help="syncpoint's database schema")
    db_sub = dbp.add_subparsers(dest="action", required=True)
    up = db_sub.add_parser(
        "upgrade", help="migrate syncpoint's tables to this version (back the database up first)"
    )
    up.set_defaults(handler=cmd_db_upgrade)

    sim = sub.add_parser("simulate", help="serve the built-in market API on loopback")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8765)
    sim.add_argument("--latency-ms", type=float, default=0.0)
    sim.add_argument("--error-rate", type=float, default=0.0, help="fraction answered 5xx")
    sim.add_argument(
        "--rate-limit-error-rate", type=float, default=0.0, help="fraction answered 429"
    )
    sim.add_argument("--rate-limit", type=int, default=None, help="enforced requests/minute")
    sim.add_argument("--api-key", default=None, help="require this key (default: any)")
    sim.set_defaults(handler=cmd_simulate)
    return parser


def _shards_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shards",
        type=int,
        default=None,
        help="spread the batches over N workers of a Prefect server (PREFECT_API_URL) "
        "with the shard deployment; needs PostgreSQL (README: Sharded runs)",
    )


def _check_shards(shards: int | None) -> None:
    """Several workers are child runs of a deployment: a server must be there to run them."""
    from prefect.settings import get_current_settings

    if shards is not None and shards > 1 and not get_current_settings().api.url:
        raise ConfigError(
            "--shards above 1 runs the batches on the workers of a Prefect server: set "
            "PREFECT_API_URL to it (README: Sharded runs)"
        )


def _builtin_api_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--builtin-api",
        action="store_true",
        help="read the built-in simulator on loopback instead of a configured API "
        "(demos and tests; made-up data)",
    )


# --- run ------------------------------------------------------------------------------


def cmd_run_daily_sync(args: argparse.Namespace) -> int:
    from syncpoint import settings

    day = settings.run_date(args.date)
    settings.positive("--max-items", args.max_items)
    tickers_file = None
    if args.tickers_file:
        from syncpoint.sources.universe import allow_file, tickers_from_file

        # The user named this file on their own machine: the flow run this process starts
        # may read it (a deployment run may read only SYNCPOINT_TICKERS_DIR's files).
        tickers_file = str(allow_file(args.tickers_file))
        tickers_from_file(tickers_file)  # an unusable file is a usage error, now
    parameters = {
        "batch_size": args.batch_size,
        "concurrency": args.concurrency,
        "builtin_api": args.builtin_api or None,
        "shards": args.shards,
    }
    # The flow resolves the same parameters the same way; this answers before Prefect starts.
    config = settings.resolve_daily_sync(**parameters)
    _check_shards(args.shards)
    return _run_flow(
        "syncpoint.flows.daily_sync:daily_sync",
        {
            **parameters,
            "run_date": day.isoformat(),
            "tickers_file": tickers_file,
            "ticker_source": args.ticker_source,
            "max_items": args.max_items,
            "fresh": args.fresh,
        },
        args.json,
        config.data,
    )


def cmd_run_fill_cache(args: argparse.Namespace) -> int:
    from syncpoint import settings

    first, last = settings.history_range(args.start, args.end)
    settings.positive("--max-batches", args.max_batches)
    tickers = [t for t in (args.tickers or "").split(",") if t.strip()]
    if args.ticker_source == "custom" and not tickers:
        raise ConfigError("--ticker-source custom needs --tickers A,B,...")
    if tickers and args.ticker_source != "custom":
        raise ConfigError("--tickers goes with --ticker-source custom")
    parameters = {
        "batch_size": args.batch_size,
        "concurrency": args.concurrency,
        "builtin_api": args.builtin_api or None,
        "shards": args.shards,
    }
    config = settings.resolve_fill_cache(**parameters)
    _check_shards(args.shards)
    return _run_flow(
        "syncpoint.flows.fill_cache:fill_cache",
        {
            **parameters,
            "ticker_source": args.ticker_source,
            "tickers": tickers or None,
            "start": first.isoformat(),
            "end": last.isoformat(),
            "max_batches": args.max_batches,
            "retry_failed": args.retry_failed,
        },
        args.json,
        config.data,
    )


def cmd_run_document_sync(args: argparse.Namespace) -> int:
    from syncpoint import settings

    if args.resume_all and not args.all:
        raise ConfigError("--resume-all goes with --all (use --resume with --entity)")
    if args.resume and args.all:
        raise ConfigError("use --resume-all with --all")
    for value in (args.end, args.since):
        if value:
            settings.run_date(value)
    config = settings.resolve_document_sync(builtin_api=args.builtin_api or None)
    return _run_flow(
        "syncpoint.flows.document_sync:document_sync",
        {
            "entity": args.entity,
            "all_entities": args.all,
            "resume": args.resume or args.resume_all,
            "end": args.end,
            "since": args.since,
            "builtin_api": args.builtin_api or None,
        },
        args.json,
        config.data,
    )


def _run_flow(entrypoint: str, parameters: dict[str, Any], as_json: bool, data: Database) -> int:
    """Check the database, then run the flow in this process and report it."""
    import importlib

    _quiet_prefect()
    data.engine()  # a bad or unwritable database fails here, in a line
    module, name = entrypoint.split(":")
    flow = getattr(importlib.import_module(module), name)
    _tame_logs()
    _start_ephemeral_prefect()
    # No automatic flow retries here: the exit code answers now; rerunning resumes.
    state = flow.with_options(retries=0)(**parameters, return_state=True)
    return _report(state, as_json)


def _report(state: Any, as_json: bool) -> int:
    from syncpoint.engine.job_run import RunFailed, RunIncomplete

    if state.is_completed():
        summary = state.result()
        code = EXIT_BY_STATUS.get(summary["status"], EXIT_OK)
    else:
        exc = state.result(raise_on_failure=False)
        if isinstance(exc, RunIncomplete):
            # Failed for Prefect (so a deployment's retries resume it), partial for a shell.
            summary, code = exc.summary, EXIT_PARTIAL
        elif isinstance(exc, RunFailed):
            summary, code = exc.summary, EXIT_FAILED
        elif isinstance(exc, SyncError):
            raise exc  # explained in one line by main()
        elif isinstance(exc, BaseException):
            print(f"syncpoint: run failed: {_one_line(exc)}", file=sys.stderr)
            return EXIT_FAILED
        else:
            print(f"syncpoint: run ended {state.type.value}: {state.message}", file=sys.stderr)
            return EXIT_FAILED
    print(json.dumps(summary, indent=2, default=str) if as_json else _summary_text(summary))
    if summary.get("signal"):
        print(f"syncpoint: {summary['interrupted']}. {summary['resume_hint']}", file=sys.stderr)
        return exit_code(int(summary["signal"]))
    return code


def _summary_text(summary: dict[str, Any]) -> str:
    from syncpoint.engine.report import summary_text

    return summary_text(summary)


# --- status and checkpoints -------------------------------------------------------------


def _ledger() -> Any:
    from syncpoint import settings
    from syncpoint.core.ledger import Ledger

    # From the environment alone, no block: this keeps Prefect out of `syncpoint status`.
    return Ledger(settings.checkpoint_database(settings.database()).engine())


def cmd_status(args: argparse.Namespace) -> int:
    from syncpoint.engine.report import run_status, status_text

    ledger = _ledger()
    if args.key and args.job:
        run = ledger.latest(args.job, args.key)
        runs: list[Any] = [run] if run else []
    else:
        runs = ledger.runs(args.job, limit=args.limit)
    if args.job in BATCH_JOBS:
        return _batch_job_status(ledger, runs, args)
    if args.job in STREAM_JOBS:
        return _stream_status(ledger, args)
    if args.json:
        out: list[dict[str, Any]] = [
            {"error": str(r)} if isinstance(r, CheckpointError) else run_status(ledger, r)
            for r in runs
        ]
        if runs and not isinstance(runs[0], CheckpointError):
            out[0]["failures"] = [
                vars(f) for f in ledger.failures(runs[0].run_id, limit=args.failures)
            ]
        print(json.dumps(out, indent=2, default=str))
    else:
        print(status_text(ledger, runs, args.failures))
    return EXIT_OK


def _batch_job_status(ledger: Any, runs: list[Any], args: argparse.Namespace) -> int:
    """The batch-job status: progress and batches of the latest run, or of --key."""
    from syncpoint.engine.report import batch_job_status, status_text

    if not runs:
        print("{}" if args.json else f"No {args.job} runs recorded yet.")
        return EXIT_OK
    if isinstance(runs[0], CheckpointError):
        raise runs[0]
    status = batch_job_status(ledger, runs[0], BATCH_JOBS[args.job])
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    print(status_text(ledger, runs[:1], args.failures))
    p, b = status["progress"], status["batches"]
    print(
        f"    progress     {p['processed']}/{p['total']} ({p['percentage']}%), "
        f"{p['successful']} successful, {p['failed']} failed, {p['cached']} already cached; "
        f"elapsed {p['elapsedTime']}s, ~{p['estimatedTimeRemaining']}s left"
    )
    print(f"    batches      {b['completed']}/{b['total']} completed, {b['remaining']} remaining")
    print(f"    {status['message']}")
    return EXIT_OK


def _stream_status(ledger: Any, args: argparse.Namespace) -> int:
    """Each entity's checkpoint: status, window, cursor, records, watermark."""
    from syncpoint.engine.report import stream_status

    rows = [stream_status(r) for r in ledger.runs(args.job, limit=1000)]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return EXIT_OK
    if not rows:
        print(f"No {args.job} checkpoints yet.")
    for row in sorted(rows, key=lambda r: str(r.get("entity"))):
        if "error" in row:
            print(f"! {row['error']}")
            continue
        print(
            f"{row['entity']:<22}{row['status']:<10}{row['records']:>7} records this window, "
            f"{row['total_records']:>7} in all; updated {row['window']}; "
            f"{'cursor saved' if row['cursor'] else 'no cursor'}; next from {row['watermark']}"
        )
    return EXIT_OK


def cmd_checkpoints_list(args: argparse.Namespace) -> int:
    from syncpoint.engine.report import status_text

    ledger = _ledger()
    print(status_text(ledger, ledger.runs(args.job, limit=1000), failures=0))
    return EXIT_OK


def cmd_checkpoints_show(args: argparse.Namespace) -> int:
    from syncpoint.engine.report import run_status

    ledger = _ledger()
    if not args.key:
        raise ConfigError("give the run key: --key (or --date) YYYY-MM-DD")
    run = ledger.latest(args.job, args.key)
    if run is None:
        print(f"no checkpoint for {args.job} {args.key}")
        return EXIT_FAILED
    out = run_status(ledger, run)
    out["state"] = vars(run.state)
    out["failures"] = [vars(f) for f in ledger.failures(run.run_id, limit=1000)]
    print(json.dumps(out, indent=2, default=str))
    return EXIT_OK


def cmd_checkpoints_reset(args: argparse.Namespace) -> int:
    if not args.key and not args.all:
        raise ConfigError("give the run key to reset (--key/--date YYYY-MM-DD) or --all")
    from syncpoint import settings

    stale_after = settings.checkpoint_store().stale_after_seconds
    ledger = _ledger()
    keys = [r.run_key for r in ledger.runs(args.job, limit=100_000) if not isinstance(r, Exception)]
    # Never pull a checkpoint from under a live run.
    for key in keys if args.all else [args.key]:
        ledger.ensure_idle(args.job, key, stale_after)
    removed = ledger.delete(args.job, None if args.all else args.key)
    what = f"{args.job} (all keys)" if args.all else f"{args.job} {args.key}"
    print(f"removed {removed} checkpoint(s) of {what}; the next run starts over")
    return EXIT_OK


# --- db -------------------------------------------------------------------------------


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from syncpoint import settings
    from syncpoint.core.db import storage_errors, unchecked_engine
    from syncpoint.core.schema import upgrade

    data = settings.database()
    checkpoints = settings.checkpoint_store().target(data)
    for database in [data] if checkpoints.same_as(data) else [data, checkpoints]:
        engine = unchecked_engine(database)
        try:
            with storage_errors(database.describe()):
                before, after = upgrade(engine)
        finally:
            engine.dispose()
        done = f"already at {after}" if before == after else f"{before or 'unversioned'} -> {after}"
        print(f"{database.describe()}: {done}")
    return EXIT_OK


# --- simulate -------------------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace) -> int:
    from syncpoint.simulator import SimulatorConfig, serve

    for name in ("error_rate", "rate_limit_error_rate"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be between 0 and 1")
    serve(
        SimulatorConfig(
            host=args.host,
            port=args.port,
            latency_ms=args.latency_ms,
            error_rate=args.error_rate,
            rate_limit_error_rate=args.rate_limit_error_rate,
            rate_limit_per_minute=args.rate_limit,
            api_key=args.api_key,
        )
    )
    return EXIT_OK


# --- plumbing -------------------------------------------------------------------------


def _quiet_prefect() -> None:
    """Prefect's defaults where they do not fit a command-line run; a value set in the
    environment wins. Set before Prefect is imported: it reads them once."""
    # Offline machines: Prefect's analytics would only time out.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server's default 20 s to start were not always enough on a busy
    # two-core machine (seen in the interrupt tests): the run failed before doing
    # anything, with "Timed out while attempting to connect to ephemeral Prefect API
    # server". Waiting longer costs nothing when it starts in time.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def _start_ephemeral_prefect() -> None:
    """Start Prefect's temporary server now, deaf to Ctrl+C, when no API URL is set.

    Prefect starts it in our process group, so a terminal's Ctrl+C would kill it while
    the run is still finishing its batches in flight. Started with SIGINT blocked (the
    mask survives exec), it ignores the terminal and stops when the run is done.
    """
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return
    from prefect.server.api.server import SubprocessASGIServer

    from syncpoint.core.interrupts import sigint_blocked

    with sigint_blocked():
        SubprocessASGIServer().start()


class _NoTracebackForSyncErrors(logging.Filter):
    """Our errors already say what happened in one line; Prefect would add a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], SyncError):
            record.exc_info = None
            record.exc_text = None
        return True


def _tame_logs() -> None:
    from syncpoint.core.redact import RedactingFilter

    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", ""):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_NoTracebackForSyncErrors())
            handler.addFilter(RedactingFilter())


def _one_line(exc: BaseException) -> str:
    from syncpoint.core.redact import redact

    text = redact(str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
