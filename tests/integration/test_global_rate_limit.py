"""Two runs on different processes share one API budget through a Prefect global limit."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

from syncpoint.core.errors import ConfigError, RetriableApiError
from syncpoint.core.rate_limit import RateLimiter
from syncpoint.simulator import MarketSimulator, SimulatorConfig
from tests.conftest import cli_env, run_cli, tickers_file

pytestmark = pytest.mark.slow
LIMIT = "market-api-budget"


def two_runs_at_once(env: dict[str, str], tmp_path: Path, tickers: Path) -> list[int]:
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "syncpoint.cli",
                "run",
                "daily-sync",
                "--date",
                day,
                "--tickers-file",
                str(tickers),
                "--batch-size",
                "10",
            ],
            env={**env, "SYNCPOINT_DATABASE_URL": f"sqlite:///{tmp_path / day}.db"},
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for day in ("2026-11-19", "2026-11-20")
    ]
    return [p.wait(timeout=300) for p in procs]


def test_global_limit_keeps_two_concurrent_runs_under_the_api_budget(
    prefect_api: str, tmp_path: Path
) -> None:
    # The API allows 600 requests a minute (10/s, bursts of 10). The global limit hands
    # out 8 slots a second across both processes, so neither ever sees a 429.
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=LIMIT, limit=5, slot_decay_per_second=8.0)
        )
    with MarketSimulator(SimulatorConfig(rate_limit_per_minute=600, retry_after_seconds=1)) as sim:
        tickers = tickers_file(tmp_path, list(sim.data.sp500_symbols[:40]))
        env = cli_env(prefect_api, MARKET_API_URL=sim.base_url)

        # Control: the same two runs without the shared budget do get refused.
        (tmp_path / "control").mkdir()
        (tmp_path / "shared").mkdir()
        control = two_runs_at_once(env, tmp_path / "control", tickers)
        assert set(control) <= {0, 3}  # 3: some tickers still refused after 5 attempts
        assert sim.stats()["responses"].get("429", 0) > 0

        sim.reset_stats()
        shared = two_runs_at_once(
            {**env, "MARKET_API_GLOBAL_RATE_LIMIT": LIMIT}, tmp_path / "shared", tickers
        )
        assert shared == [0, 0]
        stats = sim.stats()
    assert stats["responses"].get("429", 0) == 0
    assert stats["by_endpoint"]["historical-price-eod/full"] == 80


def test_missing_global_limit_is_a_configuration_error(
    prefect_api: str, market: MarketSimulator, tmp_path: Path
) -> None:
    env = cli_env(
        prefect_api,
        MARKET_API_URL=market.base_url,
        MARKET_API_GLOBAL_RATE_LIMIT="no-such-limit",
        SYNCPOINT_DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}",
    )
    file = tickers_file(tmp_path, list(market.data.sp500_symbols[:5]))
    result = run_cli(["run", "daily-sync", "--tickers-file", str(file)], env, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "global concurrency limit 'no-such-limit' does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_global_limit_is_drawn_in_chunks(prefect_api: str) -> None:
    """Each draw is a round trip to the Prefect API: 25 requests at once take three draws
    of ten slots (limit 20, 40 slots a second: half a second's worth, at most half the
    slots), and perhaps one more drawn ahead, not 25 draws of one."""
    name = "chunked-budget"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=20, slot_decay_per_second=40.0)
        )
    limiter = RateLimiter(None, global_limit=name)

    async def requests() -> None:
        await asyncio.gather(*(limiter.acquire() for _ in range(25)))

    try:
        asyncio.run(requests())
    finally:
        limiter.close()
    assert 3 <= limiter.draws <= 4
    assert limiter.sent == 25


def test_workers_sharing_a_limit_never_exceed_it_in_any_window(prefect_api: str) -> None:
    """Three workers (each its own drawer and Prefect client, as separate processes would
    have) share a limit of 10 slots decaying at 20 a second; one of them stops spending
    for a while with slots in hand. In every window, from any slot taken to any later one,
    all of them together take at most limit + decay x window: slots a worker held past
    the point where the limit forgot them are dropped, not sent in a burst later."""
    name = "shared-window-budget"
    limit, decay = 10, 20.0
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=limit, slot_decay_per_second=decay)
        )
    taken: list[float] = []
    dropped: list[int] = []
    lock = threading.Lock()

    def worker(requests: int, pause_after: int | None) -> None:
        limiter = RateLimiter(None, global_limit=name)

        async def run() -> None:
            for n in range(requests):
                await limiter.acquire()
                with lock:
                    taken.append(time.monotonic())
                if n == pause_after:
                    await asyncio.sleep(1.0)  # slots in hand, the limit decaying meanwhile

        try:
            asyncio.run(run())
        finally:
            limiter.close()
        if pause_after is not None:
            assert limiter.budget is not None
            dropped.append(limiter.budget.dropped)

    threads = [
        threading.Thread(target=worker, args=(40, None)),
        threading.Thread(target=worker, args=(40, None)),
        threading.Thread(target=worker, args=(20, 2)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(taken) == 100
    taken.sort()
    worst = max(
        (j - i + 1) - (limit + decay * (taken[j] - taken[i]))
        for i in range(len(taken))
        for j in range(i, len(taken))
    )
    assert worst <= 0
    assert dropped[0] > 0  # the pausing worker's slots in hand were dropped, not sent


def test_a_limit_without_slot_decay_is_a_configuration_error(prefect_api: str) -> None:
    name = "no-decay-budget"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=5, slot_decay_per_second=0.0)
        )
    limiter = RateLimiter(None, global_limit=name, max_wait=30)
    try:
        with pytest.raises(ConfigError, match="no-decay-budget"):
            asyncio.run(limiter.acquire())
    finally:
        limiter.close()


def test_an_unreachable_prefect_api_makes_requests_transient_not_stuck() -> None:
    """No Prefect API to draw from: each request fails as retriable once its wait cap is
    spent (here one second), rather than hanging the run or failing its items for good."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    limiter = RateLimiter(None, global_limit="any-budget", max_wait=1.0)
    try:
        with (
            temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}),
            pytest.raises(RetriableApiError, match="any-budget"),
        ):
            asyncio.run(limiter.acquire())
    finally:
        limiter.close()
