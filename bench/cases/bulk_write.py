"""Case 5: bulk write speed and memory, syncpoint's upsert against pandas' to_sql.

At least 1,000,000 synthetic daily price rows, generated and written in chunks of 50,000
(one transaction each, as the engine stores one batch per transaction), into PostgreSQL
16 (pgserver) and SQLite. Each writer runs in its own process (`python -m bench.writer`)
into its own empty database with the identical `stock_prices` table; its peak RSS is the
process's VmHWM.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.harness import Bench, CaseResult, Failed, bench_module, median, require, run_timed

ROWS = 1_000_000
CHUNK = 50_000
TARGET_PG_RATIO = 5.0
MEMORY_LIMIT_MIB = 1024.0
METHODS = ("upsert", "to_sql")
# Write-time budgets (seconds) of a full run. syncpoint's PostgreSQL upsert always gets to
# 1,000,000 rows (it is what the memory target is about); a writer slower than its budget
# stops at the chunk that crosses it and is judged by its rate over the rows it wrote.
# `--bulk-rows-all` lifts the budgets: every writer writes every row.
BUDGETS = {
    ("postgresql", "upsert"): None,
    ("postgresql", "to_sql"): 20.0,
    ("sqlite", "upsert"): 20.0,
    ("sqlite", "to_sql"): 15.0,
    ("sqlite", "executemany"): 15.0,
}
QUICK_ROWS, QUICK_CHUNK, QUICK_BUDGET = 20_000, 10_000, 1.5


@contextmanager
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL from the pgserver wheel; yields its root URL.

    Its data folder is not under the bench's work folder: postgres runs as its own user
    when we are root, and must be able to reach it.
    """
    import pgserver

    datadir = tempfile.mkdtemp(prefix="syncpoint-bench-pgdata-")
    server = pgserver.get_server(datadir, cleanup_mode="delete")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()
        shutil.rmtree(datadir, ignore_errors=True)


def new_database(root_url: str, name: str) -> str:
    url = sa.engine.make_url(root_url).set(drivername="postgresql+psycopg")
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def write(
    bench: Bench,
    method: str,
    url: str,
    folder: Path,
    rows: int,
    chunk: int,
    budget: float | None,
) -> dict[str, Any]:
    args = bench_module(
        "writer", "--method", method, "--url", url, "--rows", str(rows), "--chunk", str(chunk)
    )
    if budget is not None:
        args += ["--max-seconds", str(budget)]
    timed = require(run_timed(args, env=bench.env(), cwd=folder, timeout=1800), f"{method}")
    report: dict[str, Any] = json.loads(timed.stdout.strip().splitlines()[-1])
    print(
        f"  [5] {report['dialect']:<10} {method:<6} {report['rows_per_second']:>10,.0f} rows/s "
        f"over {report['rows']:,} rows ({report['seconds']:.1f}s), "
        f"peak RSS {report['peak_rss_mib']:.0f} MiB",
        flush=True,
    )
    return report


