"""The batch engine's pipeline, seen from the API's side over real HTTP.

The next batch's fetch queues for the stage's request slots while the current batch
drains, so its first requests go out before the current batch's last answer is back
(no slot idles at a boundary), and the API never sees more than `concurrency` at once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from syncpoint.simulator import MarketSimulator, SimulatorConfig
from tests.conftest import dispose_engines, tickers_file

DAY = "2026-11-20"
CONCURRENCY = 4
BATCH = 5  # four go at once, the fifth is the batch's tail
STAGE_OF = {"historical-price-eod/full": "prices", "discounted-cash-flow": "valuations"}


@pytest.fixture
def slow_timed_market(
    monkeypatch: pytest.MonkeyPatch, prefect_api: str
) -> Iterator[MarketSimulator]:
    # 300 ms per answer: a batch's tail is long enough for the next batch to be queued.
    config = SimulatorConfig(latency_ms=300, record_timeline=True)
    with MarketSimulator(config) as sim:
        monkeypatch.setenv("MARKET_API_URL", sim.base_url)
        yield sim


def test_next_batch_fills_the_slots_the_current_tail_frees(
    slow_timed_market: MarketSimulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from syncpoint.flows.daily_sync import daily_sync

    sim = slow_timed_market
    tickers = list(sim.data.symbols[:24])
    url = f"sqlite:///{tmp_path / 'sync.db'}"
    monkeypatch.setenv("SYNCPOINT_DATABASE_URL", url)
    try:
        summary = daily_sync(
            run_date=DAY,
            tickers_file=str(tickers_file(tmp_path, tickers)),
            batch_size=BATCH,
            concurrency=CONCURRENCY,
        )
    finally:
        dispose_engines()
    assert summary["status"] == "completed"

    engine = sa.create_engine(url)
    with engine.connect() as conn:
        batch_of = {
            (stage, item): batch_no
            for stage, item, batch_no in conn.execute(
                sa.text("SELECT stage, item, batch_no FROM sync_items WHERE stage != 'universe'")
            )
        }
    engine.dispose()

    # Per stage and batch: when its first request went out and its last answer came back.
    first_sent: dict[tuple[str, int], float] = {}
    last_back: dict[tuple[str, int], float] = defaultdict(float)
    served = [s for s in sim.timeline() if s.endpoint in STAGE_OF]
    assert len(served) == 2 * len(tickers)  # each item once: nothing fetched twice
    for s in served:
        key = (STAGE_OF[s.endpoint or ""], batch_of[STAGE_OF[s.endpoint or ""], s.symbol])
        first_sent[key] = min(first_sent.get(key, s.started), s.started)
        last_back[key] = max(last_back[key], s.ended)

    boundaries = overlapped = 0
    for stage, number in sorted(first_sent):
        if (stage, number + 1) in first_sent:
            boundaries += 1
            overlapped += first_sent[stage, number + 1] < last_back[stage, number]
    assert boundaries == 2 * (len(tickers) // BATCH)  # 5 batches a stage, 4 boundaries
    # Fetching one batch at a time overlaps none. Allow a boundary or two where a loaded
    # machine started the next fetch task late.
    assert overlapped >= boundaries // 2, f"{overlapped} of {boundaries} boundaries overlapped"
    # ...and the overlap never costs exactness: the API saw `concurrency` at most.
    assert sim.stats()["most_in_flight"] == CONCURRENCY


@pytest.fixture
def timed_market(monkeypatch: pytest.MonkeyPatch, prefect_api: str) -> Iterator[MarketSimulator]:
    with MarketSimulator(SimulatorConfig(latency_ms=20, record_timeline=True)) as sim:
        monkeypatch.setenv("MARKET_API_URL", sim.base_url)
        yield sim


def test_a_slow_item_holds_back_no_other_batch_until_the_memory_bound(
    timed_market: MarketSimulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first batch's first item answers after 2 s, the rest within milliseconds.
    While it is out, the batches after it are fetched, recorded and wait to be stored,
    and later ones fetch meanwhile, up to batches_ahead() batches from the first (what of
    the fetched rows may be in memory). A gate that counted fetched batches with fetching
    ones stopped at fetches_in_flight() batches: 5 requests here instead of 11."""
    from syncpoint.engine.batch_map import batches_ahead, fetches_in_flight
    from syncpoint.flows.fill_cache import fill_cache

    sim, batch, concurrency = timed_market, 2, 4
    tickers = sorted(sim.data.symbols[:30])
    sim.set_fault(tickers[0], "slow", seconds=2.0)
    url = f"sqlite:///{tmp_path / 'sync.db'}"
    monkeypatch.setenv("SYNCPOINT_DATABASE_URL", url)
    try:
        summary = fill_cache(
            ticker_source="custom",
            tickers=tickers,
            start="2026-11-02",
            end=DAY,
            batch_size=batch,
            concurrency=concurrency,
        )
    finally:
        dispose_engines()
    assert summary["status"] == "completed"

    served = [s for s in sim.timeline() if s.endpoint == "historical-price-eod/full"]
    assert sorted(s.symbol for s in served) == tickers  # each once: nothing fetched twice
    (slow,) = [s for s in served if s.symbol == tickers[0]]
    assert slow.ended - slow.started >= 2.0
    during = [s for s in served if s is not slow and slow.started <= s.started < slow.ended]
    ahead = batches_ahead(concurrency, batch)
    assert ahead > fetches_in_flight(concurrency, batch)
    # Every other item of the first `ahead` batches, and none beyond them.
    assert len(during) == ahead * batch - 1
