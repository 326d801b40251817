"""document-sync through the real CLI against the built-in DIP API, which behaves as DIP
documents: descending order, Solr cursors whose end is an unchanged cursor, Berlin
timestamps, and changes that take 15 minutes to become visible (the simulator's clock is
moved on instead of waiting).
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from syncpoint.core.db import dispose_engines
from syncpoint.core.tables import dip_documents
from syncpoint.simulator import FaultKind, MarketSimulator, SimulatorConfig
from syncpoint.tasks.segments import IDLE_PAGES
from tests.conftest import cli_env, run_cli
from tests.reliability.test_interrupts import start

ENTITY = "drucksache"
RECORDS, PAGE = 600, 50
PAGES = RECORDS // PAGE + 1  # and the empty answer that ends the stream
DELAY = 15 * 60  # DIP's visibility delay, the simulator's and syncpoint's default
pytestmark = pytest.mark.slow


def simulator(**config: Any) -> MarketSimulator:
    # History ends three days ago: no generated record falls into a 15-minute overlap.
    config = {
        "dip_records_per_entity": RECORDS,
        "dip_page_size": PAGE,
        "latency_ms": 25,
        "as_of": date.today() - timedelta(days=3),
    } | config
    return MarketSimulator(SimulatorConfig(**config))


@pytest.fixture
def dip() -> Iterator[MarketSimulator]:
    with simulator() as sim:
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
    assert 0 < len(stored(db)) < RECORDS

    resumed = sync(env, tmp_path, "--entity", ENTITY, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "checkpoint resume" in resumed.stderr
    assert set(stored(db)) == set(upstream(dip))
    assert requests(dip) == PAGES  # every page read exactly once, and the end


def test_sigkill_then_resume_redoes_at_most_one_segment(
    env: dict[str, str], dip: MarketSimulator, tmp_path: Path
) -> None:
    db = tmp_path / "docs.db"
    interrupt_mid_stream(env, tmp_path, db, signal.SIGKILL)
    resumed = sync(env, tmp_path, "--entity", ENTITY, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert {k: v[1] for k, v in stored(db).items()} == upstream(dip)
    # A checkpoint every 100 records = 2 pages: the kill costs at most those two pages.
    assert PAGES <= requests(dip) <= PAGES + 2


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
    dip.dip_advance_clock(DELAY)  # a quarter of an hour later they are visible

    second = sync(env, tmp_path, "--entity", ENTITY)
    assert second.returncode == 0, second.stdout + second.stderr
    # From 15 minutes before the last window's end.
    assert "fresh start, records updated 20" in second.stderr
    assert "(15 min overlap with the last window" in second.stderr
    assert requests(dip) == 2  # 10 changed records fit one page; then the end
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
    assert requests(dip, "vorgang") == PAGES  # its window runs again, in full
    assert len(stored(db, "vorgang")) == RECORDS


def test_end_date_bounds_the_window(
    env: dict[str, str], dip: MarketSimulator, tmp_path: Path
) -> None:
    db = tmp_path / "docs.db"
    stamps = sorted(datetime.fromisoformat(r["aktualisiert"]) for r in dip.dip_records(ENTITY))
    middle = stamps[len(stamps) // 2].astimezone(UTC).date().isoformat()
    result = sync(env, tmp_path, "--entity", ENTITY, "--end", middle)
    assert result.returncode == 0, result.stderr
    got = stored(db)
    assert 0 < len(got) < RECORDS
    assert all(v[0][:10] <= middle for v in got.values())  # UTC text: a day is a prefix


# --- the documented service: late changes, moving numFound, endless streams, the key -------


def summary(result: Any) -> dict[str, Any]:
    assert result.returncode in (0, 3), result.stdout + result.stderr
    return dict(json.loads(result.stdout)["entities"][0])


@pytest.mark.parametrize(
    ("delay_minutes", "caught"),
    [pytest.param("15", True, id="overlap-15-min"), pytest.param("0", False, id="no-overlap")],
)
def test_a_change_that_surfaces_late_is_read_by_the_overlap(
    env: dict[str, str], dip: MarketSimulator, tmp_path: Path, delay_minutes: str, caught: bool
) -> None:
    env["DIP_VISIBILITY_DELAY_MINUTES"] = delay_minutes
    db = tmp_path / "docs.db"
    assert sync(env, tmp_path, "--entity", ENTITY).returncode == 0
    # Edited five minutes before that window ended, visible only ten minutes after it:
    # the first window read the old versions.
    before_end = dip.dip_now() - timedelta(minutes=5)
    changed = dip.dip_update(ENTITY, count=4, at=before_end)
    assert all(not stored(db)[i][1].endswith("(geändert 1)") for i in changed)
    dip.dip_advance_clock(DELAY)
    dip.reset_stats()

    second = summary(sync(env, tmp_path, "--entity", ENTITY, "--json"))

    after = stored(db)
    fresh = [i for i in changed if after[i][1].endswith("(geändert 1)")]
    if caught:
        assert fresh == changed
        # The price: the records updated in the overlap are read again; here exactly the
        # four late ones, all of them news.
        assert second["overlap"] == {"records": 4, "late": 4}
    else:
        assert fresh == []  # lost for good: what DIP's documentation warns about
        assert second["overlap"] == {"records": 0, "late": 0}
    # A page of the four, then the end; without the overlap, one empty answer.
    assert requests(dip) == (2 if caught else 1)


def test_a_stream_that_grows_mid_run_completes_and_the_next_window_reads_the_rest(
    env: dict[str, str], dip: MarketSimulator, tmp_path: Path
) -> None:
    db = tmp_path / "docs.db"
    # On the 4th page, three records updated a quarter of an hour ago become visible:
    # dated today they sort first, behind the cursor, and numFound grows to 603.
    added: list[str] = []
    dip.dip_plan(
        ENTITY,
        3,
        lambda: added.extend(dip.dip_add(ENTITY, 3, at=dip.dip_now() - timedelta(seconds=DELAY))),
    )

    first = sync(env, tmp_path, "--entity", ENTITY, "--json")

    assert first.returncode == 0, first.stdout + first.stderr  # complete, not a loop
    entity = summary(first)
    assert (entity["status"], entity["stream"]["guard"]) == ("completed", None)
    assert (entity["stream"]["num_found_start"], entity["stream"]["num_found"]) == (600, 603)
    assert "the stream ended 3 records short of numFound 603 (600 when it started)" in (
        first.stderr
    )
    assert requests(dip) == PAGES  # nothing read twice
    assert len(stored(db)) == RECORDS
    assert not set(added) & set(stored(db))

    dip.reset_stats()
    second = summary(sync(env, tmp_path, "--entity", ENTITY, "--json"))

    assert set(added) <= set(stored(db))
    assert len(stored(db)) == RECORDS + 3
    assert second["overlap"] == {"records": 3, "late": 3}
    assert requests(dip) == 2


def test_empty_pages_under_fresh_cursors_end_the_window(
    env: dict[str, str], dip: MarketSimulator, tmp_path: Path
) -> None:
    # Each answer is empty, numFound says 600, and every cursor is new: the stream that
    # ran 413 requests until it was killed.
    dip.set_fault(ENTITY, FaultKind.EMPTY)
    guarded = sync(env, tmp_path, "--entity", ENTITY)

    assert guarded.returncode == 3, guarded.stdout + guarded.stderr
    assert f"{IDLE_PAGES} pages in a row without records (numFound 600)" in guarded.stderr
    assert requests(dip) == IDLE_PAGES
    status = json.loads(run_cli(["status", "document-sync", "--json"], env, tmp_path).stdout)
    assert status[0]["watermark"] == "the beginning"

    dip.clear_faults()
    fixed = sync(env, tmp_path, "--entity", ENTITY)
    assert fixed.returncode == 0, fixed.stderr
    assert set(stored(tmp_path / "docs.db")) == set(upstream(dip))


def test_the_key_travels_in_the_header_by_default(prefect_api: str, tmp_path: Path) -> None:
    key = "k" * 42
    with simulator(api_key=key) as sim:
        env = cli_env(
            prefect_api,
            DIP_API_URL=sim.base_url,
            DIP_API_KEY=key,
            SYNCPOINT_DATABASE_URL=f"sqlite:///{tmp_path / 'docs.db'}",
        )
        result = sync(env, tmp_path, "--entity", ENTITY)
        forms = sim.dip_key_forms()

    assert result.returncode == 0, result.stdout + result.stderr
    assert forms == {"header": PAGES}  # never in a URL


# --- timestamps on both databases ----------------------------------------------------------


def test_timestamps_are_stored_as_instants(
    database_url: str, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Berlin summer and winter times, the doubled October hour included, are instants in
    dip_documents on SQLite (as UTC text) and PostgreSQL (timestamptz)."""
    from syncpoint.flows.document_sync import document_sync

    # History from mid-September to mid-November 2025: across the change of 26 October.
    with simulator(as_of=date(2025, 11, 15), latency_ms=0) as sim:
        twice = [
            *sim.dip_add("person", 1, at=datetime(2025, 10, 26, 0, 30, tzinfo=UTC)),
            *sim.dip_add("person", 1, at=datetime(2025, 10, 26, 1, 30, tzinfo=UTC)),
        ]
        sim.dip_advance_clock(DELAY)
        served = {r["id"]: r["aktualisiert"] for r in sim.dip_records("person")}
        monkeypatch.setenv("DIP_API_URL", sim.base_url)
        monkeypatch.setenv("SYNCPOINT_DATABASE_URL", database_url)
        result = document_sync(entity="person")

    assert result["status"] == "completed"
    engine = sa.create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.connect() as conn:
        query = sa.select(dip_documents.c.id, dip_documents.c.aktualisiert)
        rows = {rid: at for rid, at in conn.execute(query)}
        raw = {
            rid: at
            for rid, at in conn.execute(sa.text("SELECT id, aktualisiert FROM dip_documents"))
        }
    engine.dispose()
    dispose_engines()

    assert {served[twice[0]][-6:], served[twice[1]][-6:]} == {"+02:00", "+01:00"}
    assert {s[-6:] for s in served.values()} == {"+01:00", "+02:00"}
    assert rows == {rid: datetime.fromisoformat(stamp) for rid, stamp in served.items()}
    assert all(moment.tzinfo is UTC for moment in rows.values())
    assert rows[twice[1]] - rows[twice[0]] == timedelta(hours=1)
    if database_url.startswith("sqlite"):
        # The text is the UTC instant, so text order is time order.
        assert raw[twice[0]] == "2025-10-26 00:30:00.000000"
        assert raw[twice[1]] == "2025-10-26 01:30:00.000000"


def test_a_stop_during_a_retry_wait_ends_partial_and_resumes(
    env: dict[str, str], dip: MarketSimulator, tmp_path: Path
) -> None:
    db = tmp_path / "docs.db"
    # From the 5th request on, the entity answers 429 with a minute's Retry-After.
    dip.dip_plan(ENTITY, 4, lambda: dip.set_fault(ENTITY, FaultKind.RATE_LIMITED, retry_after=60))
    proc = start(["run", "document-sync", "--entity", ENTITY], env, tmp_path)
    deadline = time.monotonic() + 120
    while requests(dip) < 5 or checkpoints(db) < 1:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stopped_at = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)

    assert proc.returncode == 130, out + err
    assert time.monotonic() - stopped_at < 20  # the wait was cut short, not sat out
    assert "Traceback" not in err
    assert len(stored(db)) == 4 * PAGE  # every page answered before the 429s is stored

    dip.clear_faults()
    resumed = sync(env, tmp_path, "--entity", ENTITY, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert set(stored(db)) == set(upstream(dip))
