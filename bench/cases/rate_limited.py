"""Case 2: pace under a rate limit the simulator enforces (token bucket, 429 beyond it).

1,000 tickers x 2 requests; the simulator allows 6,000 requests a minute and syncpoint is
told the same (MARKET_API_RATE_LIMIT=6000). Pace = requests over the first -> last request
span, as a fraction of the limit, judged at syncpoint's defaults (batch size 50) and shown
at batch 250 too. The API runs in its own process. The baseline is the hand-written client
with an evenly spaced limiter (`bench.baseline_sync --rate-limit 6000`).
"""

from __future__ import annotations

from bench.harness import (
    DAY,
    Bench,
    CaseResult,
    Sample,
    SimProcess,
    baseline_sync,
    median,
    spread,
    syncpoint_cli,
    tickers_file,
    watched,
)
from syncpoint.settings import DAILY_BATCH_SIZE

LIMIT_PER_MINUTE = 6000
LATENCY_MS = 20
CONCURRENCY = 32
TUNED_BATCH_SIZE = 250
DEFAULTS, TUNED = "defaults", f"batch {TUNED_BATCH_SIZE}"
TARGET_PACE = 0.95
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
            f"honours Retry-After). syncpoint {reps} run(s), the baseline once."
        ),
        command="scripts/bench --case 2" + (" --quick" if bench.quick else ""),
    )
    samples: dict[str, list[Sample]] = {"baseline": [], DEFAULTS: [], TUNED: []}
    with SimProcess(latency_ms=LATENCY_MS, rate_limit_per_minute=LIMIT_PER_MINUTE) as sim:
        file = tickers_file(bench.folder("rate"), sim.data.symbols[:tickers_n])
        for rep in range(reps):
            # The baseline's pace is its limiter's arithmetic: one run of it is enough.
            order = (["baseline"] if rep == 0 else []) + [DEFAULTS, TUNED][:: 1 - 2 * (rep % 2)]
            for label in order:
                where = bench.folder(f"rate-{label}-{rep}")
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
                    args = syncpoint_cli(
                        "run",
                        "daily-sync",
                        "--date",
                        DAY,
                        "--tickers-file",
                        str(file),
                        "--concurrency",
                        str(CONCURRENCY),
                        *tuned,
                    )
                    env = bench.env(
                        MARKET_API_URL=sim.base_url,
                        MARKET_API_RATE_LIMIT=str(LIMIT_PER_MINUTE),
                        SYNCPOINT_DATABASE_URL=f"sqlite:///{where / 'sync.db'}",
                    )
                sample = watched(sim, args, env=env, cwd=where, what=f"case 2 {label}")
                samples[label].append(sample)
                print(
                    f"  [2] rep {rep + 1}/{reps} {label:<9} {sample.requests} requests in "
                    f"{sample.span:6.2f}s = {100 * pace(sample):5.1f}% of the limit, "
                    f"429s {sample.responses.get('429', 0)}",
                    flush=True,
                )

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
    return result
