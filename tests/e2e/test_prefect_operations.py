"""Prefect operations end to end, with real parts only.

`prefect server start` (SQLite, and PostgreSQL through PREFECT_SERVER_DATABASE_CONNECTION_URL),
`prefect work-pool create`, `prefect deploy --all` from the repository root, `prefect worker
start`, runs created through the API like the UI's "Run", `prefect flow-run retry` and
`prefect flow-run cancel` like the UI's buttons, a SIGKILL of the flow run's process, and the
run page in headless Chromium. One test does it all as a person does, in the browser: Custom
run on the deployment's page, the run page while it runs, Retry after the process was
killed. The market API is the simulator; the worker writes data and checkpoints to a SQLite
file that the tests read.

Each test uses its own run date (its own checkpoint) and its own slice of tickers.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

import pytest
import sqlalchemy as sa

from syncpoint.engine.batch_map import fetches_in_flight, unmarked_batches_at_most
from syncpoint.settings import CONCURRENCY
from syncpoint.simulator import FaultKind, MarketSimulator
from tests.e2e.harness import (
    CHROMIUM,
    DCF,
    POOL,
    PRICES,
    Deployed,
    Ledger,
    Stack,
    api,
    artifacts,
    chromium_text,
    collapsed_types,
    engine_process,
    flow_run,
    poll,
    prefect_cli,
    requests_per_ticker,
    retry_from_cli,
    run_log,
    state_history,
    table_rows,
    tickers,
    trigger,
    wait_final,
    wait_state,
    wait_worker_done,
    write_tickers,
)

if TYPE_CHECKING:
    from tests.e2e.browser import Browser

pytestmark = pytest.mark.slow

SQLITE_ONLY = pytest.mark.parametrize("server", ["sqlite"], indirect=True)
BATCH = 5


def _ok(stack: Stack, run: Any) -> str:
    return f"state {run.state.type.value} {run.state.name}: {run.state.message}\n{stack.logs()}"


# --- the nightly schedule --------------------------------------------------------------------


@SQLITE_ONLY
def test_the_server_schedules_the_nightly_run_at_5_utc(deployed: Deployed) -> None:
    """After `prefect deploy --all` the server's scheduler creates the 05:00 UTC runs."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    server = deployed.server

    def scheduled_runs() -> list[Any]:
        broken = [
            line
            for line in server.proc.output().splitlines()
            if "Can't evaluate bulk DML" in line or "InvalidRequestError" in line
        ]
        if broken:
            raise AssertionError(f"the server's scheduler fails: {broken[0]}")
        with api(server) as client:
            return list(
                client.read_flow_runs(
                    deployment_filter=DeploymentFilter(
                        id=DeploymentFilterId(any_=[deployed.deployment.id])
                    ),
                    flow_run_filter=FlowRunFilter(
                        state=FlowRunFilterState(
                            type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])
                        )
                    ),
                )
            )

    runs = poll("auto-scheduled nightly runs", scheduled_runs, 60, interval=1)
    assert all(r.auto_scheduled for r in runs)
    for run in runs:
        start = run.expected_start_time
        assert (start.hour, start.minute, start.utcoffset().total_seconds()) == (5, 0, 0), start
        assert run.parameters == {}


# --- deploy, run, and what the run page shows ----------------------------------------------

BASIC_DATE = "2026-11-20"


@dataclass
class BasicRun:
    id: UUID
    tickers: list[str]
    missing: str  # answered 404 by the API
    run: Any  # the flow run, terminal
    requests: dict[str, tuple[int, int]]  # ticker -> (prices, valuations) requests


@pytest.fixture(scope="module")
def basic_run(stack: Stack) -> BasicRun:
    """One run of the deployment: 40 tickers in batches of 5, one of them unknown to the API."""
    sim = stack.sim
    sim.clear_faults()
    sim.reset_stats()
    symbols = tickers(sim, 0, 40)
    missing = symbols[7]
    sim.set_fault(missing, FaultKind.NOT_FOUND)
    try:
        run_id = trigger(stack, BASIC_DATE, symbols, batch_size=BATCH)
        run = wait_final(stack, run_id)
    finally:
        sim.clear_faults()
    requests = {t: (sim.requests_for(t, PRICES), sim.requests_for(t, DCF)) for t in symbols}
    return BasicRun(run_id, symbols, missing, run, requests)


