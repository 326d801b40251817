"""The built-in market API, exercised over real HTTP on loopback."""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from syncpoint.simulator import MarketSimulator, SimulatorConfig

EOD = "/stable/historical-price-eod/full"
DCF = "/stable/discounted-cash-flow"
SP500 = "/stable/sp500-constituent"
STOCK_LIST = "/stable/stock-list"
# A Sunday, so "latest weekday" logic has to step back to Friday 2024-06-14.
AS_OF = date(2024, 6, 16)
# Six letters: the generator only makes 2-5 letter tickers, so this is never listed.
UNKNOWN = "NOSUCH"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sim() -> Iterator[MarketSimulator]:
    with MarketSimulator(SimulatorConfig(as_of=AS_OF)) as running:
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


@pytest.fixture(scope="module")
def symbols(sim: MarketSimulator) -> tuple[str, str]:
    return sim.data.sp500_symbols[0], sim.data.sp500_symbols[1]


def eod(
    client: httpx.Client, symbol: str, start: str = "2024-01-01", end: str = "2024-01-31"
) -> httpx.Response:
    return client.get(EOD, params={"symbol": symbol, "from": start, "to": end})


def small_sim(**config: Any) -> MarketSimulator:
    return MarketSimulator(SimulatorConfig(stock_list_size=500, **config))


# -- data --------------------------------------------------------------------------------


def test_two_servers_serve_identical_data() -> None:
    pages = []
    for _ in range(2):
        with MarketSimulator(SimulatorConfig(as_of=AS_OF)) as s, httpx.Client() as c:
            base = s.base_url
            listed = c.get(base + STOCK_LIST).json()
            picks = [row["symbol"] for row in listed[::1500]]
            pages.append(
                (
                    listed,
                    c.get(base + SP500).json(),
                    [c.get(base + EOD, params={"symbol": p}).json() for p in picks],
                    [c.get(base + DCF, params={"symbol": p}).json() for p in picks],
                )
            )
    assert pages[0] == pages[1]
    first_series, second_series = pages[0][2][:2]
    assert [r["close"] for r in first_series] != [r["close"] for r in second_series]


def test_eod_is_newest_first_weekdays_within_range(
    client: httpx.Client, symbols: tuple[str, str]
) -> None:
    start, end = date(2024, 1, 1), date(2024, 3, 31)
    response = eod(client, symbols[0], start.isoformat(), end.isoformat())

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    rows = response.json()
    days = [date.fromisoformat(r["date"]) for r in rows]
    expected = [
        start + timedelta(days=i)
        for i in range((end - start).days + 1)
        if (start + timedelta(days=i)).weekday() < 5
    ]
    assert days == sorted(expected, reverse=True)
    for row in rows:
        assert set(row) == {"symbol", "date", "open", "high", "low", "close", "volume"}
        assert row["symbol"] == symbols[0]
        assert 0 < row["low"] <= min(row["open"], row["close"])
        assert row["high"] >= max(row["open"], row["close"])
        assert isinstance(row["volume"], int)
        assert row["volume"] > 0


def test_eod_without_dates_covers_five_years_to_as_of(
    client: httpx.Client, symbols: tuple[str, str]
) -> None:
    rows = client.get(EOD, params={"symbol": symbols[0]}).json()

    assert rows[0]["date"] == "2024-06-14"  # AS_OF is a Sunday
    assert rows[-1]["date"] == "2019-06-17"  # 2019-06-16 was a Sunday too


def test_eod_of_weekend_only_window_is_empty(
    client: httpx.Client, symbols: tuple[str, str]
) -> None:
    assert eod(client, symbols[0], "2024-06-15", "2024-06-16").json() == []


@pytest.mark.parametrize(
    ("start", "end"),
    [
        pytest.param("2024-13-01", "2024-12-31", id="bad-month"),
        pytest.param("yesterday", "2024-12-31", id="words"),
        pytest.param("2024-01-01", "2024/02/01", id="slashes"),
    ],
)
def test_bad_date_is_400(
    client: httpx.Client, symbols: tuple[str, str], start: str, end: str
) -> None:
    response = eod(client, symbols[0], start, end)

    assert response.status_code == 400
    assert "Error Message" in response.json()


