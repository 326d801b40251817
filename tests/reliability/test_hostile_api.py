"""Hostile and broken APIs: a run never hangs, never crashes on one answer, never leaks.

A market API of our own on loopback answers normally for most tickers and with one
misbehaviour per bad ticker: Retry-After 999999 and inf on a 429, an HTML page, an empty
body, truncated JSON, an object where a list belongs, 204, a connection reset mid-body, a
301 to another host (a second server that records whether the key reached it), a 20 MB
body, a body trickled one byte at a time, an error body echoing the key, and one full of
control characters. The real `syncpoint` command syncs them; the cases that need bounds
tighter than the defaults (a 1 s wait cap, a 2 s request deadline) run the same flow
in-process with a Syncpoint Market API block, as a deployment would. For every case, from
one table: the run ends on its own within a bound, with no traceback; every normal ticker
is stored exactly as served; the bad ticker is listed in `syncpoint status --json` with
a readable reason; and a rerun (the transient faults healed) completes.

Then a DIP-style documents API whose entities each misbehave in one way a cursor stream
can: empty pages under fresh cursors with a constant numFound, a repeated cursor, the same
page again, a cursor that never changes while documents keep coming, and numFound that
grows with every page. The loop guard must end each window with a warning, keep what was
read, and the rerun must complete.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from syncpoint.blocks.market_api import MarketApi
from syncpoint.core.db import dispose_engines
from syncpoint.core.http import DEFAULT_MAX_RESPONSE_BYTES
from syncpoint.engine.job_run import RunIncomplete
from syncpoint.tasks.segments import IDLE_PAGES
from tests.conftest import cli_env, run_cli, table_rows, tickers_file
from tests.reliability.hostile_server import (
    DCF,
    PRICES,
    LoopbackApi,
    Request,
    Timer,
    dcf_body,
    run_status,
    served_bars,
    served_prices,
    stored_prices,
)
from tests.reliability.test_secrets import (
    Evidence,
    assert_nowhere,
    prefect_records,
    prefect_server_db,
    sqlite_rows_text,
)

pytestmark = pytest.mark.slow

DAY = date(2026, 11, 20)  # a Friday
START = DAY - timedelta(days=5)  # the nightly default window
KEY = "hostile-KEY-7d1c55e0a93b"
PERMANENT, TRANSIENT = "permanent", "transient"
CLI, BLOCK = "cli", "block"
# The block run's bounds: small, so that a wait the API asks for that escaped them shows.
MAX_WAIT = 1.0
DEADLINE = 2.0
ATTEMPTS = 2
HUGE_BYTES = 20 * 1000 * 1000
TRICKLE_EVERY = 0.1  # seconds per byte: far below any per-read timeout
RUN_BOUND = {CLI: 100.0, BLOCK: 45.0}  # seconds; the default wait cap alone is 120


# --- the misbehaviours, one per ticker ------------------------------------------------


def normal_prices(request: Request) -> None:
    start = date.fromisoformat(request.query["from"])
    end = date.fromisoformat(request.query["to"])
    request.reply(200, json.dumps(served_bars(request.symbol, start, end)))


def bars_json(request: Request) -> bytes:
    return json.dumps(served_bars(request.symbol, START, DAY)).encode()


def html_page(request: Request) -> None:
    page = "<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>"
    request.reply(200, page, content_type="text/html")


def empty_body(request: Request) -> None:
    request.reply(200, b"")


def truncated_json(request: Request) -> None:
    body = bars_json(request)
    request.reply(200, body[: len(body) // 2])


def object_for_list(request: Request) -> None:
    wrapped = {"symbol": request.symbol, "historical": served_bars(request.symbol, START, DAY)}
    request.reply(200, json.dumps(wrapped))


def no_content(request: Request) -> None:
    request.reply(204)


def reset_mid_body(request: Request) -> None:
    body = bars_json(request)
    request.head(200, {"Content-Type": "application/json", "Content-Length": str(len(body))})
    request.send(body[: len(body) // 3])
    time.sleep(0.05)  # let the first part arrive before the reset
    request.reset()


def redirect_elsewhere(request: Request) -> None:
    # Where a moved API might point: another host, the key carried along in the query.
    other = request.api.redirect_to  # type: ignore[attr-defined]
    target = f"{other}{PRICES}?symbol={request.symbol}&apikey={request.query.get('apikey')}"
    request.reply(301, "", headers={"Location": target})


def huge_body(request: Request) -> None:
    """20 MB of plausible JSON, no Content-Length: only reading it tells its size."""
    # A small send buffer (it also stops the kernel growing it): what the server counts as
    # sent is then close to what the client took in.
    request.handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    request.head(200, {"Content-Type": "application/json"})
    bar = json.dumps(served_bars(request.symbol, START, DAY)[0]).encode() + b","
    chunk = bar * (65536 // len(bar))
    request.send(b"[")
    sent = 1
    while sent < HUGE_BYTES:
        request.send(chunk)
        sent += len(chunk)
    request.api.finished.add(request.symbol)  # type: ignore[attr-defined]


def trickle(request: Request) -> None:
    """A complete answer's headers, then its body one byte at a time, for as long as the
    client keeps the connection open (or the server closes)."""
    body = bars_json(request)
    request.head(200, {"Content-Type": "application/json", "Content-Length": str(len(body))})
    began = time.monotonic()
    try:
        for byte in body:
            if request.api.closing.wait(TRICKLE_EVERY):
                return
            request.send(bytes([byte]))
    finally:
        request.api.held.append(time.monotonic() - began)  # type: ignore[attr-defined]


def key_echo(request: Request) -> None:
    key = request.query.get("apikey", "")
    request.reply(402, f"Invalid key {key} for this plan", content_type="text/plain")


CONTROL_BODY = "Bad request \x1b[2J\x1b[31mALERT\x1b[0m\x07\x08 \u202eevil\r\nX-Injected: yes"


def control_characters(request: Request) -> None:
    request.reply(400, CONTROL_BODY, content_type="text/plain; charset=utf-8")


def retry_after(value: str) -> Callable[[Request], None]:
    def answer(request: Request) -> None:
        request.reply(429, '{"Error Message": "Limit Reach"}', headers={"Retry-After": value})

    return answer


@dataclass(frozen=True)
class Case:
    """One misbehaviour on one ticker's prices, the run it belongs to, and its outcome."""

    ticker: str
    answer: Callable[[Request], None]
    run: str  # CLI: the real command, default bounds; BLOCK: in-process, tight bounds
    kind: str  # the error kind the ledger records: PERMANENT or TRANSIENT
    reason: str  # a regex the recorded reason matches; {other} is the redirect's host


