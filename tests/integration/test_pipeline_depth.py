"""Checkpoint granularity does not cap request concurrency: small batches still fill the
stage's request slots, seen from the API's side over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from syncpoint.simulator import MarketSimulator, SimulatorConfig
from tests.conftest import dispose_engines, tickers_file

DAY = "2026-11-20"
CONCURRENCY = 8
BATCH = 2  # two batches in flight would hold only 4 requests


@pytest.fixture
def slow_market(monkeypatch: pytest.MonkeyPatch, prefect_api: str) -> Iterator[MarketSimulator]:
    # 300 ms per answer: long enough that every batch in flight has its requests out.
    with MarketSimulator(SimulatorConfig(latency_ms=300)) as sim:
        monkeypatch.setenv("MARKET_API_URL", sim.base_url)
        yield sim


def test_small_batches_fill_every_request_slot(
    slow_market: MarketSimulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from syncpoint.flows.daily_sync import daily_sync

    tickers = list(slow_market.data.symbols[:40])
    monkeypatch.setenv("SYNCPOINT_DATABASE_URL", f"sqlite:///{tmp_path / 'sync.db'}")
    monkeypatch.setenv("SYNCPOINT_TICKERS_DIR", str(tmp_path))  # a flow run may read it
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
    stats = slow_market.stats()
    assert stats["requests"] == 2 * len(tickers)  # nothing fetched twice
    # Every slot was used at once, and never more than the slots.
    assert stats["most_in_flight"] == CONCURRENCY