def test_deploy_then_run_through_the_api(
    deployed: Deployed, stack: Stack, basic_run: BasicRun
) -> None:
    """prefect.yaml deploys as written; a run created through the API completes on the
    worker, with the expected state history, summary, data, persisted task results and
    run page artifacts (progress, summary, failed items).
    """
    deployment = deployed.deployment
    assert "daily-sync/market-nightly" in deployed.deploy_output
    assert deployment.entrypoint == "flows/daily_sync.py:daily_sync"
    assert deployment.work_pool_name == POOL
    assert deployment.parameters == {}
    (schedule,) = deployment.schedules
    assert schedule.active
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 5 * * *", "UTC")

    # The Custom run form's schema, as the server keeps it: one described field each.
    fields = deployment.parameter_openapi_schema["properties"]
    assert fields["run_date"]["format"] == "date"
    for name, field in fields.items():
        assert field.get("description"), (name, field)
        assert "anyOf" not in field, (name, field)

    run, missing = basic_run.run, basic_run.missing
    assert run.state.is_completed(), _ok(stack, run)
    assert run.name == f"daily-sync {BASIC_DATE}"  # named after what it syncs
    assert run.deployment_id == stack.deployment_id
    assert run.run_count == 1
    history = state_history(stack, basic_run.id)
    assert collapsed_types(history) == ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED"], history
    assert [n for _, n, _ in history if n in ("Scheduled", "Pending", "Running", "Completed")] == [
        "Scheduled",
        "Pending",
        "Running",
        "Completed",
    ], history

    # The summary the flow returned, as its checkpoint recorded it.
    ledger = Ledger(stack.data_db)
    status, summary = ledger.run(BASIC_DATE)
    assert status == "completed"
    assert summary["status"] == "completed"
    assert not summary["resumed"]
    for stage in ("prices", "valuations"):
        totals = summary["totals"][stage]
        assert (totals["total"], totals["done"], totals["failed"], totals["pending"]) == (
            40,
            39,
            1,
            0,
        ), summary["totals"]
    assert [f["item"] for f in summary["failures"]] == [missing, missing]

    # Every ticker was asked for once per endpoint, and the data is there.
    assert set(basic_run.requests.values()) == {(1, 1)}, basic_run.requests
    synced = set(basic_run.tickers) - {missing}
    assert ledger.tickers_in("stock_prices") >= synced
    assert ledger.tickers_in("dcf_valuations") >= synced
    assert missing not in ledger.tickers_in("stock_prices")

    # fetch-batch results went to PREFECT_LOCAL_STORAGE_PATH: 8 batches x 2 stages.
    assert len(list(stack.results.glob("syncpoint-fetch-*"))) >= 16

    # The run page.
    by_key = artifacts(stack, basic_run.id)
    assert set(by_key) == {"daily-sync-progress", "daily-sync-summary", "daily-sync-failed-items"}
    (progress,) = by_key["daily-sync-progress"]  # one bar, moved after every batch
    assert float(progress.data) == 100.0
    final = by_key["daily-sync-summary"][-1].data
    assert final.startswith(f"# daily-sync {BASIC_DATE}: completed"), final
    assert "| prices | success | 39 | 1 |" in final, final
    rows = table_rows(by_key["daily-sync-failed-items"][-1])
    failed = {(r["stage"], r["item"]): r for r in rows}
    assert set(failed) == {("prices", missing), ("valuations", missing)}, rows
    for row in failed.values():
        assert "404" in row["reason"], row
        assert row["kind"] == "permanent", row

    if stack.server.backend == "postgres":
        # The server really kept all of it in PostgreSQL.
        assert stack.server.database_url is not None
        url = sa.engine.make_url(stack.server.database_url).set(drivername="postgresql+psycopg")
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            runs = conn.execute(
                sa.text("SELECT count(*) FROM flow_run WHERE id = :id"), {"id": basic_run.id}
            ).scalar_one()
            keys = conn.execute(
                sa.text("SELECT DISTINCT key FROM artifact WHERE flow_run_id = :id"),
                {"id": basic_run.id},
            ).scalars()
            assert runs == 1
            assert set(keys) == set(by_key)
        engine.dispose()


