"""Case 1: nightly throughput, the real CLI against the hand-written asyncio baseline.

2,000 tickers x (prices + valuations) = 4,000 requests to a simulator answering after
20 ms, 32 requests in flight. Judged on the time from the first to the last request the
simulator saw; Prefect's start-up (process start -> first request) is reported apart.
Runs are interleaved (baseline, batch sizes, rotated each repetition) and each syncpoint
run is divided by the baseline run of the same repetition: the machine is shared.
"""

from __future__ import annotations

from bench.harness import (
    DAY,
    Bench,
    CaseResult,
    Failed,
    Sample,
    bench_module,
    median,
    spread,
    syncpoint_cli,
    tickers_file,
    watched,
)
from syncpoint.simulator import MarketSimulator, SimulatorConfig

LATENCY_MS = 20
CONCURRENCY = 32
BATCH_SIZES = (100, 250)
TARGET_RATIO = 0.8


def run(bench: Bench) -> CaseResult:
    tickers_n = 150 if bench.quick else 2000
    # Two repetitions of three ~30-60 s runs: the most of the suite's 10 minutes it can take.
    reps = bench.reps(2)
    result = CaseResult(
        1,
        "Nightly throughput",
        setup=(
            f"{tickers_n:,} tickers x (prices + valuations) = {2 * tickers_n:,} requests, "
            f"simulator latency {LATENCY_MS} ms, concurrency {CONCURRENCY}; "
            f"`syncpoint run daily-sync --concurrency {CONCURRENCY} --batch-size B` "
            f"(B = {', '.join(map(str, BATCH_SIZES[-1:] if bench.quick else BATCH_SIZES))}) "
            "in a subprocess, fresh SQLite file per "
            "run, shared Prefect server; baseline `python -m bench.baseline_sync` "
            f"(one httpx.AsyncClient, semaphore {CONCURRENCY}, one executemany at the end). "
            f"{reps} interleaved repetition(s)."
        ),
        command="scripts/bench --case 1" + (" --quick" if bench.quick else ""),
    )
    sizes = BATCH_SIZES[-1:] if bench.quick else BATCH_SIZES  # a smoke run tries one size
    labels = ["baseline", *(f"batch {size}" for size in sizes)]
    samples: dict[str, list[Sample]] = {label: [] for label in labels}
    ratios: dict[str, list[float]] = {label: [] for label in labels[1:]}

    with MarketSimulator(SimulatorConfig(latency_ms=LATENCY_MS)) as sim:
        folder = bench.folder("throughput")
        file = tickers_file(folder, sim.data.symbols[:tickers_n])
        for rep in range(reps):
            order = labels[rep % len(labels) :] + labels[: rep % len(labels)]
            this_rep: dict[str, Sample] = {}
            for label in order:
                where = bench.folder(f"throughput-{label.replace(' ', '')}-{rep}")
                if label == "baseline":
                    args = bench_module(
                        "baseline_sync",
                        "--base-url",
                        sim.base_url,
                        "--tickers-file",
                        str(file),
                        "--database",
                        str(where / "baseline.db"),
                        "--date",
                        DAY,
                        "--concurrency",
                        str(CONCURRENCY),
                    )
                    env = bench.env()
                else:
                    size = label.split()[1]
                    args = syncpoint_cli(
                        "run",
                        "daily-sync",
                        "--date",
                        DAY,
                        "--tickers-file",
                        str(file),
                        "--concurrency",
                        str(CONCURRENCY),
                        "--batch-size",
                        size,
                    )
                    env = bench.env(
                        MARKET_API_URL=sim.base_url,
                        SYNCPOINT_DATABASE_URL=f"sqlite:///{where / 'sync.db'}",
                    )
                sample = watched(sim, args, env=env, cwd=where, what=f"case 1 {label}")
                if sample.requests != 2 * tickers_n:
                    raise Failed(
                        f"case 1 {label}: {sample.requests} requests, expected {2 * tickers_n}"
                    )
                samples[label].append(sample)
                this_rep[label] = sample
                print(
                    f"  [1] rep {rep + 1}/{reps} {label:<10} first->last {sample.span:6.2f}s  "
                    f"start-up {sample.startup:5.2f}s  total {sample.total:6.2f}s  "
                    f"CPU {sample.timed.cpu:6.2f}s",
                    flush=True,
                )
            for label in labels[1:]:
                ratios[label].append(this_rep[label].span / this_rep["baseline"].span)

    requests = 2 * tickers_n
    base = samples["baseline"]
    result.add("baseline: first -> last request", spread([s.span for s in base]))
    result.add(
        "baseline: client CPU per request",
        spread([1000 * s.timed.cpu / requests for s in base], " ms"),
    )
    result.add("baseline: stalls (>= 0.1 s without a request)", spread([s.stalled for s in base]))
    for label in labels[1:]:
        runs = samples[label]
        result.add(f"syncpoint {label}: first -> last request", spread([s.span for s in runs]))
        result.add(
            f"syncpoint {label}: ratio to baseline",
            spread(ratios[label], "x"),
            f"<= {TARGET_RATIO}x",
            median(ratios[label]) <= TARGET_RATIO,
        )
        result.add(
            f"syncpoint {label}: stalls (>= 0.1 s without a request)",
            spread([s.stalled for s in runs])
            + f", {median([len(s.stalls) for s in runs]):.0f} stalls per run",
        )
        result.add(
            f"syncpoint {label}: client CPU per request (incl. start-up)",
            spread([1000 * s.timed.cpu / requests for s in runs], " ms"),
        )
    every = [s for label in labels[1:] for s in samples[label]]
    result.add(
        "syncpoint: start-up (process start -> first request)",
        spread([s.startup for s in every]),
    )
    result.add("syncpoint: last request -> exit", spread([s.tail for s in every]))
    result.add("syncpoint: whole command", spread([s.total for s in every]))
    met = [label for label in ratios if median(ratios[label]) <= TARGET_RATIO]
    if met and len(met) < len(ratios):
        missed = [label for label in ratios if label not in met]
        result.verdict_override = f"pass with {', '.join(met)}; miss with {', '.join(missed)}"
    _notes(result, samples, ratios, requests)
    return result


