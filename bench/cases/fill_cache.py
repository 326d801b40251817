"""Case 8: a price-history backfill at fill-cache's default batch of five tickers.

N tickers x one five-year history request each, to the API in its own process answering
after 20 ms, 16 requests in flight (fill-cache's default concurrency). syncpoint runs
`syncpoint run fill-cache` with no flag but the tickers, the dates and --concurrency; the
baseline is the hand-written asyncio+httpx script with the same semaphore, prices only.

Judged on the time from the first to the last request the API saw, per repetition, against
the script: <= 1.0x. Five tickers a batch is the grain of progress and checkpoints (a
crash loses at most a few batches of five); it must not be the grain of requests in
flight, which is what this case measures. The script stores after its last request and
syncpoint while it fetches, so syncpoint's span carries its writes and the script's does
not; the whole commands are reported beside it.
"""

from __future__ import annotations

from datetime import date, timedelta

from bench.harness import (
    DAY,
    Bench,
    CaseResult,
    Failed,
    Sample,
    SimProcess,
    baseline_sync,
    median,
    spread,
    syncpoint_cli,
    tickers_file,
    watched,
)

LATENCY_MS = 20
CONCURRENCY = 16
YEARS = 5
TARGET_RATIO = 1.0


def run(bench: Bench) -> CaseResult:
    tickers_n = 100 if bench.quick else 2000
    reps = bench.reps(2)
    end = date.fromisoformat(DAY)
    days = 365 * YEARS + 1
    start = end - timedelta(days=days)
    result = CaseResult(
        8,
        "Backfill at the default batch of five",
        setup=(
            f"{tickers_n:,} tickers x one {YEARS}-year daily history request = {tickers_n:,} "
            f"requests (~1,260 bars each) to the API in its own process, latency {LATENCY_MS} ms; "
            f"`syncpoint run fill-cache --ticker-source custom --start {start} --end {end} "
            f"--concurrency {CONCURRENCY}` with its default batch of 5 tickers, fresh SQLite file "
            f"per run, shared Prefect server; baseline `python -m bench.baseline_sync "
            f"--prices-only --days {days} --concurrency {CONCURRENCY}`. {reps} interleaved "
            "repetition(s)."
        ),
        command="scripts/bench --case 8" + (" --quick" if bench.quick else ""),
    )
    labels = ("baseline", "syncpoint")
    samples: dict[str, list[Sample]] = {label: [] for label in labels}
    ratios: list[float] = []
    with SimProcess(latency_ms=LATENCY_MS) as sim:
        folder = bench.folder("fill-cache")
        symbols = list(sim.data.symbols[:tickers_n])
        file = tickers_file(folder, symbols)
        for rep in range(reps):
            order = labels if rep % 2 == 0 else labels[::-1]
            this_rep: dict[str, Sample] = {}
            for label in order:
                where = bench.folder(f"fill-cache-{label}-{rep}")
                if label == "baseline":
                    args = baseline_sync(
                        sim.base_url,
                        file,
                        where / "baseline.db",
                        concurrency=CONCURRENCY,
                        day=end.isoformat(),
                        extra=("--days", str(days), "--prices-only"),
                    )
                    env = bench.env()
                else:
                    args = syncpoint_cli(
                        "run",
                        "fill-cache",
                        "--ticker-source",
                        "custom",
                        "--tickers",
                        ",".join(symbols),
                        "--start",
                        start.isoformat(),
                        "--end",
                        end.isoformat(),
                        "--concurrency",
                        str(CONCURRENCY),
                    )
                    env = bench.env(
                        MARKET_API_URL=sim.base_url,
                        SYNCPOINT_DATABASE_URL=f"sqlite:///{where / 'sync.db'}",
                    )
                sample = watched(sim, args, env=env, cwd=where, what=f"case 8 {label}")
                if sample.requests != tickers_n:
                    raise Failed(
                        f"case 8 {label}: {sample.requests} requests, expected {tickers_n}"
                    )
                samples[label].append(sample)
                this_rep[label] = sample
                print(
                    f"  [8] rep {rep + 1}/{reps} {label:<10} first->last {sample.span:6.2f}s  "
                    f"total {sample.total:6.2f}s  CPU {sample.timed.cpu:6.2f}s",
                    flush=True,
                )
            ratios.append(this_rep["syncpoint"].span / this_rep["baseline"].span)

    base, ours = samples["baseline"], samples["syncpoint"]
    result.add("baseline: first -> last request", spread([s.span for s in base]))
    result.add(
        "baseline: whole command (fetch, then one bulk insert)", spread([s.total for s in base])
    )
    result.add("syncpoint: first -> last request", spread([s.span for s in ours]))
    result.add(
        "syncpoint: ratio to baseline, first -> last",
        spread(ratios, "x"),
        f"<= {TARGET_RATIO}x",
        median(ratios) <= TARGET_RATIO,
    )
    result.add(
        "syncpoint: stalls (>= 0.1 s without a request)",
        spread([s.stalled for s in ours])
        + f", {median([len(s.stalls) for s in ours]):.0f} stalls per run",
    )
    result.add("syncpoint: whole command", spread([s.total for s in ours]))
    result.add(
        "client CPU, syncpoint / baseline",
        spread([o.timed.cpu / b.timed.cpu for o, b in zip(ours, base, strict=True)], "x"),
    )
    result.notes.append(
        f"{tickers_n // 5:,} batches of five tickers. Latency alone would allow "
        f"{tickers_n / CONCURRENCY * LATENCY_MS / 1000:.1f}s ({CONCURRENCY} in flight x "
        f"{LATENCY_MS} ms); both sides spend most of the span decoding ~1,260 bars an answer. "
        "syncpoint keeps enough batches fetching to fill the 16 request slots (see "
        "syncpoint.engine.batch_map.fetches_in_flight), so the batch of five sets how much a "
        "crash can cost, not how many requests are in flight. Batches fetched and waiting "
        "to be stored are counted apart (batches_ahead), so a batch whose last answer is "
        "slow holds back no other: measured by hand, the client kept 13.8 requests on the "
        "wire on average, 12.1 when one bound counted both."
    )
    whole = median([o.total / b.total for o, b in zip(ours, base, strict=True)])
    verdict = "is met only narrowly" if median(ratios) <= TARGET_RATIO else "is missed"
    result.notes.append(
        f"Why the target {verdict} (see the spread of the ratios): the two cores are shared "
        "by the API process, which "
        "needs a whole one (it builds ~1,260 bars an answer, in both runs alike; measured "
        "by hand, it ran on a core for all of the script's span with about 3 of the 16 "
        "requests in it at a time), and the client. The script's span is the API's CPU "
        "time, so syncpoint's can match it only if its client never takes CPU the API "
        "would have used. The script's client only decodes during its span and stores after its "
        "last request; syncpoint's also validates every bar, records each batch for the "
        "fetch cache and stores 2.6 million rows as it goes, at about the rate of the "
        "script's bulk insert (~1.5 us a row in SQLite). That work competes with the API "
        f"process for the second core. Whole commands, syncpoint / script: {whole:.2f}x. "
        "Prefect task runs are not per batch: one fetches a window of 250 tickers (50 "
        "batches)."
    )
    return result