def _case(case_id: str, *values: Any) -> Any:
    return pytest.param(Case(*values), id=case_id)


CASES = [
    _case("html-200", "HTML", html_page, CLI, PERMANENT,
          r"answered 200 with a body that is not JSON"),
    _case("empty-200", "EMPTY", empty_body, CLI, PERMANENT,
          r"answered 200 with an empty body"),
    _case("truncated-json", "TRUNC", truncated_json, CLI, PERMANENT,
          r"answered 200 with a body that is not JSON \(.+\)"),
    _case("object-for-list", "OBJECT", object_for_list, CLI, PERMANENT,
          r"^OBJECT: expected a JSON list of objects, got dict$"),
    _case("204-no-content", "NOBODY", no_content, CLI, PERMANENT,
          r"answered 204 with an empty body"),
    _case("reset-mid-body", "RESET", reset_mid_body, CLI, TRANSIENT,
          r"symbol=RESET.* (ReadError|RemoteProtocolError) \(.+\)"),
    _case("301-to-another-host", "MOVED", redirect_elsewhere, CLI, PERMANENT,
          r"answered 301, a redirect to {other}: not followed, so the key never goes"),
    _case("20mb-body", "HUGE", huge_body, CLI, PERMANENT,
          rf"answered more than {DEFAULT_MAX_RESPONSE_BYTES} bytes \(max_response_bytes\)"),
    _case("error-echoes-key", "ECHO", key_echo, CLI, PERMANENT,
          r"apikey=\*\*\* answered 402: Invalid key \*\*\* for this plan$"),
    _case("control-characters", "CTRL", control_characters, CLI, PERMANENT,
          r"answered 400: Bad request \\x1b\[2J\\x1b\[31mALERT\\x1b\[0m\\x07\\x08 "
          r"\\u202eevil\\x0d\\x0aX-Injected: yes$"),
    _case("retry-after-999999", "WAIT", retry_after("999999"), BLOCK, TRANSIENT,
          r"symbol=WAIT.* answered 429$"),
    _case("retry-after-inf", "FOREVER", retry_after("inf"), BLOCK, TRANSIENT,
          r"symbol=FOREVER.* answered 429$"),
    _case("trickle", "TRICKLE", trickle, BLOCK, TRANSIENT,
          rf"no complete answer within the {DEADLINE:g}s request deadline"),
]  # fmt: skip
ALL = [p.values[0] for p in CASES]
# Normal tickers around the bad ones in name order: batches of 4 mix both kinds.
NORMAL = ["AAPL", "DELL", "GOOG", "IBM", "MSFT", "NVDA", "ORCL", "SAP", "TSLA", "XOM"]