def test_sp500_has_500_members_all_in_stock_list(client: httpx.Client) -> None:
    sp500 = client.get(SP500).json()
    listed = client.get(STOCK_LIST).json()

    assert len(sp500) == 500
    assert len(listed) == 6000
    listed_symbols = {row["symbol"] for row in listed}
    assert len(listed_symbols) == 6000
    assert {row["symbol"] for row in sp500} <= listed_symbols
    assert all(re.fullmatch(r"[A-Z]{2,5}", s) for s in listed_symbols)
    assert all(set(row) == {"symbol", "companyName"} for row in listed)
    assert set(sp500[0]) == {
        "symbol",
        "name",
        "sector",
        "subSector",
        "headQuarter",
        "dateFirstAdded",
        "cik",
        "founded",
    }


def test_dcf_uses_latest_weekday_close(client: httpx.Client, symbols: tuple[str, str]) -> None:
    [entry] = client.get(DCF, params={"symbol": symbols[0]}).json()
    [bar] = eod(client, symbols[0], "2024-06-14", "2024-06-14").json()

    assert entry["symbol"] == symbols[0]
    assert entry["date"] == "2024-06-14"
    assert entry["Stock Price"] == bar["close"]
    assert 0.5 * bar["close"] < entry["dcf"] < 1.5 * bar["close"]


# -- errors, auth ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params", "status"),
    [
        pytest.param(EOD, {"symbol": UNKNOWN}, 404, id="eod-unknown-symbol"),
        pytest.param(DCF, {"symbol": UNKNOWN}, 404, id="dcf-unknown-symbol"),
        pytest.param(EOD, {}, 400, id="eod-missing-symbol"),
        pytest.param(DCF, {"symbol": ""}, 400, id="dcf-empty-symbol"),
        pytest.param("/stable/quote", {"symbol": "AA"}, 404, id="unknown-path"),
        pytest.param("/_sim/nope", {}, 404, id="unknown-control-path"),
    ],
)
def test_request_errors(
    client: httpx.Client, path: str, params: dict[str, str], status: int
) -> None:
    response = client.get(path, params=params)

    assert response.status_code == status
    assert "Error Message" in response.json()


def test_api_key_is_checked() -> None:
    with small_sim(api_key="secret") as s, httpx.Client(base_url=s.base_url) as c:
        wrong = c.get(SP500, params={"apikey": "guess"})
        missing = c.get(SP500)
        right = c.get(SP500, params={"apikey": "secret"})

    assert wrong.status_code == 401
    assert wrong.json()["Error Message"].startswith("Invalid API KEY.")
    assert missing.status_code == 401
    assert right.status_code == 200


# -- faults ------------------------------------------------------------------------------


def _status(code: int) -> Callable[[httpx.Response], None]:
    def check(response: httpx.Response) -> None:
        assert response.status_code == code

    return check


def _retry_after(value: str) -> Callable[[httpx.Response], None]:
    def check(response: httpx.Response) -> None:
        assert response.status_code == 429
        assert response.headers["retry-after"] == value

    return check


def _garbage(response: httpx.Response) -> None:
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.text == "<html>oops</html>"


def _wrong_shape(response: httpx.Response) -> None:
    assert response.status_code == 200
    assert isinstance(response.json(), dict)


def _missing_close(response: httpx.Response) -> None:
    rows = response.json()
    assert rows
    assert all("close" not in row and "open" in row for row in rows)


def _nan_close(response: httpx.Response) -> None:
    assert '"close": NaN' in response.text
    assert all(math.isnan(row["close"]) for row in response.json())


def _negative_close(response: httpx.Response) -> None:
    rows = response.json()
    assert rows
    assert all(row["close"] < 0 for row in rows)


def _empty(response: httpx.Response) -> None:
    assert response.status_code == 200
    assert response.json() == []


def _normal_data(response: httpx.Response) -> None:
    assert response.status_code == 200
    assert len(response.json()) == 23  # weekdays in January 2024


FAULTS = [
    pytest.param("server_error", {}, _status(500), id="server_error"),
    pytest.param("bad_request", {}, _status(400), id="bad_request"),
    pytest.param("not_found", {}, _status(404), id="not_found"),
    pytest.param("unauthorized", {}, _status(401), id="unauthorized"),
    pytest.param("forbidden", {}, _status(403), id="forbidden"),
    pytest.param("rate_limited", {}, _retry_after("1"), id="rate_limited"),
    pytest.param(
        "rate_limited", {"retry_after": 0.2}, _retry_after("0.2"), id="rate_limited-custom"
    ),
    pytest.param("garbage", {}, _garbage, id="garbage"),
    pytest.param("wrong_shape", {}, _wrong_shape, id="wrong_shape"),
    pytest.param("missing_fields", {}, _missing_close, id="missing_fields"),
    pytest.param("nan_price", {}, _nan_close, id="nan_price"),
    pytest.param("negative_price", {}, _negative_close, id="negative_price"),
    pytest.param("empty", {}, _empty, id="empty"),
    pytest.param("slow", {"seconds": 0.01}, _normal_data, id="slow"),
    pytest.param("flaky", {"failures": 1}, _status(503), id="flaky-first-request"),
]