def _notes(
    result: CaseResult,
    samples: dict[str, list[Sample]],
    ratios: dict[str, list[float]],
    requests: int,
) -> None:
    ideal = requests / CONCURRENCY * LATENCY_MS / 1000
    base = samples["baseline"]
    base_span = median([s.span for s in base])
    base_cpu = median([s.timed.cpu for s in base])
    result.notes.append(
        f"Latency alone would allow {ideal:.1f}s ({CONCURRENCY} in flight x {LATENCY_MS} ms). "
        f"The baseline takes {base_span:.1f}s: its one httpx client uses {base_cpu:.1f}s of "
        f"CPU ({1000 * base_cpu / requests:.1f} ms per request; profiling traces most of it to "
        "the pool's bookkeeping over 32 connections), so both sides are CPU-bound and the "
        "ratio is mostly a CPU-efficiency ratio. Start-up (imports, flow run, opening the "
        "checkpoint, registering the tickers) is outside first -> last."
    )
    for label, values in ratios.items():
        size = int(label.split()[1])
        runs = samples[label]
        batches = 2 * -(-requests // 2 // size)
        span = median([s.span for s in runs])
        stalled = median([s.stalled for s in runs])
        ratio = median(values)
        verdict = "target met" if ratio <= TARGET_RATIO else "target missed"
        stalls = median([len(s.stalls) for s in runs])
        where = (
            "fewer than one per batch boundary (the next batch is normally queued for the "
            "slots before one ends). A timeline of one such run puts them at the stage "
            "transition (a stage's last batch is stored before the next stage plans its "
            "items), at the first stores (pandas is imported there), and at boundaries "
            "where both fetches in flight ended before the next was submitted: a fetch is "
            "submitted only once the batch two before it is marked, which is what caps a "
            "crash's loss at three batches"
            if stalls < batches
            else "at or around the batch boundaries"
        )
        result.notes.append(
            f"{label}: {ratio:.2f}x the baseline, {verdict}. For {stalled:.1f}s of its "
            f"{span:.1f}s no request arrived at all: {stalls:.0f} stalls of >= 0.1 s per run "
            f"for {batches} batches, {where}. Without them first -> last would be "
            f"{span - stalled:.1f}s, {(span - stalled) / base_span:.2f}x the baseline."
        )
    best = min(ratios, key=lambda label: median(ratios[label]))
    if median(ratios[best]) > TARGET_RATIO:
        result.notes.append(
            "What would reach 0.8x: the stalls are most of the gap (see 'without them' "
            "above). Larger batches have fewer boundaries; a third fetch in flight would "
            "cover slow stores, at the price of a fourth batch a crash can lose."
        )
