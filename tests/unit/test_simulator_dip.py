"""The simulator's DIP-style documents API (/api/v1/{entity}), over real HTTP on loopback."""

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
from syncpoint.simulator.dip import DIP_TZ, ENTITIES, encode_cursor

AS_OF = date(2025, 6, 30)
RECORDS = 250
STAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{6})?\+01:00")
SP500 = "/stable/sp500-constituent"


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
    """Every page, following the cursor until the API echoes the one it was sent."""
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


def key(doc: dict[str, Any]) -> tuple[datetime, str]:
    return datetime.fromisoformat(doc["aktualisiert"]), doc["id"]


def ids(docs: list[dict[str, Any]]) -> list[str]:
    return [doc["id"] for doc in docs]


# -- paging --------------------------------------------------------------------------------


@pytest.mark.parametrize("entity", ENTITIES)
def test_full_walk_returns_every_record_once_in_order(
    sim: MarketSimulator, client: httpx.Client, entity: str
) -> None:
    pages = walk(client, entity)
    docs = documents(pages)

    assert [len(p["documents"]) for p in pages] == [100, 100, 50]
    assert all(p["numFound"] == RECORDS for p in pages)
    assert len(set(ids(docs))) == RECORDS
    assert docs == sorted(docs, key=key)
    assert docs == sim.dip_records(entity)
    # The last page echoes the cursor it was sent; the others each name a new position.
    sent = [None, pages[0]["cursor"], pages[1]["cursor"]]
    assert pages[2]["cursor"] == sent[2]
    assert len({p["cursor"] for p in pages}) == 2


@pytest.mark.parametrize("entity", ENTITIES)
def test_records_have_the_dip_shape(sim: MarketSimulator, entity: str) -> None:
    window_start = datetime(2025, 5, 1, tzinfo=UTC) - timedelta(hours=1)
    window_end = datetime(2025, 6, 30, tzinfo=UTC) - timedelta(hours=1)
    for doc in sim.dip_records(entity):
        assert {"id", "aktualisiert", "datum", "titel"} <= set(doc)
        assert 1 <= len(set(doc) - {"id", "aktualisiert", "datum", "titel", "text"}) <= 3
        assert re.fullmatch(r"\d{7}", doc["id"])
        assert STAMP.fullmatch(doc["aktualisiert"]), doc["aktualisiert"]
        assert window_start <= datetime.fromisoformat(doc["aktualisiert"]) < window_end
        datum = date.fromisoformat(doc["datum"])
        assert AS_OF - timedelta(days=800) <= datum <= AS_OF
        assert doc["titel"]
        if "wahlperiode" in doc:
            assert doc["wahlperiode"] in (20, 21)
        assert ("text" in doc) == entity.endswith("-text")


def test_text_entities_are_their_base_documents_plus_text(sim: MarketSimulator) -> None:
    for base in ("drucksache", "plenarprotokoll"):
        plain = sim.dip_records(base)
        texts = sim.dip_records(f"{base}-text")
        assert [{k: v for k, v in d.items() if k != "text"} for d in texts] == plain
        assert all(d["titel"] in d["text"] for d in texts)