class HostileMarket(LoopbackApi):
    """FMP-style prices and valuations; the cases' tickers get their misbehaviour on the
    prices endpoint until healed. Valuations are normal for everyone."""

    def __init__(self, cases: list[Case], redirect_to: str) -> None:
        super().__init__(self._answer)
        self.faults = {c.ticker: c.answer for c in cases}
        self.redirect_to = redirect_to
        self.finished: set[str] = set()  # huge bodies sent to their end
        self.held: list[float] = []  # how long each trickled answer was read

    def _answer(self, request: Request) -> None:
        if request.path == PRICES:
            fault = self.faults.get(request.symbol)
            (fault or normal_prices)(request)
        elif request.path == DCF:
            request.reply(200, dcf_body(request.symbol, DAY))
        else:
            request.reply(404, '{"Error Message": "unknown endpoint"}')

    def heal(self, tickers: list[str]) -> None:
        for ticker in tickers:
            self.faults.pop(ticker, None)


def elsewhere_answer(request: Request) -> None:
    request.reply(200, "[]")


@dataclass
class MarketRun:
    """A first run with every case of one kind of run, a rerun once the transient faults
    are healed, and everything both left behind."""

    cases: list[Case]
    api: HostileMarket
    elsewhere: LoopbackApi
    database: str
    first_seconds: float
    first_code: int
    first_output: str
    first_status: dict[str, Any]
    first_requests: dict[tuple[str, str], int]
    first_prices: list[tuple[Any, ...]]
    first_sent: dict[str, int]  # body bytes the server handed the kernel, per ticker
    rerun_seconds: float = 0.0
    rerun_code: int = -1
    rerun_output: str = ""
    rerun_status: dict[str, Any] = field(default_factory=dict)
    rerun_requests: dict[tuple[str, str], int] = field(default_factory=dict)
    evidence: Evidence = field(default_factory=Evidence)
    # Seconds between one ticker's successive requests in the first run.
    gaps: dict[str, list[float]] = field(default_factory=dict)

    def failures(self, status: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {f["item"]: f for f in status["failures"] if f["stage"] == "prices"}


def cases_of(run: str) -> list[Case]:
    return [c for c in ALL if c.run == run]


def universe(cases: list[Case]) -> list[str]:
    return sorted([*NORMAL, *(c.ticker for c in cases)])


@pytest.fixture(scope="module")
def since() -> datetime:
    return datetime.now(UTC)


@pytest.fixture(scope="module")
def cli_run(
    prefect_api: str, since: datetime, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MarketRun]:
    """The real command: `syncpoint run daily-sync` with the built-in bounds."""
    cases = cases_of(CLI)
    workdir = tmp_path_factory.mktemp("hostile-cli")
    database = f"sqlite:///{workdir / 'sync.db'}"
    with (
        LoopbackApi(elsewhere_answer) as elsewhere,
        HostileMarket(cases, elsewhere.base_url) as api,
    ):
        env = cli_env(
            prefect_api,
            MARKET_API_URL=api.base_url,
            MARKET_API_KEY=KEY,
            SYNCPOINT_DATABASE_URL=database,
            SYNCPOINT_RETRY_COOLDOWN_SECONDS="0.2",
        )
        args = ["run", "daily-sync", "--date", DAY.isoformat(), "--batch-size", "4"]
        args += ["--tickers-file", str(tickers_file(workdir, universe(cases)))]

        with Timer() as first_time:
            first = run_cli(args, env, workdir, timeout=RUN_BOUND[CLI] + 60)
        run = MarketRun(
            cases,
            api,
            elsewhere,
            database,
            first_time.seconds,
            first.returncode,
            first.stdout + first.stderr,
            run_status(env, workdir),
            dict(api.requests),
            stored_prices(database),
            dict(api.sent),
        )
        run.evidence.add("first run", first)
        text_status = run_cli(["status", "daily-sync", "--failures", "100"], env, workdir)
        assert text_status.returncode == 0, text_status.stderr
        run.evidence.add("status", text_status)

        api.heal([c.ticker for c in cases if c.kind == TRANSIENT])
        api.clear()
        with Timer() as rerun_time:
            rerun = run_cli(args, env, workdir, timeout=RUN_BOUND[CLI] + 60)
        run.rerun_seconds, run.rerun_code = rerun_time.seconds, rerun.returncode
        run.rerun_output = rerun.stdout + rerun.stderr
        run.rerun_status = run_status(env, workdir)
        run.rerun_requests = dict(api.requests)
        run.evidence.add("rerun", rerun)
        status_json = run_cli(["status", "--json", "--failures", "100"], env, workdir)
        run.evidence.add("status --json", status_json)
        run.evidence.texts["database rows"] = sqlite_rows_text(workdir / "sync.db")
        yield run


@pytest.fixture(scope="module")
def block_run(
    prefect_api: str, since: datetime, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MarketRun]:
    """The cases that need tight bounds: the same flow in-process with a Market API block
    (the command has no block option), as a deployment run would load one."""
    cases = cases_of(BLOCK)
    workdir = tmp_path_factory.mktemp("hostile-block")
    database = f"sqlite:///{workdir / 'sync.db'}"
    file = str(tickers_file(workdir, universe(cases)))
    from syncpoint.flows.daily_sync import daily_sync

    with (
        LoopbackApi(elsewhere_answer) as elsewhere,
        HostileMarket(cases, elsewhere.base_url) as api,
        pytest.MonkeyPatch.context() as env,
    ):
        env.setenv("SYNCPOINT_DATABASE_URL", database)
        env.setenv("SYNCPOINT_RETRY_COOLDOWN_SECONDS", "0.2")
        MarketApi(
            base_url=api.base_url,
            api_key=SecretStr(KEY),
            max_attempts=ATTEMPTS,
            max_wait_seconds=MAX_WAIT,
            request_deadline_seconds=DEADLINE,
            concurrency=8,
        ).save("hostile-tight-bounds", overwrite=True)

        def sync() -> tuple[float, int, dict[str, Any]]:
            with Timer() as took:
                state = daily_sync(
                    run_date=DAY.isoformat(),
                    tickers_file=file,
                    batch_size=4,
                    market_api_block="hostile-tight-bounds",
                    return_state=True,
                )
            dispose_engines()
            outcome = state.result(raise_on_failure=False)
            if isinstance(outcome, RunIncomplete):
                return took.seconds, 3, outcome.summary
            assert state.is_completed(), outcome
            assert isinstance(outcome, dict), outcome
            return took.seconds, 0, outcome

        cli = cli_env(prefect_api, SYNCPOINT_DATABASE_URL=database)
        seconds, code, summary = sync()
        run = MarketRun(
            cases,
            api,
            elsewhere,
            database,
            seconds,
            code,
            json.dumps(summary, default=str),
            run_status(cli, workdir),
            dict(api.requests),
            stored_prices(database),
            dict(api.sent),
        )
        run.gaps = {c.ticker: gaps(api.arrivals(PRICES, c.ticker)) for c in cases}
        api.heal([c.ticker for c in cases if c.kind == TRANSIENT])
        api.clear()
        run.rerun_seconds, run.rerun_code, summary = sync()
        run.rerun_output = json.dumps(summary, default=str)
        run.rerun_status = run_status(cli, workdir)
        run.rerun_requests = dict(api.requests)
        yield run


def gaps(arrivals: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(arrivals)]


def market_run(request: pytest.FixtureRequest, case: Case) -> MarketRun:
    return request.getfixturevalue("cli_run" if case.run == CLI else "block_run")


# --- the market API: each case ------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_each_bad_answer_costs_its_ticker_with_a_readable_reason(
    request: pytest.FixtureRequest, case: Case
) -> None:
    run = market_run(request, case)
    failure = run.failures(run.first_status).get(case.ticker)
    assert failure is not None, f"{case.ticker} is not listed: {run.first_status['failures']}"
    assert failure["error_kind"] == case.kind, failure
    reason = case.reason.replace("{other}", re.escape(run.elsewhere.base_url))
    assert re.search(reason, failure["error"]), failure["error"]
    assert failure["error"].isprintable(), failure
    assert len(failure["error"]) < 400, failure
    assert KEY not in failure["error"]
    assert case.ticker not in {r[0] for r in run.first_prices}
    # The next stage went on for it: its valuation is stored.
    assert case.ticker in {r[0] for r in table_rows(run.database, "dcf_valuations", "ticker, date")}

    rerun = run.failures(run.rerun_status)
    if case.kind == TRANSIENT:
        # Healed upstream: the rerun asks for it alone, once, and stores what was served.
        assert case.ticker not in rerun, rerun.get(case.ticker)
        assert run.rerun_requests.get((PRICES, case.ticker)) == 1
        stored = [r for r in stored_prices(run.database) if r[0] == case.ticker]
        assert stored == served_prices([case.ticker], START, DAY)
    else:
        # A permanent failure is never worth another request, in the run or the rerun.
        assert run.first_requests[PRICES, case.ticker] == 1
        assert (PRICES, case.ticker) not in run.rerun_requests
        assert rerun[case.ticker]["error"] == failure["error"]