def run(bench: Bench) -> CaseResult:
    rows = QUICK_ROWS if bench.quick else ROWS
    chunk = QUICK_CHUNK if bench.quick else CHUNK

    def budget(dialect: str, method: str) -> float | None:
        if bench.bulk_rows_all:
            return None
        if bench.quick:
            return None if (dialect, method) == ("postgresql", "upsert") else QUICK_BUDGET
        return BUDGETS[dialect, method]

    budgets = ", ".join(
        f"{d} {m} {b:.0f}s" for (d, m) in BUDGETS if (b := budget(d, m)) is not None
    )
    result = CaseResult(
        5,
        "Bulk write",
        setup=(
            f"Up to {rows:,} synthetic stock_prices rows in chunks of {chunk:,}, one "
            "transaction per chunk, into an empty database per writer: "
            '`syncpoint.core.store.upsert(conn, "stock_prices", rows)` against '
            "`DataFrame.from_records(rows).to_sql("
            '"stock_prices", conn, if_exists="append", index=False, method="multi", '
            "chunksize=1000)` into the identical table (same engine, same schema). "
            "PostgreSQL 16 from the pgserver wheel (Unix socket) and SQLite (WAL, "
            "synchronous=NORMAL). Each writer in its own process; peak RSS = VmHWM. A "
            "reference writer (`--method executemany`: one parameterised INSERT ... ON "
            "CONFLICT for the whole chunk) shows what executing the statement alone costs. "
            + (
                f"Write-time budgets ({budgets}): a writer past its budget stops after that "
                "chunk and is judged by its rate over the rows it wrote (`--bulk-rows-all` "
                "writes every row with every writer)."
                if budgets
                else "Every writer writes every row."
            )
        ),
        command="scripts/bench --case 5" + (" --quick" if bench.quick else ""),
    )
    folder = bench.folder("bulk")
    reports: dict[tuple[str, str], dict[str, Any]] = {}
    with postgres() as root:
        for method in METHODS:
            url = new_database(root, f"bench_{method}")
            reports["postgresql", method] = write(
                bench, method, url, folder, rows, chunk, budget("postgresql", method)
            )
    for method in (*METHODS, "executemany"):
        url = f"sqlite:///{folder / f'{method}.db'}"
        reports["sqlite", method] = write(
            bench, method, url, folder, rows, chunk, budget("sqlite", method)
        )
    for report in reports.values():
        if report["stored"] != report["rows"]:
            raise Failed(
                f"case 5: {report['method']} stored {report['stored']} of {report['rows']}"
            )

    for dialect in ("postgresql", "sqlite"):
        ours, theirs = reports[dialect, "upsert"], reports[dialect, "to_sql"]
        ratio = ours["rows_per_second"] / theirs["rows_per_second"]
        name = "PostgreSQL" if dialect == "postgresql" else "SQLite"
        for method, report in (("upsert", ours), ("to_sql", theirs)):
            result.add(
                f"{name}: {method} rows/s over {report['rows']:,} rows",
                f"{report['rows_per_second']:,.0f} (chunks: median "
                f"{median(report['chunk_rates']):,.0f})",
            )
        result.add(
            f"{name}: upsert / to_sql",
            f"{ratio:.1f}x",
            f">= {TARGET_PG_RATIO:.0f}x" if dialect == "postgresql" else "",
            ratio >= TARGET_PG_RATIO if dialect == "postgresql" else None,
        )
        result.add(
            f"{name}: upsert peak RSS ({ours['rows']:,} rows)",
            f"{ours['peak_rss_mib']:.0f} MiB (after imports {ours['rss_before_mib']:.0f} MiB)",
            f"< {MEMORY_LIMIT_MIB:.0f} MiB",
            ours["peak_rss_mib"] < MEMORY_LIMIT_MIB,
        )
        result.add(
            f"{name}: to_sql peak RSS ({theirs['rows']:,} rows)",
            f"{theirs['peak_rss_mib']:.0f} MiB",
        )
    reference = reports["sqlite", "executemany"]
    result.add(
        f"SQLite reference: one INSERT ... ON CONFLICT, executemany, over {reference['rows']:,} "
        "rows",
        f"{reference['rows_per_second']:,.0f} rows/s, "
        f"{reference['rows_per_second'] / reports['sqlite', 'upsert']['rows_per_second']:.0f}x "
        "syncpoint's upsert",
    )
    _notes(result, reports, rows)
    return result


def _notes(result: CaseResult, reports: dict[tuple[str, str], dict[str, Any]], rows: int) -> None:
    pg, pg_base = reports["postgresql", "upsert"], reports["postgresql", "to_sql"]
    lite, lite_base = reports["sqlite", "upsert"], reports["sqlite", "to_sql"]
    ratio = pg["rows_per_second"] / pg_base["rows_per_second"]
    result.notes.append(
        f"PostgreSQL: upsert {pg['rows_per_second']:,.0f} rows/s, {ratio:.1f}x to_sql's "
        f"{pg_base['rows_per_second']:,.0f}; peak RSS {pg['peak_rss_mib']:.0f} MiB for "
        f"{pg['rows']:,} rows: memory follows the chunk, not the total."
    )
    for name, report in (
        ("PostgreSQL to_sql", pg_base),
        ("SQLite upsert", lite),
        ("SQLite to_sql", lite_base),
    ):
        if report["rows"] < rows:
            result.notes.append(
                f"{name} stopped at its time budget after {report['rows']:,} rows; at its rate "
                f"{rows:,} rows would take {rows / report['rows_per_second']:.0f}s."
            )
    lite_ratio = lite["rows_per_second"] / lite_base["rows_per_second"]
    reference = reports["sqlite", "executemany"]["rows_per_second"]
    result.notes.append(
        f"SQLite (no target): upsert {lite['rows_per_second']:,.0f} rows/s, {lite_ratio:.1f}x "
        "to_sql, whose method='multi' has SQLAlchemy compile a new 1,000-row VALUES "
        "statement per insert. The reference, the chunk's rows through one parameterised "
        f"INSERT ... ON CONFLICT DO UPDATE with executemany, writes {reference:,.0f} rows/s, "
        f"{reference / lite['rows_per_second']:.1f}x syncpoint's upsert: the difference is "
        "what upsert does beyond executing one statement (its de-duplication on the key, "
        "the rows turned into tuples, and the dates into SQLite's text form)."
    )