@pytest.mark.parametrize("page_size", [1, 7])
def test_small_pages_split_timestamp_ties_without_loss(page_size: int) -> None:
    with (
        dip_sim(dip_records_per_entity=40, dip_page_size=page_size) as s,
        httpx.Client(base_url=s.base_url) as c,
    ):
        pages = walk(c, "vorgang")
        expected = s.dip_records("vorgang")

    docs = documents(pages)
    assert docs == expected
    assert len(pages) == -(-40 // page_size)
    stamps = [d["aktualisiert"] for d in docs]
    assert len(set(stamps)) < len(stamps)  # ties exist, so the id tie-break was exercised


def test_first_page_of_a_short_result_answers_star(client: httpx.Client) -> None:
    no_cursor = client.get(path("person"), params={"f.datum.start": "2025-06-01"}).json()
    star = client.get(path("person"), params={"f.datum.start": "2025-06-01", "cursor": "*"})

    assert 0 < no_cursor["numFound"] <= 100
    assert no_cursor["cursor"] == "*"
    assert star.json() == no_cursor


def test_star_cursor_is_the_first_page(client: httpx.Client) -> None:
    assert client.get(path("person"), params={"cursor": "*"}).json() == (
        client.get(path("person")).json()
    )


def test_past_the_end_is_empty_and_echoes_the_cursor(
    sim: MarketSimulator, client: httpx.Client
) -> None:
    last = sim.dip_records("drucksache")[-1]
    cursor = encode_cursor(key(last))

    body = client.get(path("drucksache"), params={"cursor": cursor}).json()

    assert body == {"numFound": RECORDS, "cursor": cursor, "documents": []}


def test_resending_the_last_cursor_repeats_the_last_page(client: httpx.Client) -> None:
    pages = walk(client, "aktivitaet")
    again = client.get(path("aktivitaet"), params={"cursor": pages[-1]["cursor"]}).json()

    assert again == pages[-1]


def test_empty_entity() -> None:
    with dip_sim(dip_records_per_entity=0) as s, httpx.Client(base_url=s.base_url) as c:
        body = c.get(path("person")).json()

    assert body == {"numFound": 0, "cursor": "*", "documents": []}


# -- filters -------------------------------------------------------------------------------


def expect(
    docs: list[dict[str, Any]], start: datetime | None = None, end: datetime | None = None
) -> list[dict[str, Any]]:
    return [
        d
        for d in docs
        if (start is None or key(d)[0] >= start) and (end is None or key(d)[0] <= end)
    ]


def test_aktualisiert_window_is_inclusive(sim: MarketSimulator, client: httpx.Client) -> None:
    records = sim.dip_records("drucksache")
    start, end = records[40]["aktualisiert"], records[180]["aktualisiert"]

    pages = walk(client, "drucksache", {"f.aktualisiert.start": start, "f.aktualisiert.end": end})

    expected = expect(records, key(records[40])[0], key(records[180])[0])
    assert documents(pages) == expected
    assert len(expected) >= 141  # both ends included (more on timestamp ties)
    assert all(p["numFound"] == len(expected) for p in pages)


@pytest.mark.parametrize(
    "form",
    [
        pytest.param(lambda t: t.astimezone(UTC).isoformat(), id="utc-offset"),
        pytest.param(lambda t: t.astimezone(UTC).isoformat().replace("+00:00", "Z"), id="z"),
        pytest.param(lambda t: t.astimezone(UTC).replace(tzinfo=None).isoformat(), id="naive"),
        pytest.param(lambda t: t.isoformat(), id="plus-one"),
    ],
)
def test_aktualisiert_start_forms(sim: MarketSimulator, client: httpx.Client, form: Any) -> None:
    records = sim.dip_records("person")
    start = key(records[200])[0]

    body = client.get(path("person"), params={"f.aktualisiert.start": form(start)}).json()

    assert body["documents"] == expect(records, start)
    assert body["cursor"] == "*"


def test_unencoded_plus_in_a_timestamp_still_works(
    sim: MarketSimulator, client: httpx.Client
) -> None:
    records = sim.dip_records("person")
    stamp = records[200]["aktualisiert"]
    assert "+01:00" in stamp

    body = client.get(f"{path('person')}?f.aktualisiert.start={stamp}").json()

    assert body["documents"] == expect(records, key(records[200])[0])


def test_bare_dates_cover_whole_utc_days(sim: MarketSimulator, client: httpx.Client) -> None:
    records = sim.dip_records("vorgang")
    day = key(records[100])[0].astimezone(UTC).date()

    pages = walk(
        client,
        "vorgang",
        {"f.aktualisiert.start": day.isoformat(), "f.aktualisiert.end": day.isoformat()},
    )

    expected = [d for d in records if key(d)[0].astimezone(UTC).date() == day]
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
    start = key(records[125])[0]
    params = {"f.aktualisiert.start": start.isoformat(), "f.datum.start": "2024-07-01"}

    docs = documents(walk(client, "aktivitaet", params))

    assert docs == [d for d in expect(records, start) if d["datum"] >= "2024-07-01"]


def test_empty_window_has_no_documents(client: httpx.Client) -> None:
    body = client.get(path("person"), params={"f.aktualisiert.start": "2030-01-01"}).json()

    assert body == {"numFound": 0, "cursor": "*", "documents": []}


# -- errors, auth --------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        pytest.param("not a cursor!", id="not-base64"),
        pytest.param(_b64(b"{nope"), id="not-json"),
        pytest.param(_b64(b'["2025-01-01T00:00:00+00:00"]'), id="one-element"),
        pytest.param(_b64(b'[1, "1000001"]'), id="number-stamp"),
        pytest.param(_b64(b'["yesterday", "1000001"]'), id="bad-stamp"),
        pytest.param(_b64(b'["2025-01-01T00:00:00", "1000001"]'), id="naive-stamp"),
    ],
)
def test_bad_cursor_is_400(client: httpx.Client, cursor: str) -> None:
    response = client.get(path("person"), params={"cursor": cursor})

    assert response.status_code == 400
    assert "cursor" in response.json()["Error Message"]


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
    assert name in response.json()["Error Message"]