@pytest.mark.parametrize("kind", [CLI, BLOCK])
def test_the_run_ends_on_its_own_and_every_normal_ticker_is_stored_as_served(
    request: pytest.FixtureRequest, kind: str
) -> None:
    run: MarketRun = request.getfixturevalue(f"{kind}_run")
    transient = any(c.kind == TRANSIENT for c in run.cases)
    assert run.first_code == (3 if transient else 0), run.first_output
    assert run.first_seconds < RUN_BOUND[kind], f"the run took {run.first_seconds:.0f}s"
    assert "Traceback" not in run.first_output
    assert run.first_status["status"] == ("partial" if transient else "completed")
    assert set(run.failures(run.first_status)) == {c.ticker for c in run.cases}
    assert run.first_prices == served_prices(NORMAL, START, DAY)
    # Each normal ticker was asked for once per stage: no bad answer cost another one.
    for ticker in NORMAL:
        assert run.first_requests[PRICES, ticker] == run.first_requests[DCF, ticker] == 1

    assert run.rerun_code == 0, run.rerun_output
    assert run.rerun_seconds < RUN_BOUND[kind], f"the rerun took {run.rerun_seconds:.0f}s"
    assert "Traceback" not in run.rerun_output
    assert run.rerun_status["status"] == "completed"
    healed = [c.ticker for c in run.cases if c.kind == TRANSIENT]
    assert stored_prices(run.database) == served_prices([*NORMAL, *healed], START, DAY)
    assert set(run.rerun_requests) == {(PRICES, t) for t in healed}


