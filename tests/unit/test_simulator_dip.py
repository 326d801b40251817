"""The simulator's DIP-style documents API (/api/v1/{entity}), over real HTTP on loopback.

One test (or a few) per documented point of ../shared/dip-api.md: order, Solr cursors and
their end, page sizes, Berlin timestamps, the visibility delay, changes while a stream
runs, the documented 400/401/404 bodies and both places the key may travel.
"""

from __future__ import annotations

import base64
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest

from syncpoint.simulator import MarketSimulator, SimulatorConfig
from syncpoint.simulator.__main__ import parse_args
from syncpoint.simulator.dip import BERLIN, ENTITIES, encode_cursor

AS_OF = date(2025, 6, 30)
RECORDS = 250
STAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{6})?\+0[12]:00")
SP500 = "/stable/sp500-constituent"
DELAY = 900.0  # DIP's "about 15 minutes", the simulator's default


def dip_sim(**config: Any) -> MarketSimulator:
    config.setdefault("as_of", AS_OF)
    return MarketSimulator(SimulatorConfig(stock_list_size=500, **config))


@pytest.fixture(scope="module")
def sim() -> Iterator[MarketSimulator]:
    """Shared and never edited: tests that change records start their own simulator."""
    with dip_sim() as running:
        yield running


@pytest.fixture(scope="module")
def client(sim: MarketSimulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.base_url, timeout=10) as c:
        yield c


@pytest.fixture(autouse=True)
def _fresh_state(sim: MarketSimulator) -> Iterator[None]:
    sim.clear_faults()
    sim.reset_stats()
    yield
    sim.clear_faults()


def path(entity: str) -> str:
    return f"/api/v1/{entity}"


def walk(
    client: httpx.Client, entity: str, params: dict[str, str] | None = None, max_pages: int = 1000
) -> list[dict[str, Any]]:
    """Every page, following the cursor until the API echoes the one it was sent (that
    last answer, empty, included)."""
    cursor: str | None = None
    pages = []
    for _ in range(max_pages):
        query = dict(params or {}) | ({"cursor": cursor} if cursor else {})
        response = client.get(path(entity), params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body)
        if body["cursor"] == (cursor or "*"):
            return pages
        cursor = body["cursor"]
    raise AssertionError(f"no end after {max_pages} pages")


