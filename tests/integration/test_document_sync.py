"""document-sync through the real CLI against the built-in DIP API."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from syncpoint.simulator import FaultKind, MarketSimulator, SimulatorConfig
from tests.conftest import cli_env, run_cli
from tests.reliability.test_interrupts import start

ENTITY = "drucksache"
pytestmark = pytest.mark.slow


@pytest.fixture
def dip() -> Iterator[MarketSimulator]:
    config = SimulatorConfig(dip_records_per_entity=600, dip_page_size=50, latency_ms=25)
    with MarketSimulator(config) as sim:
        yield sim


@pytest.fixture
def env(prefect_api: str, dip: MarketSimulator, tmp_path: Path) -> dict[str, str]:
    return cli_env(
        prefect_api,
        DIP_API_URL=dip.base_url,
        SYNCPOINT_DATABASE_URL=f"sqlite:///{tmp_path / 'docs.db'}",
        DIP_CHECKPOINT_RECORDS="100",
        PREFECT_LOGGING_LEVEL="INFO",
    )


def sync(env: dict[str, str], cwd: Path, *args: str) -> Any:
    return run_cli(["run", "document-sync", *args], env, cwd)


def stored(db: Path, entity: str = ENTITY) -> dict[str, tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT id, aktualisiert, titel FROM dip_documents WHERE entity = ?", (entity,)
        ).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def upstream(sim: MarketSimulator, entity: str = ENTITY) -> dict[str, str]:
    return {r["id"]: r["titel"] for r in sim.dip_records(entity)}


def requests(sim: MarketSimulator, entity: str = ENTITY) -> int:
    return int(sim.stats()["by_endpoint"].get(f"dip/{entity}", 0))


def checkpoints(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            row = conn.execute(
                "SELECT state FROM sync_runs WHERE job='document-sync' AND run_key=?", (ENTITY,)
            ).fetchone()
    except sqlite3.OperationalError:
        return 0
    return (json.loads(row[0]).get("stream") or {}).get("checkpoints", 0) if row else 0


def interrupt_mid_stream(env: dict[str, str], cwd: Path, db: Path, sig: int) -> str:
    proc = start(["run", "document-sync", "--entity", ENTITY], env, cwd)
    deadline = time.monotonic() + 120
    while checkpoints(db) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, out + err
    return err


def test_sigint_then_resume_has_no_gaps_and_no_refetch(
    env: dict[str, str], dip: MarketSimulator, tmp_path: Path
) -> None:
    db = tmp_path / "docs.db"
    err = interrupt_mid_stream(env, tmp_path, db, signal.SIGINT)
    assert "Resume with: syncpoint run document-sync --entity drucksache --resume" in err
    assert 0 < len(stored(db)) < 600

    resumed = sync(env, tmp_path, "--entity", ENTITY, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "checkpoint resume" in resumed.stderr
    assert set(stored(db)) == set(upstream(dip))
    assert requests(dip) == 12  # 600 records / 50 per page: every page read exactly once


def test_sigkill_then_resume_redoes_at_most_one_segment(
    env: dict[str, str], dip: MarketSimulator, tmp_path: Path
) -> None:
    db = tmp_path / "docs.db"
    interrupt_mid_stream(env, tmp_path, db, signal.SIGKILL)
    resumed = sync(env, tmp_path, "--entity", ENTITY, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert {k: v[1] for k, v in stored(db).items()} == upstream(dip)
    # A checkpoint every 100 records = 2 pages: the kill costs at most those two pages.
    assert 12 <= requests(dip) <= 12 + 2


def test_without_resume_an_interrupted_window_restarts(
    env: dict[str, str], dip: MarketSimulator, tmp_path: Path
) -> None:
    db = tmp_path / "docs.db"
    interrupt_mid_stream(env, tmp_path, db, signal.SIGINT)
    again = sync(env, tmp_path, "--entity", ENTITY)
    assert again.returncode == 0, again.stderr
    assert "retry" in again.stderr
    assert set(stored(db)) == set(upstream(dip))


def test_incremental_run_fetches_only_changed_records(
    env: dict[str, str], dip: MarketSimulator, tmp_path: Path
) -> None:
    db = tmp_path / "docs.db"
    assert sync(env, tmp_path, "--entity", ENTITY).returncode == 0
    before = stored(db)
    dip.reset_stats()
    time.sleep(1.1)  # upstream's clock must move past the first window's end
    changed = dip.dip_update(ENTITY, count=7)
    added = dip.dip_add(ENTITY, 3)

    second = sync(env, tmp_path, "--entity", ENTITY)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "fresh start, records updated 20" in second.stderr  # from the last window's end
    assert requests(dip) == 1  # 10 changed records fit one page
    after = stored(db)
    assert len(after) == 603
    for record_id in changed:
        assert after[record_id][1].endswith("(geändert 1)")
        assert after[record_id] != before[record_id]
    assert set(added) <= set(after)
    untouched = set(before) - set(changed)
    assert all(after[i] == before[i] for i in untouched)


def test_loop_guard_ends_a_stuck_stream_without_losing_the_window(
    env: dict[str, str], dip: MarketSimulator, tmp_path: Path
) -> None:
    db = tmp_path / "docs.db"
    dip.dip_set_stuck_cursor(ENTITY, True)
    stuck = sync(env, tmp_path, "--entity", ENTITY)
    assert stuck.returncode == 3, stuck.stdout + stuck.stderr
    assert "loop guard" in stuck.stderr
    assert requests(dip) < 10  # it stopped, it did not spin
    status = json.loads(run_cli(["status", "document-sync", "--json"], env, tmp_path).stdout)
    assert status[0]["watermark"] == "the beginning"  # the window was not marked done

    dip.dip_set_stuck_cursor(ENTITY, False)
    fixed = sync(env, tmp_path, "--entity", ENTITY)
    assert fixed.returncode == 0, fixed.stderr
    assert set(stored(db)) == set(upstream(dip))


def test_entities_are_checkpointed_independently(
    env: dict[str, str], dip: MarketSimulator, tmp_path: Path
) -> None:
    db = tmp_path / "docs.db"
    dip.set_fault("vorgang", FaultKind.SERVER_ERROR)
    first = sync(env, tmp_path, "--all")
    assert first.returncode == 1, first.stdout
    assert "vorgang" in first.stdout
    status = {
        row["entity"]: row
        for row in json.loads(run_cli(["status", "document-sync", "--json"], env, tmp_path).stdout)
    }
    assert status["vorgang"]["status"] == "failed"
    assert status["person"]["status"] == "completed"

    # A damaged checkpoint for one entity is reported by name; the others still sync.
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE sync_runs SET state = json_set(state, '$.stream.records', -5) "
            "WHERE run_key = 'person'"
        )
    dip.clear_faults()
    dip.reset_stats()
    second = sync(env, tmp_path, "--all", "--resume-all")
    assert second.returncode == 1, second.stdout + second.stderr
    assert "checkpoint for document-sync person" in second.stdout + second.stderr
    assert "syncpoint checkpoints reset document-sync --key person" in second.stdout + second.stderr
    assert requests(dip, "person") == 0
    assert requests(dip, "vorgang") == 12  # its window runs again, in full
    assert len(stored(db, "vorgang")) == 600


def test_end_date_bounds_the_window(
    env: dict[str, str], dip: MarketSimulator, tmp_path: Path
) -> None:
    db = tmp_path / "docs.db"
    records = dip.dip_records(ENTITY)
    middle = records[len(records) // 2]["aktualisiert"][:10]
    result = sync(env, tmp_path, "--entity", ENTITY, "--end", middle)
    assert result.returncode == 0, result.stderr
    got = stored(db)
    assert 0 < len(got) < 600
    assert all(v[0][:10] <= middle for v in got.values())