def test_the_cli_prints_each_bad_ticker_and_its_kind(cli_run: MarketRun) -> None:
    for case in cli_run.cases:
        assert f"prices/{case.ticker}: {case.kind}" in cli_run.first_output


def test_a_redirect_to_another_host_never_takes_the_key_there(cli_run: MarketRun) -> None:
    assert cli_run.first_requests[PRICES, "MOVED"] == 1
    assert cli_run.elsewhere.seen == []  # not followed: nothing at all reached it


def test_a_20_mb_body_is_refused_while_it_streams(cli_run: MarketRun) -> None:
    # The client hung up at the cap: the server could hand the kernel only that much and
    # what the (small) socket buffers took beyond it, never the whole body.
    assert "HUGE" not in cli_run.api.finished
    sent = cli_run.first_sent["HUGE"]
    assert DEFAULT_MAX_RESPONSE_BYTES < sent < DEFAULT_MAX_RESPONSE_BYTES + 4 * 2**20, sent


def test_control_characters_are_escaped_where_status_prints_them(cli_run: MarketRun) -> None:
    status = cli_run.evidence.texts["status stdout"]
    assert "CTRL" in status
    assert "ALERT" in status
    for char in "\x1b\x07\x08\r\u202e":
        assert char not in status, repr(char)
    assert "\\x1b[31mALERT" in status


