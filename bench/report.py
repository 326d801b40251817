"""The results as a plain-text table (stdout) and as BENCHMARKS.md."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.harness import CaseResult

HOW_TO_READ = (
    "Times are medians over interleaved repetitions, written `median (min-max, n=runs)`; "
    "ratios are medians of per-repetition ratios, each syncpoint run divided by the "
    "baseline run of the same repetition. The machine is shared and noisy: compare ratios, "
    "not absolute seconds, and rerun a case before reading much into a small difference."
)


def table(results: Sequence[CaseResult]) -> str:
    rows: list[tuple[str, str, str, str, str]] = [("case", "figure", "measured", "target", "")]
    for r in results:
        head = f"{r.number} {r.title}"
        if r.error:
            rows.append((head, "ERROR", r.error.splitlines()[0][:80], "", "error"))
            continue
        for i, f in enumerate(r.figures):
            rows.append((head if i == 0 else "", f.name, f.value, f.target, f.verdict))
        rows.append(("", "", "", "", f"case: {r.verdict}, {r.seconds:.0f}s"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for row in rows:
        cells = [row[i].ljust(widths[i]) for i in range(4)]
        lines.append("  ".join([*cells, row[4]]).rstrip())
        if row is rows[0]:
            lines.append("-" * (sum(widths) + 14))
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(results: Sequence[CaseResult], info: dict[str, Any], command: str) -> str:
    changed = info.get("changed") or []
    dirty = f" with uncommitted changes to {', '.join(changed)}" if changed else ""
    out = [
        "# Benchmarks",
        "",
        f"Written by `{command}` on {info['date']}; the whole invocation took "
        f"{info['seconds'] / 60:.1f} minutes. Generated: rerun the command rather than editing.",
        "",
        "| machine | |",
        "| --- | --- |",
        f"| CPUs (nproc) | {info['nproc']} x {info['cpu']} |",
        f"| memory | {info['memory']} |",
        f"| OS | {info['os']} |",
        f"| Python | {info['python']} |",
        f"| Prefect | {info['prefect']} |",
        f"| syncpoint | code of commit {info['commit']}{dirty} (HEAD {info.get('head', '?')}) |",
        f"| load average (1, 5, 15 min) | at start {info['load']}, at the end "
        f"{info.get('load_end', '?')} (other work shares this machine) |",
        f"| Prefect server | {info.get('prefect_server', '')} |",
        "",
    ]
    if info.get("code_changed"):
        out += [f"**Warning: {info['code_changed']}**", ""]
    out += [
        HOW_TO_READ,
        "",
        "## Summary",
        "",
        "| # | case | result | time | reproduce |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        out.append(f"| {r.number} | {r.title} | {r.verdict} | {r.seconds:.0f}s | `{r.command}` |")
    for r in results:
        out += ["", f"## {r.number}. {r.title}: {r.verdict}", ""]
        if r.setup:
            out += [r.setup, ""]
        out += [f"Reproduce: `{r.command}`", ""]
        if r.error:
            out += ["The case did not complete:", "", "```", r.error, "```"]
            continue
        out += ["| figure | measured | target | result |", "| --- | --- | --- | --- |"]
        for f in r.figures:
            out.append(f"| {_cell(f.name)} | {_cell(f.value)} | {_cell(f.target)} | {f.verdict} |")
        if r.notes:
            out.append("")
            out += [f"- {note}" for note in r.notes]
    out.append("")
    return "\n".join(out)
