"""Run the cases, print the table, write BENCHMARKS.md.

    scripts/bench                 # all ten cases, about 30 minutes on 2 cores
    scripts/bench --quick         # smaller sizes, one repetition: a smoke run (< 2 minutes)
    scripts/bench --case 5        # one case (repeat --case for several)
    scripts/bench --case 7 --record   # one case, and its section of BENCHMARKS.md

A full run of every case writes BENCHMARKS.md at the repository root; a quick or partial
run writes bench/results/BENCHMARKS-quick.md or -partial.md, so the recorded figures are
only ever replaced by a full run, or, case by case, by a run with --record: it replaces
(or adds) the selected cases' sections and summary rows in BENCHMARKS.md, each section
saying when and on which code it was measured, and leaves every other section as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.cases import (
    bulk_write,
    checkpoint_overhead,
    crash_redo,
    fill_cache,
    full_sync,
    noop_rerun,
    rate_limited,
    scale,
    scale_out,
    throughput,
)
from bench.harness import (
    RESULTS,
    ROOT,
    Bench,
    CaseResult,
    code_version,
    machine,
    prefect_server,
)
from bench.report import markdown, table

Case = Callable[[Bench], CaseResult]
CASES: dict[int, tuple[str, Case]] = {
    1: ("Nightly throughput", throughput.run),
    2: ("Rate-limited pace", rate_limited.run),
    3: ("No-op rerun of a completed date", noop_rerun.run),
    4: ("Crash redo", crash_redo.run),
    5: ("Bulk write", bulk_write.run),
    6: ("Checkpoint overhead", checkpoint_overhead.run),
    7: ("First full sync at scale (DIP)", full_sync.run),
    8: ("Backfill at the default batch of five", fill_cache.run),
    9: ("Half a million items", scale.run),
    10: ("Scale-out over N workers", scale_out.run),
}
# Case 5 needs no Prefect: run between the Prefect-heavy case 3 and the rest, which gives
# the server time to digest case 3's thousands of task-run events.
ORDER = (1, 8, 2, 3, 5, 4, 6, 9, 7, 10)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--case",
        type=int,
        action="append",
        choices=sorted(CASES),
        help="run only this case (repeatable)",
    )
    parser.add_argument("--reps", type=int, help="repetitions of every timed comparison")
    parser.add_argument(
        "--bulk-rows-all",
        action="store_true",
        help="case 5: every writer writes every row (no time budgets; ~20 min more)",
    )
    parser.add_argument("--output", type=Path, help="where to write the report")
    parser.add_argument(
        "--record",
        action="store_true",
        help="also write the selected cases' sections into BENCHMARKS.md (not with --quick)",
    )
    parser.add_argument(
        "--prefect-api-url",
        help="use this Prefect server instead of starting one (e.g. http://127.0.0.1:4200/api)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    return parser.parse_args(argv)


def command_line(args: argparse.Namespace) -> str:
    parts = ["scripts/bench"]
    if args.quick:
        parts.append("--quick")
    for number in args.case or []:
        parts += ["--case", str(number)]
    if args.reps:
        parts += ["--reps", str(args.reps)]
    if args.bulk_rows_all:
        parts.append("--bulk-rows-all")
    if args.record:
        parts.append("--record")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.record and args.quick:
        raise SystemExit("scripts/bench: --record keeps full-size figures only; drop --quick")
    selected = [n for n in ORDER if not args.case or n in args.case]
    full = (
        not args.quick and len(selected) == len(CASES) and not args.reps and not args.bulk_rows_all
    )
    output = args.output or (
        ROOT / "BENCHMARKS.md"
        if full
        else RESULTS / f"BENCHMARKS-{'quick' if args.quick else 'partial'}.md"
    )
    started = time.monotonic()
    info = machine()
    info["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="syncpoint-bench-"))
    print(
        f"syncpoint bench: cases {', '.join(map(str, sorted(selected)))}"
        f"{' (quick)' if args.quick else ''}; work folder {workdir}",
        flush=True,
    )
    results: list[CaseResult] = []
    try:
        with _prefect(args, workdir, info) as url:
            bench = Bench(
                args.quick,
                workdir,
                url,
                workdir / "prefect-client",
                reps_override=args.reps,
                bulk_rows_all=args.bulk_rows_all,
            )
            for number in selected:
                results.append(_run_case(number, bench))
    finally:
        if args.keep:
            print(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    info["seconds"] = time.monotonic() - started
    info["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    after = code_version()
    if (after["commit"], after["diff"]) != (info["commit"], info["diff"]):
        info["code_changed"] = (
            f"syncpoint's code changed during this run (commit {info['commit']} -> "
            f"{after['commit']}, or uncommitted edits): figures may mix two versions; rerun "
            "for one version."
        )
        print(f"\nWARNING: {info['code_changed']}")
    results.sort(key=lambda r: r.number)
    print()
    print(table(results))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(markdown(results, info, command_line(args)))
    print(f"\ntotal {info['seconds'] / 60:.1f} min; report written to {output}")
    if args.record and not full:
        recorded = ROOT / "BENCHMARKS.md"
        record_sections(recorded, results, info, command_line(args))
        print(f"case(s) {', '.join(str(r.number) for r in results)} recorded in {recorded}")
    return 1 if any(r.error for r in results) else 0


def record_sections(
    path: Path, results: list[CaseResult], info: dict[str, Any], command: str
) -> None:
    """Put these cases' sections and summary rows into the report at `path`, replacing
    their earlier ones; the rest of the report is kept as it is."""
    text = path.read_text() if path.exists() else markdown([], info, command)
    dirty = f" with uncommitted changes to {', '.join(info['changed'])}" if info["changed"] else ""
    for result in results:
        own = markdown([result], info, command)
        section = own[own.index(f"\n## {result.number}. ") + 1 :].rstrip("\n")
        heading_end = section.index("\n")
        provenance = (
            f"\n\n_Recorded on its own by `{command}` on {info['date']} (syncpoint code of "
            f"commit {info['commit']}{dirty}; {info['nproc']} CPUs; load average "
            f"{info['load']} at its start); the header above describes the full run that "
            "wrote the other sections._"
        )
        section = section[:heading_end] + provenance + section[heading_end:]
        row = next(line for line in own.splitlines() if line.startswith(f"| {result.number} |"))
        text = _replace_row(text, result.number, row)
        text = _replace_section(text, result.number, section)
    path.write_text(text.rstrip("\n") + "\n")


def _replace_row(text: str, number: int, row: str) -> str:
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"| {number} |"):
            lines[i] = row
            return "\n".join(lines) + "\n"
    # A new case: after the last row of the summary table.
    last = max(i for i, line in enumerate(lines) if re.match(r"\| \d+ \|", line))
    lines.insert(last + 1, row)
    return "\n".join(lines) + "\n"


def _replace_section(text: str, number: int, section: str) -> str:
    match = re.search(rf"^## {number}\. .*?(?=^## |\Z)", text, flags=re.M | re.S)
    if match is None:
        return text.rstrip("\n") + "\n\n" + section + "\n"
    return text[: match.start()] + section + "\n\n" + text[match.end() :].lstrip("\n")


@contextlib.contextmanager
def _prefect(args: argparse.Namespace, workdir: Path, info: dict[str, Any]) -> Iterator[str]:
    if args.prefect_api_url:
        info["prefect_server"] = f"given: {args.prefect_api_url}"
        yield args.prefect_api_url
        return
    log = RESULTS / "prefect-server.log"
    print("starting a Prefect server (home bench/results/prefect-home)...", flush=True)
    with prefect_server(RESULTS / "prefect-home", log) as (url, seconds):
        info["prefect_server"] = f"`prefect server start`, healthy after {seconds:.1f}s"
        print(f"Prefect server at {url} after {seconds:.1f}s", flush=True)
        yield url


def _run_case(number: int, bench: Bench) -> CaseResult:
    title, case = CASES[number]
    print(f"\n== case {number}: {title}", flush=True)
    began = time.monotonic()
    try:
        result = case(bench)
    except Exception as exc:
        traceback.print_exc()
        result = CaseResult(number, title, setup="", command=f"scripts/bench --case {number}")
        result.error = f"{type(exc).__name__}: {exc}"
    result.seconds = time.monotonic() - began
    print(f"== case {number}: {result.verdict} in {result.seconds:.0f}s", flush=True)
    return result
