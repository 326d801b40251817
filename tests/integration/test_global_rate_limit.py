"""Two runs on different processes share one API budget through a Prefect global limit."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

from syncpoint.core.rate_limit import DRAWS_IN_FLIGHT, RateLimiter
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
    """Each draw is a round trip to the Prefect API: 25 requests at once take three or
    four draws of ten slots (limit 20, 40 slots a second: half a second's worth, at most
    half the slots; two draws may be in flight at the end), not 25 draws of one."""
    name = "chunked-budget"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=20, slot_decay_per_second=40.0)
        )
    limiter = RateLimiter(None, global_limit=name)

    async def requests() -> None:
        await asyncio.gather(*(limiter.acquire() for _ in range(25)))

    asyncio.run(requests())
    assert 3 <= limiter.draws <= 3 + DRAWS_IN_FLIGHT - 1
    assert limiter.sent == 25