@pytest.mark.parametrize(("kind", "opts", "check"), FAULTS)
def test_fault_hits_only_its_symbol(
    sim: MarketSimulator,
    client: httpx.Client,
    symbols: tuple[str, str],
    kind: str,
    opts: dict[str, Any],
    check: Callable[[httpx.Response], None],
) -> None:
    faulty, healthy = symbols
    sim.set_fault(faulty, kind, **opts)

    check(eod(client, faulty))
    _normal_data(eod(client, healthy))


def test_fault_applies_to_dcf_too(
    sim: MarketSimulator, client: httpx.Client, symbols: tuple[str, str]
) -> None:
    sim.set_fault(symbols[0], "forbidden")

    assert client.get(DCF, params={"symbol": symbols[0]}).status_code == 403


def test_slow_fault_delays_the_answer(
    sim: MarketSimulator, client: httpx.Client, symbols: tuple[str, str]
) -> None:
    sim.set_fault(symbols[0], "slow", seconds=0.3)

    started = time.perf_counter()
    response = eod(client, symbols[0])

    assert time.perf_counter() - started >= 0.3
    _normal_data(response)


def test_reset_fault_drops_the_connection(
    sim: MarketSimulator, client: httpx.Client, symbols: tuple[str, str]
) -> None:
    sim.set_fault(symbols[0], "reset")

    with pytest.raises(httpx.TransportError):
        eod(client, symbols[0])
    _normal_data(eod(client, symbols[1]))
    assert sim.stats()["resets"] == 1


def test_flaky_fails_then_succeeds(
    sim: MarketSimulator, client: httpx.Client, symbols: tuple[str, str]
) -> None:
    sim.set_fault(symbols[0], "flaky", failures=2)

    statuses = [eod(client, symbols[0]).status_code for _ in range(4)]

    assert statuses == [503, 503, 200, 200]
    assert sim.requests_for(symbols[0]) == 4


def test_global_fault_hits_every_endpoint(sim: MarketSimulator, client: httpx.Client) -> None:
    sim.set_global_fault("unauthorized")
    revoked = [client.get(SP500), client.get(STOCK_LIST), eod(client, "AA")]
    sim.clear_global_fault()

    assert [r.status_code for r in revoked] == [401, 401, 401]
    assert client.get(SP500).status_code == 200


def test_fault_arguments_are_validated(sim: MarketSimulator) -> None:
    with pytest.raises(ValueError, match="meltdown"):
        sim.set_fault("AA", "meltdown")
    with pytest.raises(TypeError, match="seconds"):
        sim.set_fault("AA", "flaky", seconds=1)


# -- rates, latency ----------------------------------------------------------------------


def test_rate_limit_per_minute_answers_429_with_retry_after() -> None:
    # 120/min: bursts of 2, then one token every 0.5 s.
    with small_sim(rate_limit_per_minute=120) as s, httpx.Client(base_url=s.base_url) as c:
        first = [c.get(SP500).status_code for _ in range(2)]
        limited = c.get(SP500)
        wait = float(limited.headers["retry-after"])
        time.sleep(wait)
        after_wait = c.get(SP500)

    assert first == [200, 200]
    assert limited.status_code == 429
    assert 0 < wait <= 0.5
    assert after_wait.status_code == 200


def test_rate_limit_error_rate_sends_configured_retry_after() -> None:
    with (
        small_sim(rate_limit_error_rate=1.0, retry_after_seconds=0.2) as s,
        httpx.Client(base_url=s.base_url) as c,
    ):
        response = c.get(SP500)

    assert response.status_code == 429
    assert response.headers["retry-after"] == "0.2"


def test_error_rate_one_gives_only_5xx() -> None:
    with small_sim(error_rate=1.0, seed=7) as s, httpx.Client(base_url=s.base_url) as c:
        statuses = {c.get(SP500).status_code for _ in range(40)}

    assert statuses <= {500, 502, 503, 504}
    assert len(statuses) > 1