def documents(pages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [doc for page in pages for doc in page["documents"]]


def at(doc: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(doc["aktualisiert"])


def api_order(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DIP's order: datum descending, then id descending (ids are digits of one width)."""
    return sorted(docs, key=lambda d: (d["datum"], d["id"]), reverse=True)


def ids(docs: list[dict[str, Any]]) -> list[str]:
    return [doc["id"] for doc in docs]


# -- order, cursors, page sizes ------------------------------------------------------------


@pytest.mark.parametrize("entity", ENTITIES)
def test_full_walk_returns_every_record_once_in_order(
    sim: MarketSimulator, client: httpx.Client, entity: str
) -> None:
    pages = walk(client, entity)
    docs = documents(pages)

    size = 10 if entity.endswith("-text") else 100
    full, rest = divmod(RECORDS, size)
    # Full pages, the short last one, then the empty answer that ends the stream.
    assert [len(p["documents"]) for p in pages] == [size] * full + ([rest] if rest else []) + [0]
    assert all(p["numFound"] == RECORDS for p in pages)
    assert len(set(ids(docs))) == RECORDS
    assert docs == api_order(docs)
    assert docs == sim.dip_records(entity)
    # Every non-empty page names a new cursor, the last one too; the empty answer after it
    # echoes the cursor it was sent.
    cursors = [p["cursor"] for p in pages]
    assert len(set(cursors[:-1])) == len(pages) - 1
    assert cursors[-1] == cursors[-2]
    assert "*" not in cursors


def test_order_is_by_datum_then_id_not_by_aktualisiert(sim: MarketSimulator) -> None:
    docs = sim.dip_records("vorgang")

    assert docs == api_order(docs)
    assert [at(d) for d in docs] != sorted(at(d) for d in docs)
    assert [at(d) for d in docs] != sorted((at(d) for d in docs), reverse=True)


@pytest.mark.parametrize("page_size", [1, 7])
def test_small_pages_split_datum_ties_by_id_without_loss(page_size: int) -> None:
    with (
        dip_sim(dip_records_per_entity=40, dip_page_size=page_size) as s,
        httpx.Client(base_url=s.base_url) as c,
    ):
        # Added together, dated the same day: a tie on datum that only the id breaks.
        added = s.dip_add("vorgang", 5, visible_at=s.dip_now())
        pages = walk(c, "vorgang")
        expected = s.dip_records("vorgang")

    docs = documents(pages)
    assert docs == expected
    assert len(pages) == -(-45 // page_size) + 1
    assert ids(docs[:5]) == sorted(added, reverse=True)
    assert len({d["datum"] for d in docs[:5]}) == 1


def test_cursors_are_opaque_standard_base64() -> None:
    with dip_sim(dip_page_size=1) as s, httpx.Client(base_url=s.base_url) as c:
        cursors = [p["cursor"] for p in walk(c, "person")]

    assert all(re.fullmatch(r"[A-Za-z0-9+/]+=*", cursor) for cursor in cursors)
    assert all(base64.b64decode(cursor)[:2] == b"\x02\x82" for cursor in cursors)
    # Solr's alphabet: some cursors hold "+" or "/", which a client must URL-encode.
    assert any(set(cursor) & set("+/") for cursor in cursors)


def test_a_cursor_sent_without_url_encoding_is_refused(sim: MarketSimulator) -> None:
    with dip_sim(dip_page_size=1) as s, httpx.Client(base_url=s.base_url) as c:
        cursor = next(p["cursor"] for p in walk(c, "person") if "+" in p["cursor"])
        raw = c.get(f"{path('person')}?cursor={cursor}")  # "+" arrives as a space
        encoded = c.get(path("person"), params={"cursor": cursor})

    assert raw.status_code == 400
    assert raw.json() == {"code": 400, "message": "Invalid cursor"}
    assert encoded.status_code == 200


def test_a_short_first_page_still_names_a_new_cursor(client: httpx.Client) -> None:
    params = {"f.datum.start": "2025-06-01"}
    first = client.get(path("person"), params=params).json()
    star = client.get(path("person"), params=params | {"cursor": "*"}).json()
    after = client.get(path("person"), params=params | {"cursor": first["cursor"]}).json()

    assert 0 < first["numFound"] <= 100
    assert len(first["documents"]) == first["numFound"]
    assert first["cursor"] != "*"
    assert star == first
    assert after == {"numFound": first["numFound"], "documents": [], "cursor": first["cursor"]}


def test_past_the_end_is_empty_and_echoes_the_cursor(
    sim: MarketSimulator, client: httpx.Client
) -> None:
    last = sim.dip_records("drucksache")[-1]
    cursor = encode_cursor(date.fromisoformat(last["datum"]), last["id"])

    body = client.get(path("drucksache"), params={"cursor": cursor}).json()
    again = client.get(path("drucksache"), params={"cursor": cursor}).json()

    assert body == {"numFound": RECORDS, "documents": [], "cursor": cursor}
    assert again == body


def test_empty_entity() -> None:
    with dip_sim(dip_records_per_entity=0) as s, httpx.Client(base_url=s.base_url) as c:
        response = c.get(path("person"))

    assert response.json() == {"numFound": 0, "documents": [], "cursor": "*"}
    assert response.text.startswith('{"numFound":')  # DIP's key order


def test_one_record_by_id(sim: MarketSimulator, client: httpx.Client) -> None:
    record = sim.dip_records("vorgang")[17]

    found = client.get(f"{path('vorgang')}/{record['id']}")
    missing = client.get(f"{path('vorgang')}/99")

    assert found.status_code == 200
    assert found.json() == record
    assert missing.status_code == 404
    assert missing.json() == {"code": 404, "message": "ID not found: 99"}


# -- timestamps ----------------------------------------------------------------------------


@pytest.mark.parametrize("entity", ENTITIES)
def test_records_have_the_dip_shape(sim: MarketSimulator, entity: str) -> None:
    window_start = datetime(2025, 5, 1, tzinfo=BERLIN)
    window_end = datetime(2025, 6, 30, tzinfo=BERLIN)
    for doc in sim.dip_records(entity):
        assert {"id", "aktualisiert", "datum", "titel"} <= set(doc)
        assert 1 <= len(set(doc) - {"id", "aktualisiert", "datum", "titel", "text"}) <= 3
        assert re.fullmatch(r"\d{7}", doc["id"])
        assert STAMP.fullmatch(doc["aktualisiert"]), doc["aktualisiert"]
        assert window_start <= at(doc) < window_end
        datum = date.fromisoformat(doc["datum"])
        assert AS_OF - timedelta(days=800) <= datum <= AS_OF
        assert doc["titel"]
        if "wahlperiode" in doc:
            assert doc["wahlperiode"] in (20, 21)
        assert ("text" in doc) == entity.endswith("-text")


def test_timestamps_are_berlin_time_with_daylight_saving() -> None:
    # 60 days of history back from 15 November 2025: across the change of 26 October.
    s = dip_sim(as_of=date(2025, 11, 15), dip_visibility_delay_seconds=0)
    docs = s.dip_records("person")
    offsets = {d["aktualisiert"][-6:] for d in docs}
    for doc in docs:
        berlin = at(doc).astimezone(BERLIN)
        assert at(doc).utcoffset() == berlin.utcoffset()
        assert doc["aktualisiert"] == berlin.isoformat()
    assert offsets == {"+01:00", "+02:00"}

    # The hour that happens twice: 02:30 summer time, then 02:30 winter time.
    first = s.dip_add("person", 1, at=datetime(2025, 10, 26, 0, 30, tzinfo=UTC))
    second = s.dip_add("person", 1, at=datetime(2025, 10, 26, 1, 30, tzinfo=UTC))
    by_id = {d["id"]: d["aktualisiert"] for d in s.dip_records("person")}
    assert by_id[first[0]] == "2025-10-26T02:30:00+02:00"
    assert by_id[second[0]] == "2025-10-26T02:30:00+01:00"
    with httpx.Client(base_url=s.start()) as c:
        window = {"f.aktualisiert.start": "2025-10-26T02:30:00+01:00"}
        later = c.get(path("person"), params=window).json()
    s.stop()
    assert second[0] in ids(later["documents"])
    assert first[0] not in ids(later["documents"])


# -- filters -------------------------------------------------------------------------------


def expect(
    docs: list[dict[str, Any]], start: datetime | None = None, end: datetime | None = None
) -> list[dict[str, Any]]:
    return [d for d in docs if (start is None or at(d) >= start) and (end is None or at(d) <= end)]


def test_aktualisiert_window_is_inclusive(sim: MarketSimulator, client: httpx.Client) -> None:
    records = sim.dip_records("drucksache")
    stamps = sorted(at(d) for d in records)
    start, end = stamps[40], stamps[180]

    pages = walk(
        client,
        "drucksache",
        {"f.aktualisiert.start": start.isoformat(), "f.aktualisiert.end": end.isoformat()},
    )

    expected = expect(records, start, end)
    assert documents(pages) == expected
    assert len(expected) >= 141  # both ends included (more on timestamp ties)
    assert all(p["numFound"] == len(expected) for p in pages)


@pytest.mark.parametrize(
    "form",
    [
        pytest.param(lambda t: t.astimezone(UTC).isoformat(), id="utc-offset"),
        pytest.param(lambda t: t.astimezone(UTC).isoformat().replace("+00:00", "Z"), id="z"),
        # Without an offset DIP reads Berlin time.
        pytest.param(lambda t: t.astimezone(BERLIN).replace(tzinfo=None).isoformat(), id="naive"),
        pytest.param(lambda t: t.astimezone(BERLIN).isoformat(), id="berlin-offset"),
    ],
)
def test_aktualisiert_start_forms(sim: MarketSimulator, client: httpx.Client, form: Any) -> None:
    records = sim.dip_records("person")
    start = sorted(at(d) for d in records)[200]

    body = client.get(path("person"), params={"f.aktualisiert.start": form(start)}).json()

    assert body["documents"] == expect(records, start)
    assert body["numFound"] == 50


def test_unencoded_plus_in_a_timestamp_still_works(
    sim: MarketSimulator, client: httpx.Client
) -> None:
    records = sim.dip_records("person")
    stamp = sorted(records, key=at)[200]["aktualisiert"]
    assert "+0" in stamp

    body = client.get(f"{path('person')}?f.aktualisiert.start={stamp}").json()

    assert body["documents"] == expect(records, datetime.fromisoformat(stamp))


def test_bare_dates_cover_whole_berlin_days(sim: MarketSimulator, client: httpx.Client) -> None:
    records = sim.dip_records("vorgang")
    day = at(records[100]).astimezone(BERLIN).date()

    pages = walk(
        client,
        "vorgang",
        {"f.aktualisiert.start": day.isoformat(), "f.aktualisiert.end": day.isoformat()},
    )

    expected = [d for d in records if at(d).astimezone(BERLIN).date() == day]
    assert expected
    assert documents(pages) == expected


def test_datum_window(sim: MarketSimulator, client: httpx.Client) -> None:
    records = sim.dip_records("drucksache")
    params = {"f.datum.start": "2024-01-01", "f.datum.end": "2024-12-31"}

    pages = walk(client, "drucksache", params)

    expected = [d for d in records if "2024-01-01" <= d["datum"] <= "2024-12-31"]
    assert 0 < len(expected) < RECORDS
    assert documents(pages) == expected
    assert pages[0]["numFound"] == len(expected)


def test_filters_combine(sim: MarketSimulator, client: httpx.Client) -> None:
    records = sim.dip_records("aktivitaet")
    start = sorted(at(d) for d in records)[125]
    params = {"f.aktualisiert.start": start.isoformat(), "f.datum.start": "2024-07-01"}

    docs = documents(walk(client, "aktivitaet", params))

    assert docs == [d for d in expect(records, start) if d["datum"] >= "2024-07-01"]


def test_empty_window_has_no_documents(client: httpx.Client) -> None:
    body = client.get(path("person"), params={"f.aktualisiert.start": "2030-01-01"}).json()

    assert body == {"numFound": 0, "documents": [], "cursor": "*"}


# -- the visibility delay ------------------------------------------------------------------


def test_an_edit_is_served_only_after_the_visibility_delay() -> None:
    with dip_sim() as s, httpx.Client(base_url=s.base_url) as c:
        before = s.dip_records("drucksache")[3]
        changed_at = s.dip_now().replace(microsecond=0)
        s.dip_update("drucksache", ids=[before["id"]], at=changed_at)
        window = {"f.aktualisiert.start": changed_at.isoformat()}

        hidden = c.get(f"{path('drucksache')}/{before['id']}").json()
        hidden_count = c.get(path("drucksache"), params=window).json()["numFound"]
        s.dip_advance_clock(DELAY - 1)
        still = c.get(f"{path('drucksache')}/{before['id']}").json()
        s.dip_advance_clock(1)
        shown = c.get(f"{path('drucksache')}/{before['id']}").json()
        shown_count = c.get(path("drucksache"), params=window).json()["numFound"]

    assert hidden == still == before
    assert hidden_count == 0
    assert shown["titel"] == before["titel"] + " (geändert 1)"
    assert at(shown) == changed_at
    assert shown_count == 1


def test_an_added_record_appears_after_the_delay() -> None:
    with dip_sim() as s, httpx.Client(base_url=s.base_url) as c:
        [new] = s.dip_add("person")
        hidden = c.get(path("person")).json()
        s.dip_advance_clock(DELAY)
        shown = c.get(path("person")).json()

    assert hidden["numFound"] == RECORDS
    assert new not in ids(hidden["documents"])
    assert shown["numFound"] == RECORDS + 1
    assert shown["documents"][0]["id"] == new  # dated today: first in the order


def test_a_change_surfaces_late_inside_a_window_already_read() -> None:
    """Why readers must overlap their windows: a window read at t can gain records later."""
    with dip_sim() as s, httpx.Client(base_url=s.base_url) as c:
        now = s.dip_now().replace(microsecond=0)
        target = s.dip_records("vorgang")[0]["id"]
        s.dip_update("vorgang", ids=[target], at=now - timedelta(minutes=5))
        window = {
            "f.aktualisiert.start": (now - timedelta(minutes=30)).isoformat(),
            "f.aktualisiert.end": now.isoformat(),
        }
        read_at_now = documents(walk(c, "vorgang", window))
        s.dip_advance_clock(DELAY)
        read_later = documents(walk(c, "vorgang", window))

    assert read_at_now == []
    assert ids(read_later) == [target]


# -- changes while a stream runs -----------------------------------------------------------


def test_a_stream_grows_when_changes_surface_mid_run() -> None:
    with dip_sim() as s, httpx.Client(base_url=s.base_url) as c:
        # Three records updated a delay ago surface while the stream is on its 2nd page.
        earlier = s.dip_now() - timedelta(seconds=DELAY)
        added: list[str] = []
        s.dip_plan("aktivitaet", 1, lambda: added.extend(s.dip_add("aktivitaet", 3, at=earlier)))
        pages = walk(c, "aktivitaet")
        again = documents(walk(c, "aktivitaet"))

    assert [p["numFound"] for p in pages] == [RECORDS] + [RECORDS + 3] * (len(pages) - 1)
    # Dated today they sort first, behind the cursor: this stream never sees them ...
    streamed = documents(pages)
    assert len(streamed) == len(set(ids(streamed))) == RECORDS
    assert not set(added) & set(ids(streamed))
    # ... and the next read does.
    assert ids(again[:3]) == sorted(added, reverse=True)
    assert len(again) == RECORDS + 3


def test_a_record_edited_mid_stream_leaves_a_fixed_window() -> None:
    with dip_sim(dip_visibility_delay_seconds=0) as s, httpx.Client(base_url=s.base_url) as c:
        window = {"f.aktualisiert.end": s.dip_now().isoformat()}
        ahead = s.dip_records("drucksache")[-1]["id"]  # the last record of the stream
        # Edited after the window's end and visible at once: it leaves the window.
        later = s.dip_now() + timedelta(minutes=1)
        s.dip_plan(
            "drucksache",
            1,
            lambda: s.dip_update("drucksache", ids=[ahead], at=later, visible_at=s.dip_now()),
        )
        pages = walk(c, "drucksache", window)

    streamed = ids(documents(pages))
    assert [p["numFound"] for p in pages] == [RECORDS] + [RECORDS - 1] * (len(pages) - 1)
    assert ahead not in streamed
    assert len(streamed) == len(set(streamed)) == RECORDS - 1


def test_edits_during_concurrent_walks_neither_skip_nor_repeat() -> None:
    """An edit keeps the record's datum, so it keeps its place: walks lose nothing."""
    with dip_sim(dip_page_size=10, dip_visibility_delay_seconds=0) as s:
        every = set(ids(s.dip_records("aktivitaet")))
        stop = threading.Event()

        def edit() -> None:
            while not stop.is_set():
                s.dip_update("aktivitaet", count=3)
                time.sleep(0.002)

        def one_walk(_: int) -> list[str]:
            with httpx.Client(base_url=s.base_url, timeout=10) as c:
                return ids(documents(walk(c, "aktivitaet")))

        editor = threading.Thread(target=edit)
        editor.start()
        try:
            with ThreadPoolExecutor(max_workers=6) as pool:
                seen = list(pool.map(one_walk, range(6)))
        finally:
            stop.set()
            editor.join()

    assert all(len(walked) == len(every) and set(walked) == every for walked in seen)


# -- errors, auth --------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _tampered() -> str:
    good = base64.b64decode(encode_cursor(date(2025, 1, 1), "1000001"))
    return _b64(good[:-1] + b"2")  # another id under the old check bytes


@pytest.mark.parametrize(
    "cursor",
    [
        pytest.param("not a cursor!", id="not-base64"),
        pytest.param(_b64(b"\x02\x82abc{nope"), id="not-a-position"),
        pytest.param(_b64(b"2025-01-01|1000001"), id="no-magic"),
        pytest.param(_tampered(), id="tampered"),
        pytest.param(
            base64.urlsafe_b64encode(b'["2025-01-01T00:00:00+00:00","1000001"]').decode(),
            id="another-apis-cursor",
        ),
    ],
)
def test_bad_cursor_is_the_documented_400(client: httpx.Client, cursor: str) -> None:
    response = client.get(path("person"), params={"cursor": cursor})

    assert response.status_code == 400
    assert response.json() == {"code": 400, "message": "Invalid cursor"}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("f.aktualisiert.start", "yesterday"),
        ("f.aktualisiert.end", "2025-13-01"),
        ("f.datum.start", "2025-01-01T00:00:00"),
        ("f.datum.end", "01.01.2025"),
    ],
)
def test_bad_filter_is_400(client: httpx.Client, name: str, value: str) -> None:
    response = client.get(path("person"), params={name: value})

    assert response.status_code == 400
    assert response.json()["code"] == 400
    assert name in response.json()["message"]


@pytest.mark.parametrize(
    "target", ["/api/v1/bundesrat", "/api/v1/", "/api/v1/person/1000001/x", "/api/v2/person"]
)
def test_unknown_path_is_404(sim: MarketSimulator, client: httpx.Client, target: str) -> None:
    response = client.get(target)

    assert response.status_code == 404
    assert sim.stats()["requests"] == 1
    assert sim.stats()["by_symbol"] == {}


def test_api_key_in_the_header_or_the_query() -> None:
    key = "k" * 42
    with dip_sim(api_key=key) as s, httpx.Client(base_url=s.base_url) as c:
        header = c.get(path("person"), headers={"Authorization": f"ApiKey {key}"})
        query = c.get(path("person"), params={"apikey": key})
        wrong = c.get(path("person"), headers={"Authorization": "ApiKey guess"})
        missing = c.get(path("person"))
        other_scheme = c.get(path("person"), headers={"Authorization": f"Bearer {key}"})
        forms = s.dip_key_forms()
        s.reset_stats()
        walked = walk(c, "person", {"apikey": key})

    assert header.status_code == query.status_code == 200
    assert header.json() == query.json()
    for refused in (wrong, missing, other_scheme):
        assert refused.status_code == 401
        assert refused.json()["code"] == 401
        assert refused.json()["message"].startswith("An API key is required")
    assert forms == {"header": 2, "none": 2, "query": 1}
    assert len(documents(walked)) == RECORDS


# -- determinism ---------------------------------------------------------------------------


def _everything(seed: int) -> list[list[dict[str, Any]]]:
    with dip_sim(seed=seed) as s, httpx.Client(base_url=s.base_url) as c:
        return [walk(c, entity) for entity in ("person", "drucksache-text")]


def test_same_seed_same_data_other_seed_other_data() -> None:
    first, second, other = _everything(3), _everything(3), _everything(4)

    assert first == second
    assert documents(first[0]) != documents(other[0])


def test_count_updates_pick_the_same_records_for_the_same_seed() -> None:
    picks = []
    for _ in range(2):
        s = dip_sim(seed=5)
        picks.append([s.dip_update("vorgang", count=4), s.dip_update("vorgang", count=4)])
    assert picks[0] == picks[1]
    assert picks[0][0] != picks[0][1]


# -- upstream changes ----------------------------------------------------------------------


def test_dip_update_keeps_the_order_and_marks_the_title() -> None:
    with dip_sim(dip_visibility_delay_seconds=0) as s, httpx.Client(base_url=s.base_url) as c:
        before = documents(walk(c, "drucksache"))
        latest = max(at(d) for d in before)
        changed = s.dip_update("drucksache", count=5)
        after = documents(walk(c, "drucksache"))
        stamp = next(d["aktualisiert"] for d in after if d["id"] in changed)
        delta = walk(c, "drucksache", {"f.aktualisiert.start": stamp})

    assert len(changed) == len(set(changed)) == 5
    assert ids(after) == ids(before)  # an edit keeps datum, so its place
    old = {d["id"]: d for d in before}
    for doc in after:
        if doc["id"] not in changed:
            assert doc == old[doc["id"]]
            continue
        assert at(doc) > latest
        assert doc["aktualisiert"] == stamp
        assert STAMP.fullmatch(stamp)
        assert doc["titel"] == old[doc["id"]]["titel"] + " (geändert 1)"
        assert {k: v for k, v in doc.items() if k not in ("aktualisiert", "titel")} == {
            k: v for k, v in old[doc["id"]].items() if k not in ("aktualisiert", "titel")
        }
    assert delta[0]["numFound"] == 5
    assert sorted(ids(documents(delta))) == sorted(changed)


def test_dip_update_by_ids_at_a_given_time_counts_edits() -> None:
    s = dip_sim(dip_visibility_delay_seconds=0)
    target = s.dip_records("person")[10]["id"]
    base_titel = s.dip_records("person")[10]["titel"]
    first_at = datetime(2025, 7, 1, 8, 30, tzinfo=UTC)

    assert s.dip_update("person", ids=[target], at=first_at) == [target]
    assert s.dip_update("person", ids=[target, target]) == [target]  # at upstream's now
    [doc] = [d for d in s.dip_records("person") if d["id"] == target]

    assert doc["titel"] == base_titel + " (geändert 2)"
    assert abs(at(doc) - datetime.now(UTC)) < timedelta(seconds=10)

    s.dip_update("person", ids=[target], at=datetime(2025, 7, 2, 12, 0))  # naive: UTC
    [doc] = [d for d in s.dip_records("person") if d["id"] == target]
    assert doc["aktualisiert"] == "2025-07-02T14:00:00+02:00"
    assert doc["titel"] == base_titel + " (geändert 3)"


def test_a_watermark_sync_sees_exactly_the_visible_changes() -> None:
    """The incremental pattern: ask for records updated since the last read."""
    with dip_sim() as s, httpx.Client(base_url=s.base_url) as c:
        mark = s.dip_now().replace(microsecond=0)  # DIP stamps whole seconds
        walk(c, "vorgang")
        changed = s.dip_update("vorgang", count=130)  # more than a page
        added = s.dip_add("vorgang", 3)
        since = {"f.aktualisiert.start": mark.isoformat()}
        before_delay = walk(c, "vorgang", since)
        s.dip_advance_clock(DELAY)
        pages = walk(c, "vorgang", since)

    assert documents(before_delay) == []
    assert [len(p["documents"]) for p in pages] == [100, 33, 0]
    assert sorted(ids(documents(pages))) == sorted(changed + added)


def test_dip_update_rejects_bad_arguments() -> None:
    s = dip_sim()
    with pytest.raises(ValueError, match="exactly one"):
        s.dip_update("person")
    with pytest.raises(ValueError, match="exactly one"):
        s.dip_update("person", ids=["1000001"], count=1)
    with pytest.raises(ValueError, match="unknown person id"):
        s.dip_update("person", ids=["42"])
    with pytest.raises(ValueError, match="count"):
        s.dip_update("person", count=RECORDS + 1)
    with pytest.raises(ValueError, match="unknown DIP entity"):
        s.dip_update("bundesrat", count=1)
    with pytest.raises(ValueError, match="unknown DIP entity"):
        s.dip_records("bundesrat")
    with pytest.raises(ValueError, match="forward"):
        s.dip_advance_clock(-1)


def test_dip_add_puts_new_records_first() -> None:
    with dip_sim(dip_visibility_delay_seconds=0) as s, httpx.Client(base_url=s.base_url) as c:
        before = documents(walk(c, "plenarprotokoll"))
        added = s.dip_add("plenarprotokoll", 2)
        pages = walk(c, "plenarprotokoll")

    docs = documents(pages)
    assert len(added) == 2
    assert not set(added) & set(ids(before))
    assert pages[0]["numFound"] == RECORDS + 2
    assert docs[2:] == before
    assert ids(docs[:2]) == sorted(added, reverse=True)  # same datum: id descending
    now = datetime.now(UTC)
    for doc in docs[:2]:
        assert abs(at(doc) - now) < timedelta(seconds=10)
        assert doc["datum"] == at(doc).astimezone(BERLIN).date().isoformat()
        assert not doc["titel"].endswith(")")
        assert STAMP.fullmatch(doc["aktualisiert"])
    assert len(s.dip_records("plenarprotokoll-text")) == RECORDS  # entities are independent


# -- the loop-guard hook -------------------------------------------------------------------


def test_stuck_cursor_repeats_the_second_page_forever(
    sim: MarketSimulator, client: httpx.Client
) -> None:
    normal = walk(client, "drucksache")
    sim.dip_set_stuck_cursor("drucksache", True)

    first = client.get(path("drucksache")).json()
    repeats = [
        client.get(path("drucksache"), params={"cursor": first["cursor"]}).json() for _ in range(5)
    ]
    other_cursor = client.get(path("drucksache"), params={"cursor": normal[1]["cursor"]}).json()

    assert first == normal[0]
    assert all(r == repeats[0] for r in repeats)
    assert repeats[0]["cursor"] == first["cursor"]
    assert repeats[0]["documents"] == normal[1]["documents"]
    assert other_cursor == repeats[0]
    assert len(walk(client, "person")) == 4  # only that entity is broken

    sim.dip_set_stuck_cursor("drucksache", False)
    assert walk(client, "drucksache") == normal


def test_clear_faults_unsticks_cursors(sim: MarketSimulator, client: httpx.Client) -> None:
    sim.dip_set_stuck_cursor("person", True)
    sim.clear_faults()

    assert len(walk(client, "person")) == 4


# -- faults --------------------------------------------------------------------------------


def test_entity_fault_hits_only_that_entity(sim: MarketSimulator, client: httpx.Client) -> None:
    sim.set_fault("drucksache", "server_error")

    assert client.get(path("drucksache")).status_code == 500
    assert client.get(path("drucksache-text")).status_code == 200
    assert client.get(path("person")).status_code == 200
    assert client.get(SP500).status_code == 200

    sim.clear_fault("drucksache")
    assert client.get(path("drucksache")).status_code == 200


def test_entity_flaky_and_rate_limited(sim: MarketSimulator, client: httpx.Client) -> None:
    sim.set_fault("vorgang", "flaky", failures=2)
    statuses = [client.get(path("vorgang")).status_code for _ in range(3)]
    sim.set_fault("vorgang", "rate_limited", retry_after=0.2)
    limited = client.get(path("vorgang"))

    assert statuses == [503, 503, 200]
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "0.2"


def test_entity_reset_drops_the_connection(sim: MarketSimulator, client: httpx.Client) -> None:
    sim.set_fault("person", "reset")

    with pytest.raises(httpx.TransportError):
        client.get(path("person"))
    assert sim.stats()["resets"] == 1


@pytest.mark.parametrize(
    ("kind", "check"),
    [
        # Empty pages that still name fresh cursors: a stream that never ends by itself.
        (
            "empty",
            lambda body: (
                body["documents"] == [] and body["numFound"] == RECORDS and body["cursor"] != "*"
            ),
        ),
        ("wrong_shape", lambda body: isinstance(body, list) and len(body) == 100),
        (
            "missing_fields",
            lambda body: all("aktualisiert" not in d and "id" in d for d in body["documents"]),
        ),
        ("garbage", None),
    ],
)
def test_entity_payload_faults(
    sim: MarketSimulator, client: httpx.Client, kind: str, check: Any
) -> None:
    sim.set_fault("vorgang", kind)

    response = client.get(path("vorgang"))

    assert response.status_code == 200
    if check is None:
        assert response.text == "<html>oops</html>"
    else:
        assert check(response.json())


def test_global_fault_and_latency_apply_to_dip(sim: MarketSimulator, client: httpx.Client) -> None:
    sim.set_global_fault("unauthorized")
    assert client.get(path("person")).status_code == 401
    sim.clear_global_fault()
    assert client.get(path("person")).status_code == 200

    with dip_sim(latency_ms=100) as s, httpx.Client(base_url=s.base_url) as c:
        started = time.perf_counter()
        c.get(path("person"))
        assert time.perf_counter() - started >= 0.1


def test_error_rate_applies_to_dip() -> None:
    with dip_sim(error_rate=1.0) as s, httpx.Client(base_url=s.base_url) as c:
        assert c.get(path("person")).status_code in (500, 502, 503, 504)


# -- stats, config -------------------------------------------------------------------------


def test_stats_count_dip_requests_per_entity(sim: MarketSimulator, client: httpx.Client) -> None:
    walk(client, "drucksache")
    client.get(path("person"))
    client.get(path("person"), params={"cursor": "bad"})
    client.get(path("bundesrat"))
    client.get(SP500)
    stats = sim.stats()

    assert stats["requests"] == 8
    assert stats["by_endpoint"] == {
        "historical-price-eod/full": 0,
        "discounted-cash-flow": 0,
        "sp500-constituent": 1,
        "stock-list": 0,
        "dip/person": 2,
        "dip/drucksache": 4,
    }
    assert stats["by_symbol"] == {"drucksache": 4, "person": 2}
    assert stats["responses"] == {"200": 6, "400": 1, "404": 1}
    assert client.get("/_sim/stats").json()["by_endpoint"]["dip/drucksache"] == 4
    assert sim.requests_for("drucksache", "dip/drucksache") == 4
    assert sim.requests_for("person", "dip/person") == 2
    assert sim.requests_for("person") == 2
    assert sim.requests_for("person", "dip/drucksache") == 0
    with pytest.raises(ValueError, match="unknown endpoint"):
        sim.requests_for("bundesrat", "dip/bundesrat")


def test_market_only_stats_keep_their_shape(sim: MarketSimulator, client: httpx.Client) -> None:
    client.get(SP500)

    assert set(sim.stats()["by_endpoint"]) == {
        "historical-price-eod/full",
        "discounted-cash-flow",
        "sp500-constituent",
        "stock-list",
    }


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("dip_page_size", 0),
        ("dip_page_size", 101),
        ("dip_text_page_size", 0),
        ("dip_text_page_size", 11),
        ("dip_records_per_entity", -1),
        ("dip_visibility_delay_seconds", -1),
    ],
)
def test_config_is_validated(option: str, value: float) -> None:
    with pytest.raises(ValueError, match=option):
        SimulatorConfig(**{option: value})


def test_config_defaults_are_dips() -> None:
    config = SimulatorConfig()
    assert (config.dip_records_per_entity, config.dip_page_size) == (250, 100)
    assert (config.dip_text_page_size, config.dip_visibility_delay_seconds) == (10, 900)


def test_command_line_sets_dip_options() -> None:
    config = parse_args(
        [
            "--dip-records-per-entity",
            "40",
            "--dip-page-size",
            "7",
            "--dip-text-page-size",
            "3",
            "--dip-visibility-delay-seconds",
            "60",
        ]
    )

    assert (config.dip_records_per_entity, config.dip_page_size) == (40, 7)
    assert (config.dip_text_page_size, config.dip_visibility_delay_seconds) == (3, 60)
