"""Case 2: pace under a rate limit the simulator enforces (token bucket, 429 beyond it).

1,000 tickers x 2 requests; the simulator allows 6,000 requests a minute and syncpoint is
told the same (MARKET_API_RATE_LIMIT=6000). Pace = requests over the first -> last request
span, as a fraction of the limit, judged at syncpoint's defaults (batch size 50) and shown
at batch 250 too. The API runs in its own process. The baseline is the hand-written client
with an evenly spaced limiter (`bench.baseline_sync --rate-limit 6000`).
"""

from __future__ import annotations

from pathlib import Path

from bench.harness import (
    Bench,
    CaseResult,
    Sample,
    SimProcess,
    baseline_sync,
    daily_sync_cli,
    ensure_global_limit,
    median,
    spread,
    tickers_file,
    watched,
    watched_together,
)
from syncpoint.settings import DAILY_BATCH_SIZE

LIMIT_PER_MINUTE = 6000
LATENCY_MS = 20
CONCURRENCY = 32
TUNED_BATCH_SIZE = 250
DEFAULTS, TUNED = "defaults", f"batch {TUNED_BATCH_SIZE}"
TARGET_PACE = 0.95
# The shared budget: a Prefect global limit with the API's rate as its slot decay and one
# second of it as its slots (the API's token bucket holds as much).
GLOBAL_LIMIT = "bench-market-budget"
GLOBAL_SLOTS = LIMIT_PER_MINUTE // 60
GLOBAL = "global limit"
# The same budget shared by this many processes at once, each with a share of the tickers.
SHARING = 3
GLOBAL_SHARED = f"global limit, {SHARING} processes"
TARGET_GLOBAL_PACE = 0.9
DEFAULT_BATCH_SIZE = DAILY_BATCH_SIZE


def pace(sample: Sample) -> float:
    """Achieved requests per minute over first -> last, as a fraction of the limit: n
    evenly spaced requests span n - 1 intervals."""
    if sample.span <= 0:
        return 0.0
    return (sample.requests - 1) / sample.span * 60 / LIMIT_PER_MINUTE


