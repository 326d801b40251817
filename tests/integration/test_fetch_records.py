"""The fetch cache's records (syncpoint.tasks.fetch_records.fetch_cache), in Prefect's real
result storage: what one attempt records, a rerun reads back whole, whichever
serializer wrote it, and a record that cannot be read counts as absent."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from prefect.results import ResultStore
from prefect.serializers import PickleSerializer
from prefect.types._datetime import now

from syncpoint.core.ledger import ErrorKind, ItemOutcome, PendingItem
from syncpoint.tasks.batches import Batch, BatchOutcome, cached_outcome
from syncpoint.tasks.fetch_records import RecordFolder, fetch_cache


@pytest.fixture
def storage(tmp_path: Path, prefect_api: str) -> Iterator[Path]:
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path}):
        yield tmp_path


def outcome() -> BatchOutcome:
    day = date(2026, 11, 20)
    rows = [
        {"ticker": t, "date": day - timedelta(days=d), "open": 1.5, "high": 2.0, "low": 1.0,
         "close": 1.75, "volume": 10**12 + d}
        for t in ("AAA", "BBB") for d in range(300)
    ]  # fmt: skip
    batch = Batch("run", "history", 3, (PendingItem("AAA", 0), PendingItem("BBB", 1)))
    outcomes = [
        ItemOutcome.done("AAA"),
        ItemOutcome.done("BBB"),
        ItemOutcome.failed("CCC", ErrorKind.PERMANENT, "CCC: bad date 'x'"),
    ]
    return BatchOutcome(batch, rows, outcomes, requests=3, row_counts=[300, 300, 0])


def write(store: ResultStore, key: str, value: BatchOutcome) -> None:
    store.write(obj=value, key=key, expiration=now("UTC") + timedelta(days=1))


def test_a_record_reads_back_whole(storage: Path) -> None:
    written = outcome()
    write(fetch_cache(), "syncpoint-fetch-a", written)
    assert cached_outcome(fetch_cache(), "syncpoint-fetch-a") == written
    # One line of base64 inside the record: not wrapped every 76 characters.
    (record,) = [p for p in storage.iterdir() if p.name == "syncpoint-fetch-a"]
    assert b"\\n" not in record.read_bytes()


def test_a_record_prefects_own_pickle_serializer_wrote_still_reads(storage: Path) -> None:
    """Records an earlier syncpoint wrote, for a rerun after an upgrade."""
    older = ResultStore(serializer=PickleSerializer(picklelib="pickle"))
    write(older, "syncpoint-fetch-b", outcome())
    assert cached_outcome(fetch_cache(), "syncpoint-fetch-b") == outcome()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="cut-short"),
        pytest.param(lambda b: b.replace(b'"result":"', b'"result":"AAAA'), id="not-a-pickle"),
        pytest.param(lambda _b: b"", id="empty"),
    ],
)
def test_a_damaged_record_counts_as_absent(storage: Path, damage: object) -> None:
    write(fetch_cache(), "syncpoint-fetch-c", outcome())
    record = storage / "syncpoint-fetch-c"
    record.write_bytes(damage(record.read_bytes()))  # type: ignore[operator]
    assert cached_outcome(fetch_cache(), "syncpoint-fetch-c") is None


def test_an_expired_record_counts_as_absent(storage: Path) -> None:
    store = fetch_cache()
    store.write(obj=outcome(), key="syncpoint-fetch-d", expiration=now("UTC") - timedelta(1))
    assert cached_outcome(store, "syncpoint-fetch-d") is None


def test_writing_and_reading_records_resolves_no_path_after_the_first(
    storage: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every path resolved is a system call per part of the path, each a wait for the GIL
    while the stage's HTTP loop is busy: the folder is resolved once, records not at all."""
    store = fetch_cache()
    write(store, "syncpoint-fetch-e0", outcome())
    resolved: list[str] = []
    realpath = os.path.realpath

    def counted(path: Any, *args: Any, **kwargs: Any) -> Any:
        resolved.append(str(path))
        return realpath(path, *args, **kwargs)

    monkeypatch.setattr(os.path, "realpath", counted)
    for n in range(1, 4):
        write(store, f"syncpoint-fetch-e{n}", outcome())
        assert cached_outcome(store, f"syncpoint-fetch-e{n}") == outcome()
    assert resolved == []
    assert sorted(p.name for p in storage.iterdir()) == [f"syncpoint-fetch-e{n}" for n in range(4)]


def test_records_go_where_a_linked_storage_folder_points(tmp_path: Path, prefect_api: str) -> None:
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "link"}):
        write(fetch_cache(), "syncpoint-fetch-f", outcome())
        assert [p.name for p in real.iterdir()] == ["syncpoint-fetch-f"]
        assert cached_outcome(fetch_cache(), "syncpoint-fetch-f") == outcome()


def test_the_record_folder_refuses_a_path_outside_it(tmp_path: Path) -> None:
    folder = RecordFolder(basepath=str(tmp_path / "records"))
    with pytest.raises(ValueError, match="outside of the base path"):
        folder.write_path("../elsewhere", b"x")
    assert not (tmp_path / "elsewhere").exists()
    # The folder's own parent, named as a path in it (the shape of a resolved key).
    inside = folder.write_path("a-record", b"x")
    with pytest.raises(ValueError, match="outside of the base path"):
        folder.read_path(str(Path(inside).parent / ".."))
