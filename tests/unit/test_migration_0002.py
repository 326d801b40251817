"""Revision 0002: dip_documents.aktualisiert becomes a UTC instant on SQLite.

A database written by revision 0001's code holds each record's `aktualisiert` as the wall
time of the offset DIP sent (Berlin local time), without the offset. These tests write
rows exactly as that code did (through the frozen 0001 tables, aware values in), upgrade,
and read them back through today's tables: instants, in time order, the ambiguous October
hour told apart. On PostgreSQL (timestamptz) the revision changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command

from syncpoint.core.schema import alembic_config, current, upgrade
from syncpoint.core.tables import dip_documents
from tests.unit.test_schema import a953648_metadata, make_engine

SUMMER, WINTER = timezone(timedelta(hours=2)), timezone(timedelta(hours=1))
SYNCED = datetime(2026, 11, 20, 22, 0, tzinfo=UTC)
# id -> (the payload's aktualisiert, the instant it means)
CASES: dict[str, tuple[str | None, datetime]] = {
    # The hour that happens twice on 30 October 2022: first in summer time, then in winter.
    "1": ("2022-10-30T02:30:00+02:00", datetime(2022, 10, 30, 0, 30, tzinfo=UTC)),
    "2": ("2022-10-30T02:30:00+01:00", datetime(2022, 10, 30, 1, 30, tzinfo=UTC)),
    "3": ("2022-03-29T21:19:02+02:00", datetime(2022, 3, 29, 19, 19, 2, tzinfo=UTC)),
    "4": ("2024-01-15T08:00:00.250000+01:00", datetime(2024, 1, 15, 7, 0, 0, 250000, UTC)),
    # Without an offset DIP means Berlin time (0001's code read it as UTC).
    "5": ("2024-07-01T12:00:00", datetime(2024, 7, 1, 10, 0, tzinfo=UTC)),
    # No usable string in the payload: the stored wall time is read as Berlin time.
    "6": (None, datetime(2024, 12, 24, 17, 0, tzinfo=UTC)),
}


def _as_0001_stored(original: str | None, instant: datetime) -> datetime:
    """The aware value revision 0001's code handed to the database for this record."""
    if original is None:
        return instant.astimezone(WINTER)  # 18:00 Berlin, written as a wall time
    parsed = datetime.fromisoformat(original)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _rows() -> list[dict[str, Any]]:
    rows = []
    for rid, (original, instant) in CASES.items():
        payload: dict[str, Any] = {"id": rid, "titel": f"Dokument {rid}"}
        if original is not None:
            payload["aktualisiert"] = original
        rows.append(
            {
                "entity": "drucksache",
                "id": rid,
                "aktualisiert": _as_0001_stored(original, instant),
                "datum": date(2022, 10, 30),
                "titel": payload["titel"],
                "payload": payload,
                "synced_at": SYNCED,
            }
        )
    return rows


@pytest.fixture
def at_0001(database_url: str) -> Iterator[sa.Engine]:
    """A database at revision 0001 holding rows as 0001's code wrote them."""
    engine = make_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")
        conn.execute(a953648_metadata().tables["dip_documents"].insert(), _rows())
    yield engine
    engine.dispose()


def _read(engine: sa.Engine) -> dict[str, datetime]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(dip_documents.c.id, dip_documents.c.aktualisiert)).all()
    return {rid: at for rid, at in rows}


def _raw(engine: sa.Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, aktualisiert FROM dip_documents")).all()
    return {rid: at for rid, at in rows}


def test_0001_left_wall_times_on_sqlite_and_instants_on_postgres(at_0001: sa.Engine) -> None:
    raw = _raw(at_0001)
    if at_0001.dialect.name == "sqlite":
        # The defect this revision repairs: two instants an hour apart, one text.
        assert raw["1"] == raw["2"] == "2022-10-30 02:30:00.000000"
    else:
        assert raw["1"] != raw["2"]


def test_upgrade_makes_every_row_its_instant(at_0001: sa.Engine) -> None:
    assert upgrade(at_0001) == ("0001", current(at_0001))

    stored = _read(at_0001)
    expected = {rid: instant for rid, (_original, instant) in CASES.items()}
    assert stored == expected
    assert all(at.tzinfo is UTC for at in stored.values())
    with at_0001.connect() as conn:
        in_order = conn.execute(
            sa.select(dip_documents.c.id).order_by(dip_documents.c.aktualisiert)
        ).scalars()
        assert list(in_order) == sorted(expected, key=lambda rid: expected[rid])


def test_on_postgres_only_rows_without_an_offset_change(at_0001: sa.Engine) -> None:
    if at_0001.dialect.name != "postgresql":
        pytest.skip("a PostgreSQL case")
    before = _raw(at_0001)
    upgrade(at_0001)
    after = _raw(at_0001)

    assert {rid for rid in CASES if after[rid] != before[rid]} == {"5"}


def test_downgrade_restores_what_0001_wrote(at_0001: sa.Engine) -> None:
    before = _raw(at_0001)
    upgrade(at_0001)
    with at_0001.begin() as conn:
        command.downgrade(alembic_config(conn), "0001")

    assert _raw(at_0001) == before


def test_upgrade_of_many_rows_pages_through_all_of_them(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    start = datetime(2025, 3, 30, 0, 0, tzinfo=UTC)  # across the spring change
    rows = [
        {
            "entity": "aktivitaet",
            "id": f"{n:07d}",
            "aktualisiert": (start + timedelta(minutes=n)).astimezone(SUMMER),
            "datum": None,
            "titel": None,
            "payload": {"aktualisiert": (start + timedelta(minutes=n)).isoformat()},
            "synced_at": SYNCED,
        }
        for n in range(12_345)  # more than two of the revision's chunks
    ]
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")
        conn.execute(a953648_metadata().tables["dip_documents"].insert(), rows)
    upgrade(engine)

    stored = _read(engine)
    engine.dispose()
    assert len(stored) == len(rows)
    assert all(stored[f"{n:07d}"] == start + timedelta(minutes=n) for n in range(len(rows)))