def test_the_key_echoed_by_an_error_body_appears_nowhere(
    cli_run: MarketRun, since: datetime
) -> None:
    # The haystack is real: the echo was served with the key, and its reason was stored.
    assert cli_run.first_requests[PRICES, "ECHO"] == 1
    assert "Invalid key *** for this plan" in cli_run.evidence.texts["database rows"]
    # The command has exited: its logs and artifacts are on the server already.
    records = prefect_records(since, expect=[])
    evidence = Evidence(cli_run.evidence.texts | {f"prefect {k}": v for k, v in records.items()})
    assert "Invalid key *** for this plan" in evidence.texts["prefect artifacts"]
    home = Path(os.environ["PREFECT_HOME"])
    workdir = Path(cli_run.database.removeprefix("sqlite:///")).parent
    assert_nowhere(KEY, evidence, workdir, prefect_server_db(), home)


def test_waits_the_api_asks_for_are_capped_and_a_trickle_is_cut_at_the_deadline(
    block_run: MarketRun,
) -> None:
    """The block's bounds held: Retry-After 999999 and inf waited MAX_WAIT, not forever,
    and the trickling answer was dropped at the request deadline."""
    for ticker in ("WAIT", "FOREVER"):
        # Two attempts per pass, two passes (the second after the cool-down).
        assert block_run.first_requests[PRICES, ticker] == 2 * ATTEMPTS
        # Between attempts of a pass: the capped Retry-After, and at most the limiter's
        # capped pause that a 429 of the other ticker added meanwhile.
        within = [g for i, g in enumerate(block_run.gaps[ticker]) if (i + 1) % ATTEMPTS]
        assert max(within) < 2 * MAX_WAIT + 1.0, block_run.gaps
        assert min(within) >= 0.95 * MAX_WAIT, block_run.gaps  # honoured, up to the cap
    assert block_run.first_requests[PRICES, "TRICKLE"] == 2 * ATTEMPTS
    assert len(block_run.api.held) == 2 * ATTEMPTS
    assert max(block_run.api.held) < DEADLINE + 1.5, block_run.api.held


# --- the documents API: each way a cursor stream can misbehave -------------------------

RECORDS, PAGE = 30, 10
ENDLESS_PAGES = 100  # the server's own bound: a stream nobody stops ends here
DIP_BOUND = 90.0  # seconds, for a run of all eight entities


def dip_record(entity: str, index: int) -> dict[str, Any]:
    return {
        "id": str(100_000 + index),
        "aktualisiert": "2026-11-10T12:00:00+01:00",
        "datum": "2026-11-10",
        "titel": f"{entity} record {index}",
    }


Page = tuple[list[int], str, int]  # record indexes, the cursor answered, numFound


def normal_page(n: int, sent: str | None) -> Page:
    """Page n of RECORDS; past the last one DIP's end: no records, the cursor sent."""
    indexes = list(range(n * PAGE, min((n + 1) * PAGE, RECORDS)))
    return indexes, f"c{n + 1}" if indexes else (sent or "*"), RECORDS


def empty_pages(n: int, sent: str | None) -> Page:
    # After the first page: nothing, under a new cursor each time, numFound unmoved.
    return normal_page(n, sent) if n == 0 else ([], f"c{n + 1}", RECORDS)