def test_latency_is_added() -> None:
    with small_sim(latency_ms=150) as s, httpx.Client(base_url=s.base_url) as c:
        started = time.perf_counter()
        c.get(SP500)

    assert time.perf_counter() - started >= 0.15


# -- stats, lifecycle --------------------------------------------------------------------


def test_stats_count_exactly(
    sim: MarketSimulator, client: httpx.Client, symbols: tuple[str, str]
) -> None:
    a, b = symbols
    sim.set_fault(b, "server_error")
    eod(client, a)
    eod(client, a)
    client.get(DCF, params={"symbol": a})
    client.get(DCF, params={"symbol": UNKNOWN})
    client.get(SP500)
    client.get(STOCK_LIST)
    client.get("/nope")
    client.get(EOD)
    eod(client, b)
    over_http = client.get("/_sim/stats").json()

    expected = {
        "requests": 9,
        "by_endpoint": {
            "historical-price-eod/full": 4,
            "discounted-cash-flow": 2,
            "sp500-constituent": 1,
            "stock-list": 1,
        },
        "by_symbol": {a: 3, b: 1, UNKNOWN: 1},
        "responses": {"200": 5, "400": 1, "404": 2, "500": 1},
        "resets": 0,
        "most_in_flight": 1,  # one client, one request at a time
    }
    assert sim.stats() == expected
    assert over_http == expected
    assert sim.requests_for(a) == 3
    assert sim.requests_for(a, "discounted-cash-flow") == 1
    with pytest.raises(ValueError, match="unknown endpoint"):
        sim.requests_for(a, "quote")

    sim.reset_stats()
    assert sim.stats()["requests"] == 0
    assert sim.stats()["by_symbol"] == {}


def test_in_flight_high_water_mark_and_timeline() -> None:
    config = SimulatorConfig(latency_ms=300, record_timeline=True)
    with MarketSimulator(config) as sim:
        symbol = sim.data.symbols[0]
        # A barrier makes the six requests really concurrent, whatever the thread start-up.
        barrier = threading.Barrier(6)

        def fetch(_: int) -> int:
            with httpx.Client(base_url=sim.base_url, timeout=10) as c:
                barrier.wait()
                return eod(c, symbol).status_code

        with ThreadPoolExecutor(max_workers=6) as pool:
            assert list(pool.map(fetch, range(6))) == [200] * 6
        assert sim.stats()["most_in_flight"] == 6
        served = sim.timeline()
        assert len(served) == 6
        assert {(s.endpoint, s.symbol, s.status) for s in served} == {
            ("historical-price-eod/full", symbol, 200)
        }
        assert all(s.ended - s.started >= 0.3 for s in served)  # the configured latency
        sim.reset_stats()
        assert sim.timeline() == []
        assert sim.stats()["most_in_flight"] == 0


def test_timeline_is_off_by_default(sim: MarketSimulator, client: httpx.Client) -> None:
    eod(client, sim.data.symbols[0])
    assert sim.stats()["requests"] == 1
    assert sim.timeline() == []


def test_many_concurrent_clients(sim: MarketSimulator, symbols: tuple[str, str]) -> None:
    def fetch(i: int) -> list[int]:
        with httpx.Client(base_url=sim.base_url, timeout=10) as c:
            return [eod(c, symbols[i % 2]).status_code for _ in range(5)]

    with ThreadPoolExecutor(max_workers=32) as pool:
        statuses = [s for batch in pool.map(fetch, range(32)) for s in batch]

    assert statuses == [200] * 160
    assert sim.stats()["requests"] == 160


def test_stop_closes_keep_alive_connections() -> None:
    s = small_sim()
    s.start()
    with httpx.Client(base_url=s.base_url) as c:
        assert c.get(SP500).status_code == 200
        s.stop()
        with pytest.raises(httpx.TransportError):
            c.get(SP500)
    with pytest.raises(RuntimeError):
        _ = s.base_url
    s.stop()  # idempotent


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="error_rate"):
        SimulatorConfig(error_rate=1.5)
    with pytest.raises(ValueError, match="stock_list_size"):
        SimulatorConfig(stock_list_size=10)


def test_serve_announces_url_and_exits_cleanly_on_sigterm() -> None:
    code = (
        "from syncpoint.simulator import SimulatorConfig, serve; "
        "serve(SimulatorConfig(stock_list_size=500))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(r"syncpoint simulator listening on (http://127\.0\.0\.1:\d+)\n", line)
        assert match, line
        assert httpx.get(match.group(1) + SP500).status_code == 200
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert stderr == ""
