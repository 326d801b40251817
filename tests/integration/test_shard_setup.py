"""How a run asks for several workers, and every way of asking wrongly: each a clear
message before any item is fetched. The runs over several workers themselves are in
tests/e2e/test_shards.py (a real server, pool and workers) and test_shards.py here."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from syncpoint import settings
from syncpoint.core.errors import ConfigError
from syncpoint.engine.batch_map import StageRun
from syncpoint.engine.shards import shard_key, shard_report, stage_run
from syncpoint.flows import daily_sync, fill_cache
from syncpoint.sources.market import PricesSource, ValuationsSource
from tests.conftest import _fresh_pg_database, cli_env, run_cli


def test_a_shard_report_survives_its_trip_through_the_result_store() -> None:
    ran = StageRun(rows_written=7, requests=5, batches_reused=1, batches=2, items_processed=9)
    ran.leases_lost, ran.fatal = 1, "the API refused the key"
    assert stage_run(shard_report(ran)) == StageRun(
        rows_written=7,
        requests=5,
        batches_reused=1,
        batches=2,
        items_processed=9,
        leases_lost=1,
        fatal="the API refused the key",
    )
    # What another version (or a broken store) hands back counts as nothing, not a crash.
    assert stage_run({"requests": "many", "rows_written": -3, "fatal": 4}) == StageRun()


def test_each_child_has_its_own_key_and_a_retried_parent_the_same_ones() -> None:
    keys = {shard_key("run-1", "prices", r, i) for r in range(2) for i in range(3)}
    assert len(keys) == 6
    assert shard_key("run-1", "prices", 0, 2) == shard_key("run-1", "prices", 0, 2)
    assert shard_key("run-1", "prices", 0, 0) != shard_key("run-1", "valuations", 0, 0)


def test_one_worker_is_the_default_and_more_need_postgresql(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pg_root_url: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MARKET_API_URL", "http://127.0.0.1:9")
    assert settings.resolve_fill_cache().spread("fill-cache", "k", {}) is None
    with pytest.raises(ConfigError, match=r"data database in PostgreSQL.*sqlite"):
        settings.resolve_fill_cache(shards=2)

    monkeypatch.setenv("SYNCPOINT_DATABASE_URL", _fresh_pg_database(pg_root_url))
    monkeypatch.setenv("SYNCPOINT_CHECKPOINT_URL", f"sqlite:///{tmp_path / 'ckpt.db'}")
    with pytest.raises(ConfigError, match="checkpoint database in PostgreSQL"):
        settings.resolve_daily_sync(shards=3)

    monkeypatch.delenv("SYNCPOINT_CHECKPOINT_URL")
    monkeypatch.setenv("SYNCPOINT_LEASE_SECONDS", "30")
    monkeypatch.setenv("SYNCPOINT_SHARD_DEPLOYMENT", "syncpoint-shard/elsewhere")
    spread = settings.resolve_daily_sync(shards=3).spread("daily-sync", "2026-11-20", {"a": 1})
    assert spread is not None
    assert (spread.count, spread.deployment, spread.lease_seconds) == (
        3,
        "syncpoint-shard/elsewhere",
        30.0,
    )
    monkeypatch.setenv("SYNCPOINT_LEASE_SECONDS", "1")
    with pytest.raises(ConfigError, match="SYNCPOINT_LEASE_SECONDS must be at least 5"):
        settings.resolve_daily_sync(shards=3)


def test_a_shard_rebuilds_the_stage_its_parent_planned(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MARKET_API_URL", "http://127.0.0.1:9")
    given = {"run_date": "2026-11-20", "price_days": 3, "batch_size": 7, "concurrency": 2}
    with daily_sync.stage_work("prices", given) as work:
        assert isinstance(work.source, PricesSource)
        assert (work.source.start, work.source.end) == (date(2026, 11, 17), date(2026, 11, 20))
        assert (work.batch_size, work.source.concurrency) == (7, 2)
    with daily_sync.stage_work("valuations", given) as work:
        assert isinstance(work.source, ValuationsSource)
    with (
        pytest.raises(ConfigError, match="no stage 'universe'"),
        daily_sync.stage_work("universe", given),
    ):
        pass

    with fill_cache.stage_work("history", {"start": "2026-01-02", "end": "2026-03-04"}) as work:
        assert isinstance(work.source, PricesSource)
        assert (work.source.start, work.source.end) == (date(2026, 1, 2), date(2026, 3, 4))
        assert work.batch_size == settings.FILL_CACHE_BATCH_SIZE


def test_the_cli_says_what_a_sharded_run_needs(
    tmp_path: Path, pg_root_url: str, prefect_api: str
) -> None:
    """SQLite, no Prefect server, no shard deployment on it, a cap that cannot be shared:
    each is exit code 2 and one line, before any request."""
    args = ["run", "fill-cache", "--ticker-source", "custom", "--tickers", "AAA,BBB"]
    env = cli_env(prefect_api, MARKET_API_URL="http://127.0.0.1:9")
    on_sqlite = run_cli([*args, "--shards", "2"], env, tmp_path)
    assert on_sqlite.returncode == 2, on_sqlite.stderr
    assert "needs its data database in PostgreSQL" in on_sqlite.stderr

    env["SYNCPOINT_DATABASE_URL"] = _fresh_pg_database(pg_root_url)
    no_server = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    serverless = run_cli([*args, "--shards", "2"], no_server, tmp_path)
    assert serverless.returncode == 2, serverless.stderr
    assert "set PREFECT_API_URL" in serverless.stderr

    capped = run_cli([*args, "--shards", "2", "--max-batches", "1"], env, tmp_path)
    assert capped.returncode == 2, capped.stdout + capped.stderr
    assert "max_batches goes with a run of one worker" in capped.stdout + capped.stderr

    # The session's Prefect server has no deployments: the run says what to deploy. The
    # universe is resolved first (a custom list costs no request), then the stage stops.
    undeployed = run_cli([*args, "--shards", "2"], env, tmp_path)
    assert undeployed.returncode == 2, undeployed.stdout + undeployed.stderr
    assert "needs the 'syncpoint-shard/shard' deployment" in undeployed.stderr
    assert "Traceback" not in undeployed.stderr