@SQLITE_ONLY
def test_the_run_page_in_headless_chromium(
    stack: Stack, basic_run: BasicRun, tmp_path: Any
) -> None:
    """The Prefect UI renders the run, its artifacts, the progress and the failed items."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
    ui, run_id, missing = stack.server.ui_url, basic_run.id, basic_run.missing
    by_key = artifacts(stack, run_id)
    table = by_key["daily-sync-failed-items"][-1]
    progress = by_key["daily-sync-progress"][-1]

    # The page the flow's log links to ("View at .../runs/flow-run/<id>").
    page = chromium_text(f"{ui}/runs/flow-run/{run_id}", tmp_path / "run")
    for shown in (basic_run.run.name, "Completed", "Artifacts"):
        assert shown in page, page

    # The run page's Artifacts tab (the v2 UI takes the tab from the URL).
    page = chromium_text(f"{ui}/v2/runs/flow-run/{run_id}?tab=Artifacts", tmp_path / "tab")
    for key in ("daily-sync-progress", "daily-sync-summary", "daily-sync-failed-items"):
        assert key in page, page

    # The failed-items table, as a user opens it from the run page.
    page = chromium_text(f"{ui}/artifacts/artifact/{table.id}", tmp_path / "table")
    assert "daily-sync-failed-items" in page, page
    assert re.search(rf"\bprices {missing} permanent 1 .*404", page), page
    assert re.search(rf"\bvaluations {missing} permanent 1 .*404", page), page

    # The progress bar.
    page = chromium_text(f"{ui}/artifacts/artifact/{progress.id}", tmp_path / "progress")
    assert "daily-sync-progress" in page, page
    assert "Progress: 100%" in page, page


# --- a person at the Prefect UI: run, watch, a crash, Retry ---------------------------------

BROWSER_DATE = "2026-11-25"
BROWSER_CONCURRENCY = 2  # two requests in flight: the run lasts while the page is read
PROGRESS_KEY, SUMMARY_KEY = "daily-sync-progress", "daily-sync-summary"


def submit_run_form(page: Browser) -> None:
    """Submit the Custom run form: the page goes back to the deployment's runs once the
    server took the run. If the server failed the form's request instead (5xx or a
    dropped connection: Prefect's own server on SQLite under load; the UI says only
    "Something went wrong"), Submit is pressed once more, as a person would. A refusal
    (4xx) fails at once."""
    for attempt in (1, 2):
        seen = len(page.failed_requests)
        page.click(r"^Submit$")
        outcome = page.wait("the form to be submitted", _form_outcome(page, seen))
        if outcome == "submitted":
            return
        time.sleep(1)  # the rest of the form's requests, if several failed
        failed = _posts_failed(page, seen)
        page.screenshot(f"submit-failed-{attempt}")
        assert not [f for f in failed if re.search(r": 4\d\d$", f)], failed
        assert attempt == 1, failed
        print(f"the server failed the form's requests ({failed}); pressing Submit again")


def _form_outcome(page: Browser, seen: int) -> Callable[[], str | None]:
    """Whether the form was submitted ("submitted") or one of its POSTs failed ("failed")."""

    def outcome() -> str | None:
        if "/run" not in page.evaluate("location.pathname"):
            return "submitted"
        return "failed" if _posts_failed(page, seen) else None

    return outcome


def _posts_failed(page: Browser, since: int) -> list[str]:
    return [f for f in page.failed_requests[since:] if f.startswith("POST ")]


def _the_run_submitted(stack: Stack, run_date: str) -> UUID | None:
    """The deployment's run for `run_date` that was started now (the nightly schedule's
    runs lie ahead: months of them)."""
    from datetime import UTC, datetime, timedelta

    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
    )

    soon = datetime.now(UTC) + timedelta(minutes=5)
    with api(stack.server) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[stack.deployment_id])),
            flow_run_filter=FlowRunFilter(
                expected_start_time=FlowRunFilterExpectedStartTime(before_=soon)
            ),
        )
    found = [r.id for r in runs if (r.parameters or {}).get("run_date") == run_date]
    return found[0] if found else None


@SQLITE_ONLY
def test_a_person_runs_watches_and_retries_a_killed_run_in_the_browser(
    stack: Stack, market: MarketSimulator, screenshots: Path, tmp_path: Path
) -> None:
    """The whole story in headless Chromium, clicking where a person clicks: the
    deployment's page and its Custom run form, the run page while the run works, the run
    page after its process was killed, Retry, and the run page when the retry is done.
    A screenshot of each step is kept (the session's summary prints the folder).
    """
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
    from tests.e2e.browser import browser

    # Slow enough (two requests in flight, 250 ms each) that the run is still working
    # while the page is read and when its process is killed: ~10 s a stage.
    market.config.latency_ms = 250
    symbols = tickers(market, 400, 480)
    path = write_tickers(stack, "browser", symbols)
    ui, ledger = stack.server.ui_url, Ledger(stack.data_db)

    with browser(tmp_path / "chromium", screenshots) as page:
        # The deployment says what it does and when, in its own words.
        page.goto(f"{ui}/deployments/deployment/{stack.deployment_id}")
        page.wait_text("market-nightly")
        page.click(r"^Description$")
        page.wait_text(r"Every day at 05:00 UTC")
        page.screenshot("deployment")

        # Custom run: every parameter described, one field each, a date picker for dates.
        page.click(r"^Run$")
        page.click(r"^Custom run$")
        form = page.wait_text(r"Submit").string
        assert "Property is type" not in form, form
        for described in (
            "The day to sync",
            "Tickers per batch",
            "Requests in flight at once",
            "Stop each stage after this many tickers",
            "Name of a Syncpoint Market API block",
        ):
            assert described in form, form
        assert page.parameter("run_date")["type"] == "date"
        assert page.parameter("batch_size")["type"] == "number"
        page.screenshot("custom-run-form")
        page.fill_parameter("run_date", "11252026")  # mm dd yyyy, as typed
        page.fill_parameter("tickers_file", str(path))
        page.fill_parameter("batch_size", str(BATCH))
        page.fill_parameter("concurrency", str(BROWSER_CONCURRENCY))
        page.screenshot("custom-run-filled")
        submit_run_form(page)
        page.screenshot("submitted")
        run_id = poll(
            "the run the form submitted",
            lambda: _the_run_submitted(stack, BROWSER_DATE),
            60,
            context=stack.logs,
        )
        started = flow_run(stack, run_id)
        assert started.parameters["batch_size"] == BATCH
        assert started.parameters["concurrency"] == BROWSER_CONCURRENCY

        # While it runs: named after what it syncs, one bar and one summary on its page.
        poll(
            "20 tickers stored",
            lambda: len(ledger.items(BROWSER_DATE, "prices")) >= 20,
            180,
            context=stack.logs,
        )
        page.goto(f"{ui}/runs/flow-run/{run_id}")
        page.wait_text(rf"daily-sync {BROWSER_DATE}")
        page.wait_text(r"Running")
        page.wait_text(r"prices: \d+/80 settled")  # a progress line in the run's log
        page.scroll_to(r"^prices: \d+/80 settled")
        page.screenshot("running-log")
        page.click(r"^Artifacts$")
        page.wait_text(PROGRESS_KEY)
        page.wait_text(SUMMARY_KEY)
        page.screenshot("running-artifacts")
        now = artifacts(stack, run_id)
        assert set(now) == {PROGRESS_KEY, SUMMARY_KEY}, now
        (bar,) = now[PROGRESS_KEY]
        (summary,) = now[SUMMARY_KEY]
        assert 0 < float(bar.data) < 100, bar.data
        assert summary.data.startswith(f"# daily-sync {BROWSER_DATE}: running"), summary.data

        # The flow run's process dies (SIGKILL): the worker reports it Crashed.
        engine_process(stack, run_id).kill()
        crashed = wait_final(stack, run_id, timeout=120)
        assert crashed.state.is_crashed(), _ok(stack, crashed)
        done_at_kill = {s: ledger.items(BROWSER_DATE, s) for s in ("prices", "valuations")}
        assert len(done_at_kill["valuations"]) < len(symbols)
        wait_worker_done(stack, run_id, attempts=1)  # see test_a_crashed_run_retried...
        page.goto(f"{ui}/runs/flow-run/{run_id}")
        page.wait_text(r"Crashed")
        page.screenshot("crashed")

        # Retry, from the run page, as a person does it.
        market.config.latency_ms = 0
        market.reset_stats()
        page.click(r"^Retry$")
        page.click(r"^Retry$", scope="[role=dialog]")
        page.screenshot("retry-pressed")
        final = wait_final(stack, run_id)
        assert final.state.is_completed(), _ok(stack, final)
        page.goto(f"{ui}/runs/flow-run/{run_id}")
        page.wait_text(r"Completed")
        page.wait_text(rf"daily-sync {BROWSER_DATE} completed in [\d.]+ s \(resumed\)")
        page.scroll_to(r"^Finished in state Completed")
        page.screenshot("retried-log")
        page.click(r"^Artifacts$")
        page.wait_text(r"\(attempt 2\)")  # the cards' descriptions name the attempt
        page.screenshot("retried-artifacts")
        after = artifacts(stack, run_id)
        assert set(after) == {PROGRESS_KEY, SUMMARY_KEY}, after  # nothing failed
        (bar,) = after[PROGRESS_KEY]
        (summary,) = after[SUMMARY_KEY]
        page.goto(f"{ui}/artifacts/artifact/{summary.id}")
        page.wait_text(r"Attempt 2 of this flow run \(a retry\); attempt 1 ended Crashed")
        page.screenshot("retried-summary")

    # The page is the retry's: a full bar, and figures that replace the killed attempt's.
    assert float(bar.data) == 100.0
    assert summary.data.startswith(f"# daily-sync {BROWSER_DATE}: completed")
    status, recorded = ledger.run(BROWSER_DATE)
    assert (status, recorded["resumed"]) == ("completed", True)
    # Honest figures: the requests the retry reports are the requests the API received;
    # batches the killed attempt had fetched came back from the fetch cache instead.
    assert recorded["requests"] == market.stats()["requests"], (recorded, market.stats())
    for stage, endpoint in (("prices", PRICES), ("valuations", DCF)):
        sent = requests_per_ticker(market, symbols, endpoint)
        assert not {t for t, n in sent.items() if n} & done_at_kill[stage]  # done: not again
        figures = next(s for s in recorded["stages"] if s["name"] == stage)
        assert figures["requests"] == sum(sent.values()), (stage, figures, sent)
        left = len(symbols) - len(done_at_kill[stage])
        # Every ticker left was fetched now or given back by the cache, none twice.
        assert set(sent.values()) <= {0, 1}, sent
        assert sum(sent.values()) + BATCH * figures["batches_reused"] >= left
        assert figures["batches_reused"] <= unmarked_batches_at_most(BROWSER_CONCURRENCY, BATCH)
    assert_every_ticker_synced(stack, symbols)

    # The log: no per-task state lines, and the last word is the run's own summary, then
    # Prefect's state line.
    log = run_log(stack, run_id)
    assert not [e for e in log if e.task_run_id and e.message.startswith("Finished in state")]
    said = [e.message for e in log if e.task_run_id is None]
    assert said[-1] == "Finished in state Completed()", said[-3:]
    assert said[-2].startswith(f"daily-sync {BROWSER_DATE} completed in "), said[-3:]
    assert f"{recorded['requests']} API requests" in said[-2]


# --- failure, crash and cancellation, each followed by a retry that resumes ----------------

FAILED_DATE, CRASHED_DATE, CANCELLED_DATE, AUTO_RETRY_DATE, REFUSED_DATE = (
    "2026-11-21",
    "2026-11-22",
    "2026-11-23",
    "2026-11-24",
    "2026-11-26",
)


def assert_every_ticker_synced(stack: Stack, symbols: list[str]) -> None:
    ledger = Ledger(stack.data_db)
    assert ledger.tickers_in("stock_prices") >= set(symbols)
    assert ledger.tickers_in("dcf_valuations") >= set(symbols)


@SQLITE_ONLY
def test_a_failed_run_retried_from_the_cli_fetches_no_done_ticker_again(
    stack: Stack, market: MarketSimulator
) -> None:
    """401 on a ticker of batch 6 fails the run; `prefect flow-run retry` resumes."""
    symbols = tickers(market, 40, 120)
    rejected = symbols[27]  # in batch 6 of 16: batches 1-5 are done before it
    market.set_fault(rejected, FaultKind.UNAUTHORIZED)
    run_id = trigger(stack, FAILED_DATE, symbols, batch_size=BATCH)
    first = wait_final(stack, run_id)
    assert first.state.is_failed(), _ok(stack, first)
    assert "rejected the key" in (first.state.message or ""), first.state.message

    ledger = Ledger(stack.data_db)
    status, summary = ledger.run(FAILED_DATE)
    assert status == "failed", summary
    assert "rejected the key" in summary["error"], summary
    done_first = ledger.items(FAILED_DATE, "prices")
    assert set(symbols[:25]) <= done_first
    assert rejected not in done_first
    # Batches fetched beside the 401's may finish (their requests went out before it);
    # none beyond the pipeline's depth was ever started: the 401 stopped the stage.
    started_at_most = 25 + fetches_in_flight(CONCURRENCY, BATCH) * BATCH
    assert not done_first & set(symbols[started_at_most:])
    page = artifacts(stack, run_id)["daily-sync-summary"][-1].data
    assert page.startswith(f"# daily-sync {FAILED_DATE}: failed"), page

    market.clear_faults()
    retry_from_cli(stack, run_id)  # at once, like a user clicking Retry on the failed run
    final = wait_final(stack, run_id)
    assert final.state.is_completed(), _ok(stack, final)
    assert final.run_count == 2
    history = state_history(stack, run_id)
    assert collapsed_types(history) == [
        "SCHEDULED",
        "PENDING",
        "RUNNING",
        "FAILED",
        "SCHEDULED",
        "PENDING",
        "RUNNING",
        "COMPLETED",
    ], history
    assert ("SCHEDULED", "Scheduled", "Retried via CLI") in history

    prices = requests_per_ticker(market, symbols, PRICES)
    assert {t: prices[t] for t in done_first if prices[t] != 1} == {}  # never fetched again
    assert prices == {t: 2 if t == rejected else 1 for t in symbols}  # the 401, then its data
    assert set(requests_per_ticker(market, symbols, DCF).values()) == {1}
    status, summary = ledger.run(FAILED_DATE)
    assert status == "completed", summary
    assert summary["resumed"], summary
    assert_every_ticker_synced(stack, symbols)
    page = artifacts(stack, run_id)["daily-sync-summary"][-1].data
    assert page.startswith(f"# daily-sync {FAILED_DATE}: completed"), page


@SQLITE_ONLY
def test_a_crashed_run_retried_refetches_at_most_two_batches(
    stack: Stack, market: MarketSimulator
) -> None:
    """SIGKILL of the flow run's process: the worker reports Crashed; a retry resumes."""
    market.config.latency_ms = 300
    symbols = tickers(market, 100, 200)
    run_id = trigger(stack, CRASHED_DATE, symbols, batch_size=BATCH)
    ledger = Ledger(stack.data_db)
    poll(
        "20 tickers stored before the kill",
        lambda: len(ledger.items(CRASHED_DATE, "prices")) >= 20,
        180,
        context=stack.logs,
    )
    engine = engine_process(stack, run_id)
    assert "prefect.engine" in " ".join(engine.cmdline())
    engine.kill()

    crashed = wait_final(stack, run_id, timeout=120)
    assert crashed.state.is_crashed(), _ok(stack, crashed)
    assert "SIGKILL" in (crashed.state.message or ""), crashed.state.message
    done_at_kill = ledger.items(CRASHED_DATE, "prices")
    assert 20 <= len(done_at_kill) < len(symbols)
    assert ledger.run(CRASHED_DATE)[0] == "running"  # left behind by the dead process

    market.config.latency_ms = 0
    # Prefect 3.8 reports a crashed attempt twice, the second time ~10 s later when the
    # worker has torn down its watchers; a retry before that gets a spurious "Crashed"
    # (state history: ... Submitting, Crashed, Running, Completed) and pollers see a
    # terminal state while the retry runs. Wait for the worker, as an operator must.
    wait_worker_done(stack, run_id, attempts=1)
    retry_from_cli(stack, run_id)
    final = wait_final(stack, run_id)
    assert final.state.is_completed(), _ok(stack, final)
    history = state_history(stack, run_id)
    assert collapsed_types(history) == [
        "SCHEDULED",
        "PENDING",
        "RUNNING",
        "CRASHED",
        "SCHEDULED",
        "PENDING",
        "RUNNING",
        "COMPLETED",
    ], history

    prices = requests_per_ticker(market, symbols, PRICES)
    refetched = {t for t, n in prices.items() if n > 1}
    assert not refetched & done_at_kill  # a ticker marked done is never fetched again
    # Only the batches a crash can find fetched-but-unmarked.
    assert len(refetched) <= unmarked_batches_at_most(CONCURRENCY, BATCH) * BATCH, sorted(refetched)
    assert min(prices.values()) == 1
    assert set(requests_per_ticker(market, symbols, DCF).values()) == {1}
    status, summary = ledger.run(CRASHED_DATE)
    assert status == "completed", summary
    assert summary["resumed"], summary
    assert_every_ticker_synced(stack, symbols)
    # The retry took over the killed attempt's bar and summary: one of each, the retry's.
    page = artifacts(stack, run_id)
    assert set(page) == {"daily-sync-progress", "daily-sync-summary"}
    (progress,) = page["daily-sync-progress"]
    (summary,) = page["daily-sync-summary"]
    assert float(progress.data) == 100.0
    assert summary.data.startswith(f"# daily-sync {CRASHED_DATE}: completed")
    assert "attempt 1 ended Crashed" in summary.data


@SQLITE_ONLY
def test_a_cancelled_run_stops_cleanly_and_its_retry_refetches_nothing(
    stack: Stack, market: MarketSimulator
) -> None:
    """`prefect flow-run cancel` sends SIGTERM to the flow run's process; syncpoint's handler
    finishes the batches in flight and flushes the checkpoint; Prefect ends the run Cancelled.
    """
    # Slow enough that the run is still going when the cancel lands, seconds later.
    market.config.latency_ms = 250
    symbols = tickers(market, 200, 300)
    run_id = trigger(stack, CANCELLED_DATE, symbols, batch_size=BATCH)
    ledger = Ledger(stack.data_db)
    poll(
        "10 tickers stored before the cancel",
        lambda: len(ledger.items(CANCELLED_DATE, "prices")) >= 10,
        180,
        context=stack.logs,
    )
    cancel = prefect_cli(["flow-run", "cancel", str(run_id)], stack.server.cli_env())
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr

    cancelled = wait_final(stack, run_id, timeout=120)
    assert cancelled.state.is_cancelled(), _ok(stack, cancelled)
    assert "SIGTERM received" in stack.worker.output()  # our handler, not a hard kill
    status, summary = ledger.run(CANCELLED_DATE)
    assert status == "partial", summary
    assert (summary["interrupted"], summary["signal"]) == ("interrupted by SIGTERM", 15)
    done = {s: ledger.items(CANCELLED_DATE, s) for s in ("prices", "valuations")}
    assert len(done["prices"]) >= 10
    assert len(done["valuations"]) < len(symbols)
    for stage, table in (("prices", "stock_prices"), ("valuations", "dcf_valuations")):
        assert summary["totals"][stage]["done"] == len(done[stage])  # flushed as it stopped
        assert done[stage] <= ledger.tickers_in(table)  # marks never ahead of the data

    # The run's own log says what happened, in the UI's terms, as it happened and at the end.
    by_cancel = "Cancel on this run's page (or `prefect flow-run cancel`)"
    said = [e.message for e in run_log(stack, run_id) if e.task_run_id is None]
    (announced,) = [m for m in said if m.startswith(f"{by_cancel}: no new batch starts")]
    # Counted when the Cancel came: the batches in flight were done after it.
    told = re.search(r"Press Retry on this run to continue \(it skips the (\d+) items", announced)
    assert told, announced
    assert 10 <= int(told[1]) <= len(done["prices"]) + len(done["valuations"])
    (last,) = [m for m in said if m.startswith(f"daily-sync {CANCELLED_DATE} partial")]
    assert f"Stopped by {by_cancel}." in last, last
    assert "syncpoint run" not in last  # no shell command for a run started from the UI
    assert summary["stopped_by"] == by_cancel
    (page,) = artifacts(stack, run_id)["daily-sync-summary"]
    assert f"Stopped by {by_cancel}." in page.data

    market.config.latency_ms = 0
    retry_from_cli(stack, run_id)  # `prefect flow-run retry` accepts a Cancelled run
    final = wait_final(stack, run_id)
    assert final.state.is_completed(), _ok(stack, final)
    history = state_history(stack, run_id)
    assert collapsed_types(history) == [
        "SCHEDULED",
        "PENDING",
        "RUNNING",
        "CANCELLING",
        "CANCELLED",
        "SCHEDULED",
        "PENDING",
        "RUNNING",
        "COMPLETED",
    ], history
    # A clean stop loses nothing: every ticker was fetched exactly once over both attempts.
    assert set(requests_per_ticker(market, symbols, PRICES).values()) == {1}
    assert set(requests_per_ticker(market, symbols, DCF).values()) == {1}
    assert ledger.run(CANCELLED_DATE)[0] == "completed"
    assert_every_ticker_synced(stack, symbols)


@SQLITE_ONLY
def test_an_automatic_flow_retry_resumes_what_failed_transiently(
    stack: Stack, market: MarketSimulator
) -> None:
    """SYNCPOINT_FLOW_RETRIES (the flow decorator's retries) in the run's environment: two
    tickers the API answers 500 past their retries and the stage's second pass leave the
    run partial, which fails the Prefect run; Prefect waits AwaitingRetry, and the retry
    fetches those two tickers only.
    """
    symbols = tickers(market, 300, 340)
    flaky = symbols[12:14]
    for ticker in flaky:
        market.set_fault(ticker, FaultKind.SERVER_ERROR)
    run_id = trigger(
        stack,
        AUTO_RETRY_DATE,
        symbols,
        batch_size=BATCH,
        env={
            "SYNCPOINT_FLOW_RETRIES": "1",
            "SYNCPOINT_FLOW_RETRY_DELAY_SECONDS": "6",
            "SYNCPOINT_RETRY_COOLDOWN_SECONDS": "0.5",
        },
    )
    wait_state(stack, run_id, lambda s: s.name == "AwaitingRetry", "AwaitingRetry", 240)
    market.clear_faults()
    final = wait_final(stack, run_id)
    assert final.state.is_completed(), _ok(stack, final)
    names = [n for _, n, _ in state_history(stack, run_id)]
    assert "AwaitingRetry" in names, names
    assert names[-1] == "Completed", names

    for endpoint in (PRICES, DCF):
        requests = requests_per_ticker(market, symbols, endpoint)
        assert {t: n for t, n in requests.items() if n != 1} == {t: requests[t] for t in flaky}, (
            requests
        )  # every other ticker was fetched once, in the first attempt
        assert all(requests[t] > 2 for t in flaky), requests
    assert Ledger(stack.data_db).run(AUTO_RETRY_DATE)[0] == "completed"
    assert_every_ticker_synced(stack, symbols)


@SQLITE_ONLY
def test_a_refused_key_fails_once_explained_without_automatic_retries(
    stack: Stack, market: MarketSimulator
) -> None:
    """The API refuses the key: waiting five minutes would change nothing, so the run fails
    at once despite SYNCPOINT_FLOW_RETRIES, and its log says so in a few lines, without a
    traceback, counting the request the refusal answered."""
    symbols = tickers(market, 340, 360)
    market.set_global_fault(FaultKind.UNAUTHORIZED)
    try:
        run_id = trigger(
            stack,
            REFUSED_DATE,
            symbols,
            batch_size=BATCH,
            env={"SYNCPOINT_FLOW_RETRIES": "2", "SYNCPOINT_FLOW_RETRY_DELAY_SECONDS": "6"},
        )
        final = wait_final(stack, run_id)
    finally:
        market.clear_global_fault()
    assert final.state.is_failed(), _ok(stack, final)
    names = [n for _, n, _ in state_history(stack, run_id)]
    assert "AwaitingRetry" not in names, names

    sent = market.stats()["requests"]
    # Only what was in flight met the refusal: the slots bound it, and so do the batches.
    assert 1 <= sent <= min(CONCURRENCY, fetches_in_flight(CONCURRENCY, BATCH) * BATCH)
    log = run_log(stack, run_id)
    assert not [e.message for e in log if "Traceback" in e.message], log
    said = [e.message for e in log if e.task_run_id is None]
    (last,) = [m for m in said if m.startswith(f"daily-sync {REFUSED_DATE} failed")]
    assert f"{sent} API requests" in last, (last, sent)
    assert any("Not retried automatically" in m for m in said), said
    status, summary = Ledger(stack.data_db).run(REFUSED_DATE)
    assert (status, summary["requests"]) == ("failed", sent)