@pytest.mark.parametrize(
    "target", ["/api/v1/bundesrat", "/api/v1/", "/api/v1/person/1000001", "/api/v2/person"]
)
def test_unknown_entity_is_404(sim: MarketSimulator, client: httpx.Client, target: str) -> None:
    response = client.get(target)

    assert response.status_code == 404
    assert "Error Message" in response.json()
    assert sim.stats()["requests"] == 1
    assert sim.stats()["by_symbol"] == {}


def test_api_key_is_checked() -> None:
    with dip_sim(api_key="secret") as s, httpx.Client(base_url=s.base_url) as c:
        wrong = c.get(path("person"), params={"apikey": "guess"})
        missing = c.get(path("person"))
        right = c.get(path("person"), params={"apikey": "secret"})
        walked = walk(c, "person", {"apikey": "secret"})

    assert wrong.status_code == 401
    assert wrong.json()["Error Message"].startswith("Invalid API KEY.")
    assert missing.status_code == 401
    assert right.status_code == 200
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


def test_dip_update_moves_records_to_the_end_and_marks_the_title() -> None:
    with dip_sim() as s, httpx.Client(base_url=s.base_url) as c:
        before = {d["id"]: d for d in documents(walk(c, "drucksache"))}
        latest = max(key(d)[0] for d in before.values())
        changed = s.dip_update("drucksache", count=5)
        after = documents(walk(c, "drucksache"))
        stamp = after[-1]["aktualisiert"]
        delta = c.get(path("drucksache"), params={"f.aktualisiert.start": stamp}).json()

    assert len(changed) == len(set(changed)) == 5
    assert sorted(ids(after)) == sorted(before)
    assert sorted(ids(after[-5:])) == sorted(changed)
    for doc in after[-5:]:
        assert key(doc)[0] > latest
        assert doc["aktualisiert"] == stamp
        assert STAMP.fullmatch(stamp)
        assert doc["titel"] == before[doc["id"]]["titel"] + " (geändert 1)"
        assert {k: v for k, v in doc.items() if k not in ("aktualisiert", "titel")} == {
            k: v for k, v in before[doc["id"]].items() if k not in ("aktualisiert", "titel")
        }
    assert after[:-5] == [d for d in before.values() if d["id"] not in changed]
    assert delta["numFound"] == 5
    assert sorted(ids(delta["documents"])) == sorted(changed)
    assert delta["cursor"] == "*"


def test_dip_update_by_ids_at_a_given_time_counts_edits() -> None:
    s = dip_sim()
    target = s.dip_records("person")[10]["id"]
    base_titel = s.dip_records("person")[10]["titel"]
    first_at = datetime(2025, 7, 1, 8, 30, tzinfo=UTC)

    assert s.dip_update("person", ids=[target], at=first_at) == [target]
    assert s.dip_update("person", ids=[target, target]) == [target]  # now: later than all
    [doc] = [d for d in s.dip_records("person") if d["id"] == target]

    assert doc["titel"] == base_titel + " (geändert 2)"
    assert key(doc)[0] > first_at
    assert s.dip_records("person")[-1] == doc

    s.dip_update("person", ids=[target], at=datetime(2025, 7, 2, 12, 0))  # naive: UTC
    [doc] = [d for d in s.dip_records("person") if d["id"] == target]
    assert doc["aktualisiert"] == "2025-07-02T13:00:00+01:00"
    assert doc["titel"] == base_titel + " (geändert 3)"


