"""Every error class the market API can throw, end to end against the simulator.

One real `syncpoint run` carries many faulted symbols at once (one fault kind per
symbol); each table row then asserts what happened to its own symbol: recovered (done),
or failed for good with the reason recorded in the ledger, while the run completes.
Separate runs cover what changes the run's outcome: a persistent 5xx (partial, exit 3,
then resumed), a rejected key (exit 1 at once) and a timeout (a block with a short one).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from syncpoint.blocks.market_api import MarketApi
from syncpoint.core.db import dispose_engines
from syncpoint.core.ledger import ItemStatus, Ledger
from syncpoint.engine.job_run import RunIncomplete
from syncpoint.simulator import MarketSimulator, SimulatorConfig
from tests.conftest import cli_env, run_cli, table_rows, tickers_file

DAY = "2026-11-20"  # a Friday: the default 5-day price window holds five weekdays
PRICES = "historical-price-eod/full"
DCF = "discounted-cash-flow"
STAGES = ("prices", "valuations")


@dataclass(frozen=True)
class Case:
    """One fault kind on one symbol and what each stage must end with."""

    kind: str
    opts: dict[str, Any] = field(default_factory=dict)
    # Clear the fault once the simulator has seen this many requests for the symbol.
    heal_after: int | None = None
    # Per stage: None = done, else a substring of the recorded permanent reason.
    prices: str | None = None
    valuations: str | None = None
    # The stages this row asserts (both, unless a kind is judged per stage).
    stages: tuple[str, ...] = STAGES


def _p(case_id: str, case: Case, *marks: Any) -> Any:
    return pytest.param(case, id=case_id, marks=marks)


CASES = [
    # Transient: retried inside the run until the API behaves again.
    _p("server_error-recovers", Case("server_error", heal_after=2)),
    _p("rate_limited-recovers", Case("rate_limited", {"retry_after": 0.2}, heal_after=2)),
    _p("reset-recovers", Case("reset", heal_after=2)),
    _p("slow-within-timeout", Case("slow", {"seconds": 1.0})),
    _p("flaky-2-recovers", Case("flaky", {"failures": 2})),
    # Permanent: the item fails with its reason, nothing is retried, the run goes on.
    _p("bad_request", Case("bad_request", prices="answered 400", valuations="answered 400")),
    _p("not_found", Case("not_found", prices="answered 404", valuations="answered 404")),
    _p("garbage", Case("garbage", prices="not JSON", valuations="not JSON")),
    _p(
        "wrong_shape",
        Case("wrong_shape", prices="expected a JSON list", valuations="expected a JSON list"),
    ),
    _p(
        "missing_fields",
        Case("missing_fields", prices="lacks 'close'", valuations="lacks 'dcf'"),
    ),
    _p("nan_price", Case("nan_price", prices="close is nan", valuations="dcf is nan")),
    _p(
        "negative_price",
        Case("negative_price", prices="non-positive price", valuations="non-positive"),
    ),
    # `empty` answers [] for the symbol on every endpoint: the API knows the symbol but
    # has no data for it. For a window that holds five weekdays that is not a successful
    # sync: the item must fail with a reason, not be marked done with nothing stored.
    _p("empty-valuations", Case("empty", valuations="no DCF valuation", stages=("valuations",))),
    _p("empty-prices", Case("empty", prices="no prices in the requested", stages=("prices",))),
]


class Healer(threading.Thread):
    """Clears a symbol's fault once the simulator has counted `n` requests for it."""

    def __init__(self, sim: MarketSimulator, heal: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.sim, self.heal, self.stopped = sim, dict(heal), threading.Event()

    def run(self) -> None:
        while self.heal and not self.stopped.is_set():
            for symbol, n in list(self.heal.items()):
                if self.sim.requests_for(symbol) >= n:
                    self.sim.clear_fault(symbol)
                    del self.heal[symbol]
            time.sleep(0.005)


@dataclass
class MixedRun:
    sim: MarketSimulator
    url: str
    symbols: dict[str, Case]  # faulted symbol -> its case
    healthy: list[str]
    result: Any
    status: dict[str, Any]
    stats: dict[str, Any]

    def symbol_of(self, case: Case) -> str:
        return next(s for s, c in self.symbols.items() if c is case)


def _status_json(env: dict[str, str], cwd: Path) -> list[dict[str, Any]]:
    result = run_cli(["status", "--json", "--failures", "500"], env, cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def mixed(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MixedRun]:
    cases = [p.values[0] for p in CASES]
    workdir = tmp_path_factory.mktemp("mixed")
    with MarketSimulator(SimulatorConfig()) as sim:
        universe = list(sim.data.symbols[100 : 100 + len(cases) + 8])
        faulted = dict(zip(universe, cases, strict=False))
        healthy = universe[len(cases) :]
        for symbol, case in faulted.items():
            sim.set_fault(symbol, case.kind, **case.opts)
        healer = Healer(sim, {s: c.heal_after for s, c in faulted.items() if c.heal_after})
        healer.start()
        env = cli_env(prefect_api, MARKET_API_URL=sim.base_url)
        try:
            result = run_cli(
                [
                    "run",
                    "daily-sync",
                    "--date",
                    DAY,
                    "--tickers-file",
                    str(tickers_file(workdir, universe)),
                    "--batch-size",
                    "6",
                    "--concurrency",
                    "4",
                ],
                env,
                workdir,
            )
        finally:
            healer.stopped.set()
            healer.join()
        status = _status_json(env, workdir)
        yield MixedRun(
            sim,
            f"sqlite:///{workdir / 'syncpoint.db'}",
            faulted,
            healthy,
            result,
            status[0],
            sim.stats(),
        )


def test_mixed_faults_run_completes_with_exit_0(mixed: MixedRun) -> None:
    out = mixed.result.stdout + mixed.result.stderr
    assert mixed.result.returncode == 0, out
    assert "COMPLETED" in mixed.result.stdout
    assert "Traceback" not in mixed.result.stderr
    assert mixed.status["status"] == "completed"
    engine = sa.create_engine(mixed.url)
    try:
        ledger = Ledger(engine)
        run_id = mixed.status["run_id"]
        for stage in STAGES:
            assert ledger.pending(run_id, stage) == [], stage
            done = set(ledger.items(run_id, stage, ItemStatus.DONE))
            assert set(mixed.healthy) <= done, stage
    finally:
        engine.dispose()
    for symbol in mixed.healthy:
        assert mixed.sim.requests_for(symbol, PRICES) == 1, symbol
        assert mixed.sim.requests_for(symbol, DCF) == 1, symbol
    prices = {r[0] for r in table_rows(mixed.url, "stock_prices", "ticker, date")}
    assert set(mixed.healthy) <= prices


@pytest.mark.parametrize("case", CASES)
def test_fault_class_outcome_per_symbol(mixed: MixedRun, case: Case) -> None:
    symbol = mixed.symbol_of(case)
    failures = {(f["stage"], f["item"]): f for f in mixed.status["failures"]}
    rows = {
        "prices": {r[0] for r in table_rows(mixed.url, "stock_prices", "ticker, date")},
        "valuations": {r[0] for r in table_rows(mixed.url, "dcf_valuations", "ticker, date")},
    }
    engine = sa.create_engine(mixed.url)
    try:
        ledger = Ledger(engine)
        done = {
            stage: set(ledger.items(mixed.status["run_id"], stage, ItemStatus.DONE))
            for stage in STAGES
        }
    finally:
        engine.dispose()

    for stage, endpoint, reason in (
        ("prices", PRICES, case.prices),
        ("valuations", DCF, case.valuations),
    ):
        if stage not in case.stages:
            continue
        requests = mixed.sim.requests_for(symbol, endpoint)
        if reason is None:
            assert symbol in done[stage], f"{stage}: {failures.get((stage, symbol))}"
            assert (stage, symbol) not in failures
            assert symbol in rows[stage], f"{stage}: done but nothing stored"
        else:
            failure = failures.get((stage, symbol))
            assert failure is not None, f"{stage}/{symbol} is not recorded as failed"
            assert failure["error_kind"] == "permanent", failure
            assert reason in failure["error"], failure
            assert symbol not in rows[stage]
            assert f"{stage}/{symbol}: permanent" in mixed.result.stdout
            # A permanent error is never worth a second request.
            assert requests == 1, f"{stage}: {requests} requests"
    if case.heal_after or case.kind == "flaky":
        # It really failed before it recovered: the retries happened inside this run.
        assert mixed.sim.requests_for(symbol, PRICES) >= 3


# --- a persistent 5xx: partial now, the next run asks only for what is left -----------


def test_persistent_server_error_is_partial_then_the_next_run_fetches_only_it(
    prefect_api: str, tmp_path: Path
) -> None:
    with MarketSimulator(SimulatorConfig()) as sim:
        universe = list(sim.data.symbols[300:308])
        broken = universe[3]
        sim.set_fault(broken, "server_error")
        env = cli_env(prefect_api, MARKET_API_URL=sim.base_url)
        args = [
            "run",
            "daily-sync",
            "--date",
            DAY,
            "--tickers-file",
            str(tickers_file(tmp_path, universe)),
            "--batch-size",
            "3",
        ]

        first = run_cli(args, env, tmp_path)
        assert first.returncode == 3, first.stdout + first.stderr
        assert "PARTIAL" in first.stdout
        assert "run the same command again" in first.stdout
        # Five attempts, then five more in the second pass after the cool-down.
        assert sim.requests_for(broken, PRICES) == 2 * 5
        status = _status_json(env, tmp_path)[0]
        assert status["status"] == "partial"
        for stage in STAGES:
            assert status["stages"][stage]["retrying"] == 1
            assert status["stages"][stage]["done"] == len(universe) - 1
        failures = {(f["stage"], f["item"]): f for f in status["failures"]}
        assert set(failures) == {("prices", broken), ("valuations", broken)}
        for failure in failures.values():
            assert failure["error_kind"] == "transient"
            assert "500" in failure["error"]

        sim.clear_faults()
        sim.reset_stats()
        second = run_cli(args, env, tmp_path)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "COMPLETED (resumed)" in second.stdout
        stats = sim.stats()
        assert stats["by_symbol"] == {broken: 2}
        assert stats["requests"] == 2
    assert _status_json(env, tmp_path)[0]["status"] == "completed"
    assert broken in {
        r[0] for r in table_rows(f"sqlite:///{tmp_path / 'syncpoint.db'}", "dcf_valuations")
    }


# --- a refused key: stop at once, exit 1, never print the key ------------------------

KEY = "refused-key-Zq81xVw3"


@pytest.mark.parametrize(
    ("kind", "scope"),
    [
        pytest.param("unauthorized", "symbol", id="401-on-one-symbol"),
        pytest.param("forbidden", "symbol", id="403-on-one-symbol"),
        pytest.param("unauthorized", "global", id="401-on-every-request"),
    ],
)
def test_refused_key_stops_the_run_at_once(
    prefect_api: str, tmp_path: Path, kind: str, scope: str
) -> None:
    concurrency = 2
    with MarketSimulator(SimulatorConfig()) as sim:
        universe = list(sim.data.symbols[400:412])
        position = 6 if scope == "symbol" else 0  # the first request to be refused
        if scope == "symbol":
            sim.set_fault(universe[position], kind)
        else:
            sim.set_global_fault(kind)
        env = cli_env(prefect_api, MARKET_API_URL=sim.base_url, MARKET_API_KEY=KEY)
        result = run_cli(
            [
                "run",
                "daily-sync",
                "--date",
                DAY,
                "--tickers-file",
                str(tickers_file(tmp_path, universe)),
                "--batch-size",
                str(len(universe)),  # one batch: the stop must happen inside it
                "--concurrency",
                str(concurrency),
            ],
            env,
            tmp_path,
        )
        stats = sim.stats()

    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "rejected the key" in result.stderr
    assert KEY not in out
    assert "Traceback" not in result.stderr
    refused = stats["responses"].get("401", 0) + stats["responses"].get("403", 0)
    assert refused >= 1
    # Only requests already in flight when the refusal came back may still go out (the
    # one batch holds all 12 tickers); nothing is retried, valuations never start.
    if scope == "symbol":
        assert refused == 1, stats
        assert stats["by_endpoint"][PRICES] <= position + 1 + concurrency, stats
    else:
        assert stats["by_endpoint"][PRICES] <= concurrency, stats
    assert stats["by_endpoint"][DCF] == 0, stats
    status = _status_json(env, tmp_path)[0]
    assert status["status"] == "failed"
    assert KEY not in json.dumps(status)


def test_a_second_pass_recovers_what_outlasted_its_retries(
    prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outage longer than one item's retries but shorter than the cool-down costs
    nothing: the run completes in one go, no rerun needed."""
    from syncpoint.flows.daily_sync import daily_sync

    url = f"sqlite:///{tmp_path / 'sync.db'}"
    monkeypatch.setenv("SYNCPOINT_DATABASE_URL", url)
    monkeypatch.setenv("SYNCPOINT_RETRY_COOLDOWN_SECONDS", "1")
    with MarketSimulator(SimulatorConfig()) as sim:
        universe = list(sim.data.symbols[520:526])
        flaky = universe[2]
        sim.set_fault(flaky, "server_error")
        monkeypatch.setenv("MARKET_API_URL", sim.base_url)
        healer = Healer(sim, {flaky: 5})  # healed once its five attempts are spent
        healer.start()
        try:
            summary = daily_sync(
                run_date=DAY, tickers_file=str(tickers_file(tmp_path, universe)), batch_size=3
            )
        finally:
            healer.stopped.set()
            healer.join()
            dispose_engines()
        assert sim.requests_for(flaky, PRICES) == 6  # five refused, one in the second pass
    assert summary["status"] == "completed"
    assert {r[0] for r in table_rows(url, "stock_prices", "ticker, date")} == set(universe)


def test_transient_failures_left_over_trigger_the_flows_automatic_retry(
    prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a nightly deployment sees: the first attempt ends with a transient failure
    left, Prefect retries the flow run, and the retry resumes and completes."""
    from prefect.client.orchestration import get_client

    from syncpoint.flows.daily_sync import daily_sync

    url = f"sqlite:///{tmp_path / 'sync.db'}"
    monkeypatch.setenv("SYNCPOINT_DATABASE_URL", url)
    with MarketSimulator(SimulatorConfig()) as sim:
        universe = list(sim.data.symbols[530:534])
        flaky = universe[1]
        sim.set_fault(flaky, "server_error")
        monkeypatch.setenv("MARKET_API_URL", sim.base_url)
        healer = Healer(sim, {flaky: 10})  # outlasts both passes of the first attempt
        healer.start()
        try:
            flow = daily_sync.with_options(retries=1, retry_delay_seconds=0)
            state = flow(
                run_date=DAY,
                tickers_file=str(tickers_file(tmp_path, universe)),
                return_state=True,
            )
        finally:
            healer.stopped.set()
            healer.join()
            dispose_engines()
        assert sim.requests_for(flaky, PRICES) == 11
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(state.state_details.flow_run_id).run_count == 2
    assert {r[0] for r in table_rows(url, "stock_prices", "ticker, date")} == set(universe)


# --- slow beyond the timeout: configurable through the Market API block ---------------


def test_timeouts_are_retried_and_a_persistent_one_is_transient(
    prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from syncpoint.flows.daily_sync import daily_sync

    url = f"sqlite:///{tmp_path / 'sync.db'}"
    monkeypatch.setenv("SYNCPOINT_DATABASE_URL", url)
    with MarketSimulator(SimulatorConfig()) as sim:
        universe = list(sim.data.symbols[500:506])
        recovers, stuck = universe[1], universe[4]
        sim.set_fault(recovers, "slow", seconds=3.0)
        sim.set_fault(stuck, "slow", seconds=3.0)
        MarketApi(
            base_url=sim.base_url,
            timeout_seconds=0.5,
            max_attempts=3,
            concurrency=4,
        ).save("reliability-short-timeout", overwrite=True)
        healer = Healer(sim, {recovers: 1})
        healer.start()
        try:
            # Transient failures left after the second pass fail the Prefect run, so a
            # deployment's automatic retries pick it up; the summary rides on the error.
            with pytest.raises(RunIncomplete) as raised:
                daily_sync(
                    run_date=DAY,
                    tickers_file=str(tickers_file(tmp_path, universe)),
                    batch_size=3,
                    market_api_block="reliability-short-timeout",
                )
        finally:
            healer.stopped.set()
            healer.join()
            dispose_engines()
        assert sim.requests_for(recovers, PRICES) >= 2
        # max_attempts of the block, in the first pass and again in the second.
        assert sim.requests_for(stuck, PRICES) == 2 * 3

    summary = raised.value.summary
    assert summary["status"] == "partial"
    failures = {(f["stage"], f["item"]): f for f in summary["failures"]}
    assert set(failures) == {("prices", stuck), ("valuations", stuck)}
    for failure in failures.values():
        assert failure["error_kind"] == "transient"
        assert "Timeout" in failure["error"]
    stored = {r[0] for r in table_rows(url, "stock_prices", "ticker, date")}
    assert stored == set(universe) - {stuck}