def repeated_cursor(n: int, sent: str | None) -> Page:
    indexes, cursor, found = normal_page(n, sent)
    return indexes, "c1" if n == 2 else cursor, found


def same_page_again(n: int, sent: str | None) -> Page:
    return normal_page(0, sent)[0], f"c{n + 1}", RECORDS


def frozen_cursor(n: int, sent: str | None) -> Page:
    # New records on every page, always under the same cursor.
    return list(range(n * PAGE, (n + 1) * PAGE)), "c1", RECORDS


def numfound_grows(n: int, sent: str | None) -> Page:
    # New records on every page, and numFound grows by a page with each one.
    if n >= ENDLESS_PAGES:
        return [], sent or "*", RECORDS + n * PAGE
    return list(range(n * PAGE, (n + 1) * PAGE)), f"c{n + 1}", RECORDS + (n + 1) * PAGE


@dataclass(frozen=True)
class StreamCase:
    entity: str
    pages: Callable[[int, str | None], Page]
    guard: str  # a regex the loop guard's reason matches
    kept: int  # the first `kept` records were served before the loop: all are stored
    max_requests: int  # the guard stopped it by then


def _stream(case_id: str, *values: Any, marks: Any = ()) -> Any:
    return pytest.param(StreamCase(*values), id=case_id, marks=marks)