def test_a_watermark_sync_sees_exactly_the_changes() -> None:
    """The incremental pattern: remember the newest "aktualisiert", ask from just after it."""
    with dip_sim() as s, httpx.Client(base_url=s.base_url) as c:
        watermark = documents(walk(c, "vorgang"))[-1]["aktualisiert"]
        changed = s.dip_update("vorgang", count=130)  # more than a page
        added = s.dip_add("vorgang", 3)
        after_mark = (datetime.fromisoformat(watermark) + timedelta(seconds=1)).isoformat()
        pages = walk(c, "vorgang", {"f.aktualisiert.start": after_mark})

    assert len(pages) == 2
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


def test_dip_add_appends_new_records() -> None:
    with dip_sim() as s, httpx.Client(base_url=s.base_url) as c:
        before = documents(walk(c, "plenarprotokoll"))
        added = s.dip_add("plenarprotokoll", 2)
        pages = walk(c, "plenarprotokoll")
        more = s.dip_add("plenarprotokoll", 1)

    docs = documents(pages)
    assert len(added) == 2
    assert not set(added) & set(ids(before))
    assert pages[0]["numFound"] == RECORDS + 2
    assert docs[:-2] == before
    assert ids(docs[-2:]) == added
    now = datetime.now(UTC)
    for doc in docs[-2:]:
        assert key(doc)[0] > key(before[-1])[0]
        assert abs(key(doc)[0] - now) < timedelta(seconds=10)
        assert doc["datum"] == key(doc)[0].astimezone(DIP_TZ).date().isoformat()
        assert not doc["titel"].endswith(")")
        assert STAMP.fullmatch(doc["aktualisiert"])
    assert more[0] not in added
    assert s.dip_records("plenarprotokoll")[-1]["id"] == more[0]
    assert len(s.dip_records("plenarprotokoll-text")) == RECORDS  # entities are independent


def test_edits_during_concurrent_walks_lose_nothing() -> None:
    """Keyset paging: a record edited mid-walk moves ahead of the cursor, never behind it."""
    with dip_sim(dip_page_size=10) as s:
        every = set(ids(s.dip_records("aktivitaet")))
        stop = threading.Event()

        def edit() -> None:
            while not stop.is_set():
                s.dip_update("aktivitaet", count=3)
                time.sleep(0.002)

        def one_walk(_: int) -> set[str]:
            with httpx.Client(base_url=s.base_url, timeout=10) as c:
                return set(ids(documents(walk(c, "aktivitaet"))))

        editor = threading.Thread(target=edit)
        editor.start()
        try:
            with ThreadPoolExecutor(max_workers=6) as pool:
                seen = list(pool.map(one_walk, range(6)))
        finally:
            stop.set()
            editor.join()

    assert all(walked == every for walked in seen)


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
    assert len(walk(client, "person")) == 3  # only that entity is broken

    sim.dip_set_stuck_cursor("drucksache", False)
    assert walk(client, "drucksache") == normal


def test_clear_faults_unsticks_cursors(sim: MarketSimulator, client: httpx.Client) -> None:
    sim.dip_set_stuck_cursor("person", True)
    sim.clear_faults()

    assert len(walk(client, "person")) == 3


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
        ("empty", lambda body: body["documents"] == [] and body["numFound"] == RECORDS),
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

    assert stats["requests"] == 7
    assert stats["by_endpoint"] == {
        "historical-price-eod/full": 0,
        "discounted-cash-flow": 0,
        "sp500-constituent": 1,
        "stock-list": 0,
        "dip/person": 2,
        "dip/drucksache": 3,
    }
    assert stats["by_symbol"] == {"drucksache": 3, "person": 2}
    assert stats["responses"] == {"200": 5, "400": 1, "404": 1}
    assert client.get("/_sim/stats").json()["by_endpoint"]["dip/drucksache"] == 3
    assert sim.requests_for("drucksache", "dip/drucksache") == 3
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


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="dip_page_size"):
        SimulatorConfig(dip_page_size=0)
    with pytest.raises(ValueError, match="dip_records_per_entity"):
        SimulatorConfig(dip_records_per_entity=-1)
    assert SimulatorConfig().dip_records_per_entity == 250
    assert SimulatorConfig().dip_page_size == 100


def test_command_line_sets_dip_options() -> None:
    config = parse_args(["--dip-records-per-entity", "40", "--dip-page-size", "7"])

    assert (config.dip_records_per_entity, config.dip_page_size) == (40, 7)