def run(bench: Bench) -> CaseResult:
    tickers_n = 60 if bench.quick else 1000
    reps = bench.reps(2)
    result = CaseResult(
        2,
        "Rate-limited pace",
        setup=(
            f"{tickers_n:,} tickers x 2 requests; the API in its own process, latency "
            f"{LATENCY_MS} ms and rate_limit_per_minute={LIMIT_PER_MINUTE} (token bucket, 429 "
            f"with Retry-After beyond it); `syncpoint run daily-sync --concurrency "
            f"{CONCURRENCY}` at the default batch size and with `--batch-size "
            f"{TUNED_BATCH_SIZE}`, MARKET_API_RATE_LIMIT={LIMIT_PER_MINUTE}; baseline "
            f"`python -m bench.baseline_sync --rate-limit {LIMIT_PER_MINUTE}` (evenly spaced, "
            f"honours Retry-After); and at the defaults with MARKET_API_GLOBAL_RATE_LIMIT instead: "
            f"a Prefect global concurrency limit of {GLOBAL_SLOTS} slots decaying at "
            f"{LIMIT_PER_MINUTE // 60}/s, one budget for every process using the API; and "
            f"that limit shared by {SHARING} such runs at once, each with a third of the "
            f"tickers (its own database). syncpoint {reps} run(s) of each, the baseline once."
        ),
        command="scripts/bench --case 2" + (" --quick" if bench.quick else ""),
    )
    samples: dict[str, list[Sample]] = {
        "baseline": [],
        DEFAULTS: [],
        TUNED: [],
        GLOBAL: [],
        GLOBAL_SHARED: [],
    }
    ensure_global_limit(
        bench.prefect_api_url, GLOBAL_LIMIT, slots=GLOBAL_SLOTS, per_minute=LIMIT_PER_MINUTE
    )
    with SimProcess(latency_ms=LATENCY_MS, rate_limit_per_minute=LIMIT_PER_MINUTE) as sim:
        file = tickers_file(bench.folder("rate"), sim.data.symbols[:tickers_n])
        for rep in range(reps):
            # The baseline's pace is its limiter's arithmetic: one run of it is enough.
            order = (["baseline"] if rep == 0 else []) + [DEFAULTS, TUNED, GLOBAL, GLOBAL_SHARED][
                :: 1 - 2 * (rep % 2)
            ]
            for label in order:
                where = bench.folder(f"rate-{label.replace(' ', '').replace(',', '-')}-{rep}")
                if label == GLOBAL_SHARED:
                    sample = shared_runs(bench, sim, where, tickers_n)
                    samples[label].append(sample)
                    report(rep, reps, label, sample)
                    continue
                if label == "baseline":
                    args = baseline_sync(
                        sim.base_url,
                        file,
                        where / "baseline.db",
                        concurrency=CONCURRENCY,
                        extra=("--rate-limit", str(LIMIT_PER_MINUTE)),
                    )
                    env = bench.env()
                else:
                    tuned = ["--batch-size", str(TUNED_BATCH_SIZE)] if label == TUNED else []
                    args = daily_sync_cli(file, CONCURRENCY, *tuned)
                    budget = (
                        {"MARKET_API_GLOBAL_RATE_LIMIT": GLOBAL_LIMIT}
                        if label == GLOBAL
                        else {"MARKET_API_RATE_LIMIT": str(LIMIT_PER_MINUTE)}
                    )
                    env = bench.env(
                        MARKET_API_URL=sim.base_url,
                        SYNCPOINT_DATABASE_URL=f"sqlite:///{where / 'sync.db'}",
                        **budget,
                    )
                sample = watched(sim, args, env=env, cwd=where, what=f"case 2 {label}")
                samples[label].append(sample)
                report(rep, reps, label, sample)

    ours, base = samples[DEFAULTS], samples["baseline"]
    throttled = sum(s.responses.get("429", 0) for s in ours)
    result.add(
        "syncpoint defaults: pace, share of 6,000/min",
        spread([100 * pace(s) for s in ours], "%", 1),
        f">= {TARGET_PACE:.0%}",
        median([pace(s) for s in ours]) >= TARGET_PACE,
    )
    result.add("syncpoint defaults: 429 responses (all runs)", str(throttled), "0", throttled == 0)
    result.add("syncpoint defaults: first -> last request", spread([s.span for s in ours]))
    tuned_runs = samples[TUNED]
    result.add(
        f"syncpoint {TUNED}: pace, share of 6,000/min",
        spread([100 * pace(s) for s in tuned_runs], "%", 1),
    )
    result.add(
        f"syncpoint {TUNED}: 429 responses (all runs)",
        str(sum(s.responses.get("429", 0) for s in tuned_runs)),
    )
    budget_figures(result, f"syncpoint defaults, {GLOBAL}", samples[GLOBAL], "pace")
    budget_figures(
        result, f"syncpoint defaults, {GLOBAL_SHARED}", samples[GLOBAL_SHARED], "pace together"
    )
    result.add("baseline: pace, share of 6,000/min", spread([100 * pace(s) for s in base], "%", 1))
    result.add(
        "baseline: 429 responses (all runs)", str(sum(s.responses.get("429", 0) for s in base))
    )
    result.add(
        "syncpoint defaults: stalls (>= 0.1 s without a request)",
        spread([s.stalled for s in ours])
        + f", {median([len(s.stalls) for s in ours]):.0f} stalls per run",
    )
    result.add(
        "syncpoint: start-up (process start -> first request)",
        spread([s.startup for s in ours + tuned_runs]),
    )

    ideal = (2 * tickers_n - 1) * 60 / LIMIT_PER_MINUTE
    span = median([s.span for s in ours])
    stalled = median([s.stalled for s in ours])
    batches = 2 * -(-tickers_n // DEFAULT_BATCH_SIZE)
    met = median([pace(s) for s in ours]) >= TARGET_PACE and throttled == 0
    result.notes.append(
        f"At the limit the {2 * tickers_n:,} requests need {ideal:.1f}s; syncpoint took "
        f"{span:.1f}s, {stalled:.1f}s of it in stalls with no request at all "
        f"({batches} batches, ~{1000 * stalled / batches:.0f} ms per boundary). Its limiter "
        "spaces requests evenly and never sends early to make up for an idle moment (which "
        "keeps it clear of 429s), so a moment with no request in flight is pace lost for good; "
        "the next batch's fetch is queued for the limiter's slots before the current batch "
        "ends, so batch boundaries cost none."
        + (
            ""
            if met
            else f" Target missed: without the stalls the pace would be "
            f"{100 * (2 * tickers_n - 1) / (span - stalled) * 60 / LIMIT_PER_MINUTE:.0f}%. "
            "What would reach it: see case 1's notes on where the stalls fall; larger "
            "batches lose less."
        )
    )
    result.notes.append(
        "Global limit: a pace above 100% is the limit's burst (its 100 slots at once at the "
        "start) on top of its decay; the API's token bucket allows the same. Each process "
        "has one drawer thread (syncpoint.core.rate_limit.GlobalBudget) that reads the "
        "limit, sleeps until it has room for a chunk of half a second's budget and takes it "
        "then, while the last chunk is being spent. Drawing through Prefect's own "
        "`rate_limit()` instead delivered 52.8% here (48-80% in probes). Measured per draw, "
        "the cause: on this SQLite-backed Prefect server an increment often fails with "
        "'database is locked' (it reads, then writes, beside the server's writes for the "
        "run's task runs), and Prefect's client answers the 503 by sleeping about two "
        "seconds, once up to SQLite's 60 s busy timeout; the process's other acquisitions "
        "queue behind it, and the limit holds only one second of budget, so each stall "
        "lost about a second of it. On a PostgreSQL-backed server the old way reached "
        "98-100%. The drawer has a 503 raised to it at once and reads again shortly. With "
        f"{SHARING} processes, the slots each still holds when it finishes (up to two "
        "chunks) decay unused: in a run this short that is most of what is missing."
    )
    return result


def report(rep: int, reps: int, label: str, sample: Sample) -> None:
    print(
        f"  [2] rep {rep + 1}/{reps} {label:<9} {sample.requests} requests in "
        f"{sample.span:6.2f}s = {100 * pace(sample):5.1f}% of the limit, "
        f"429s {sample.responses.get('429', 0)}",
        flush=True,
    )


def budget_figures(result: CaseResult, who: str, samples: list[Sample], pace_name: str) -> None:
    """The pace of runs under the global limit (judged) and the 429s they received."""
    throttled = sum(s.responses.get("429", 0) for s in samples)
    result.add(
        f"{who}: {pace_name}, share of 6,000/min",
        spread([100 * pace(s) for s in samples], "%", 1),
        f">= {TARGET_GLOBAL_PACE:.0%}",
        median([pace(s) for s in samples]) >= TARGET_GLOBAL_PACE,
    )
    result.add(
        f"{who}: 429 responses (all runs)",
        str(throttled),
        "0",
        throttled == 0,
    )


def shared_runs(bench: Bench, sim: SimProcess, where: Path, tickers_n: int) -> Sample:
    """SHARING runs at once under the global limit, each with its share of the tickers."""
    symbols = sim.data.symbols[:tickers_n]
    runs = []
    for n in range(SHARING):
        folder = where / f"run-{n}"
        folder.mkdir()
        file = tickers_file(folder, symbols[n::SHARING])
        args = daily_sync_cli(file, CONCURRENCY)
        env = bench.env(
            MARKET_API_URL=sim.base_url,
            SYNCPOINT_DATABASE_URL=f"sqlite:///{folder / 'sync.db'}",
            MARKET_API_GLOBAL_RATE_LIMIT=GLOBAL_LIMIT,
        )
        runs.append((args, env, folder))
    return watched_together(sim, runs, what=f"case 2 {GLOBAL_SHARED}")