STREAM_CASES = [
    _stream("empty-pages-fresh-cursors", "drucksache", empty_pages,
            rf"^{IDLE_PAGES} pages in a row without records \(numFound 30\)$",
            PAGE, 1 + IDLE_PAGES),
    _stream("repeated-cursor", "vorgang", repeated_cursor,
            r"^the API repeated cursor 'c1'$", RECORDS, 3),
    _stream("same-page-again", "aktivitaet", same_page_again,
            r"^the API sent a page of 10 records it had sent before$", PAGE, 2),
    _stream("cursor-never-changes", "plenarprotokoll", frozen_cursor,
            r"^the API repeated cursor 'c1'$", 2 * PAGE, 2),
    # numFound's growth counts toward the page bound only up to half the records read.
    _stream("numfound-grows-every-page", "vorgangsposition", numfound_grows,
            r"pages read, more than numFound \d+ allows", RECORDS, ENDLESS_PAGES // 2),
]  # fmt: skip
HOSTILE_ENTITIES = {p.values[0].entity for p in STREAM_CASES}
NORMAL_ENTITIES = ["person", "drucksache-text", "plenarprotokoll-text"]


class HostileDip(LoopbackApi):
    """DIP's /api/v1/{entity} with cursor paging; each case's entity misbehaves until
    healed. Remembers every record id it served, per entity."""

    def __init__(self, cases: list[StreamCase]) -> None:
        super().__init__(self._answer)
        self.pages = {c.entity: c.pages for c in cases}
        self.served: defaultdict[str, set[str]] = defaultdict(set)

    def _answer(self, request: Request) -> None:
        entity = request.path.removeprefix("/api/v1/")
        sent = request.query.get("cursor")
        n = int(sent[1:]) if sent and sent != "*" else 0
        indexes, cursor, found = self.pages.get(entity, normal_page)(n, sent)
        documents = [dip_record(entity, i) for i in indexes]
        with self._lock:
            self.served[entity].update(d["id"] for d in documents)
        body = {"numFound": found, "documents": documents, "cursor": cursor}
        request.reply(200, json.dumps(body))

    def heal(self) -> None:
        self.pages.clear()

    def asked(self, entity: str) -> int:
        return self.requests[f"/api/v1/{entity}", ""]


@dataclass
class DipRun:
    api: HostileDip
    database: Path
    first: Any
    first_seconds: float
    first_status: dict[str, dict[str, Any]]
    first_requests: dict[str, int]
    first_stored: dict[str, set[str]]
    rerun: Any = None
    rerun_seconds: float = 0.0
    rerun_status: dict[str, dict[str, Any]] = field(default_factory=dict)


def dip_stored(database: Path) -> dict[str, set[str]]:
    with sqlite3.connect(database) as conn:
        rows = conn.execute("SELECT entity, id FROM dip_documents").fetchall()
    stored: defaultdict[str, set[str]] = defaultdict(set)
    for entity, rid in rows:
        stored[entity].add(rid)
    return stored


def dip_status(env: dict[str, str], cwd: Path) -> dict[str, dict[str, Any]]:
    result = run_cli(["status", "document-sync", "--json"], env, cwd)
    assert result.returncode == 0, result.stderr
    return {row["entity"]: row for row in json.loads(result.stdout)}


@pytest.fixture(scope="module")
def dip_run(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DipRun]:
    """`syncpoint run document-sync --all`: every entity's stream from its own checkpoint,
    one misbehaviour per hostile entity; then, healed, the same command again."""
    workdir = tmp_path_factory.mktemp("hostile-dip")
    database = workdir / "docs.db"
    with HostileDip([p.values[0] for p in STREAM_CASES]) as api:
        env = cli_env(
            prefect_api, DIP_API_URL=api.base_url, SYNCPOINT_DATABASE_URL=f"sqlite:///{database}"
        )
        args = ["run", "document-sync", "--all"]
        with Timer() as took:
            first = run_cli(args, env, workdir, timeout=DIP_BOUND + 60)
        entities = [*HOSTILE_ENTITIES, *NORMAL_ENTITIES]
        run = DipRun(
            api,
            database,
            first,
            took.seconds,
            dip_status(env, workdir),
            {e: api.asked(e) for e in entities},
            dip_stored(database),
        )
        api.heal()
        api.clear()
        with Timer() as again:
            run.rerun = run_cli(args, env, workdir, timeout=DIP_BOUND + 60)
        run.rerun_seconds = again.seconds
        run.rerun_status = dip_status(env, workdir)
        yield run


def normal_ids(count: int = RECORDS) -> set[str]:
    return {str(100_000 + i) for i in range(count)}


def test_every_stream_ends_on_its_own_and_the_normal_entities_complete(dip_run: DipRun) -> None:
    output = dip_run.first.stdout + dip_run.first.stderr
    assert dip_run.first.returncode == 3, output  # partial: the guarded windows are open
    assert dip_run.first_seconds < DIP_BOUND, f"the run took {dip_run.first_seconds:.0f}s"
    assert "Traceback" not in output
    for entity in NORMAL_ENTITIES:
        assert dip_run.first_status[entity]["status"] == "completed"
        assert dip_run.first_status[entity]["loop_guard"] is None
        assert dip_run.first_stored[entity] == normal_ids()
        assert dip_run.first_requests[entity] == RECORDS // PAGE + 1  # and the end

    rerun = dip_run.rerun.stdout + dip_run.rerun.stderr
    assert dip_run.rerun.returncode == 0, rerun
    assert dip_run.rerun_seconds < DIP_BOUND
    assert "Traceback" not in rerun
    assert {row["status"] for row in dip_run.rerun_status.values()} == {"completed"}


@pytest.mark.parametrize("case", STREAM_CASES)
def test_the_loop_guard_ends_each_misbehaving_stream_and_keeps_what_was_read(
    dip_run: DipRun, case: StreamCase
) -> None:
    status = dip_run.first_status[case.entity]
    assert status["status"] == "partial", status
    assert re.search(case.guard, status["loop_guard"] or ""), status
    # The window stays open: the next run reads it again rather than skip what was lost.
    assert status["watermark"] == "the beginning"
    warning = f"{case.entity}: the loop guard ended the stream: {status['loop_guard']}"
    assert warning in dip_run.first.stderr
    assert dip_run.first_requests[case.entity] <= case.max_requests
    stored = dip_run.first_stored[case.entity]
    assert normal_ids(case.kept) <= stored
    assert stored <= dip_run.api.served[case.entity]  # nothing invented

    # Healed upstream, the rerun reads the window again, to its end.
    healed = dip_run.rerun_status[case.entity]
    assert (healed["status"], healed["loop_guard"]) == ("completed", None), healed
    assert healed["watermark"] != "the beginning"
    assert normal_ids() <= dip_stored(dip_run.database)[case.entity]
