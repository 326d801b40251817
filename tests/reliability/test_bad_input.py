"""Bad input through the real `syncpoint` command: clear one-line errors, nothing corrupted.

Usage and configuration mistakes exit 2 with one line on stderr and leave an existing
database exactly as it was; bad tickers inside a good file are skipped with a reason
while the good ones sync.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from syncpoint.core.errors import ConfigError
from syncpoint.simulator import MarketSimulator, SimulatorConfig
from tests.conftest import cli_env, run_cli, table_rows, tickers_file

DAY = "2026-11-20"
TABLES = {"stock_prices", "dcf_valuations", "sync_logs", "sync_runs", "sync_items"}


@pytest.fixture(scope="module")
def sim() -> Iterator[MarketSimulator]:
    with MarketSimulator(SimulatorConfig()) as market:
        yield market


@pytest.fixture
def env(prefect_api: str, sim: MarketSimulator) -> dict[str, str]:
    return cli_env(prefect_api, MARKET_API_URL=sim.base_url)


def good(sim: MarketSimulator, start: int, n: int = 4) -> list[str]:
    return list(sim.data.symbols[start : start + n])


def run_args(file: Path, *extra: str, day: str = DAY) -> list[str]:
    return ["run", "daily-sync", "--date", day, "--tickers-file", str(file), *extra]


def stderr_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def assert_one_line_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = stderr_lines(result)
    assert len(lines) == 1, result.stderr
    assert message in lines[0], lines[0]
    assert lines[0].startswith("syncpoint: "), lines[0]


def sqlite_dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, after an integrity check: the file must still open."""
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {
            name: sorted(conn.execute(f'SELECT * FROM "{name}"').fetchall(), key=repr)
            for name in names
        }
    finally:
        conn.close()


def url_dump(url: str) -> dict[str, list[tuple[Any, ...]]]:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            names = sa.inspect(conn).get_table_names()
            return {
                name: sorted(
                    (tuple(r) for r in conn.execute(sa.text(f'SELECT * FROM "{name}"'))), key=repr
                )
                for name in names
            }
    finally:
        engine.dispose()


def status(env: dict[str, str], cwd: Path) -> list[dict[str, Any]]:
    result = run_cli(["status", "--json", "--failures", "100"], env, cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- usage and configuration errors: exit 2, one line, the database untouched -----------


@pytest.fixture(scope="module")
def workdir(
    prefect_api: str, sim: MarketSimulator, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A directory whose syncpoint.core.db holds a partial run of DAY (2 of 6 tickers done)."""
    directory = tmp_path_factory.mktemp("existing")
    file = tickers_file(directory, good(sim, 600, 6))
    env = cli_env(prefect_api, MARKET_API_URL=sim.base_url)
    result = run_cli(run_args(file, "--max-items", "2"), env, directory)
    assert result.returncode == 3, result.stdout + result.stderr
    return directory


def _prepare_target(kind: str, directory: Path) -> str:
    if kind == "dir":
        (directory / "is-a-dir.db").mkdir()
        return f"sqlite:///{directory / 'is-a-dir.db'}"
    if kind == "parent-is-file":
        (directory / "plain-file").write_text("not a folder\n")
        return f"sqlite:///{directory / 'plain-file' / 'sync.db'}"
    if kind == "text-file":
        (directory / "notes.txt").write_text("my notes, not a database\n" * 20)
        return f"sqlite:///{directory / 'notes.txt'}"
    raise AssertionError(kind)


USAGE_ERRORS = [
    pytest.param(["--date", "2026-02-30"], {}, "bad date '2026-02-30'", id="date-feb-30"),
    pytest.param(["--date", "yesterday"], {}, "bad date 'yesterday'", id="date-word"),
    pytest.param(["--batch-size", "0"], {}, "batch_size must be at least 1", id="batch-size-0"),
    pytest.param([], {"SYNC_BATCH_SIZE": "0"}, "SYNC_BATCH_SIZE must be at least 1", id="env-0"),
    pytest.param(
        [],
        {"SYNCPOINT_DATABASE_URL": "not a url at all"},
        "not a database URL",
        id="db-url-not-a-url",
    ),
    pytest.param(
        [],
        {"SYNCPOINT_DATABASE_URL": "mysql://user:pw@localhost/sync"},
        "unsupported database 'mysql'",
        id="db-url-mysql",
    ),
    pytest.param(
        [],
        {"SYNCPOINT_DATABASE_URL": "sqlite:////proc/syncpoint-test.db"},
        "cannot open database",
        id="db-unwritable-proc",
    ),
    pytest.param([], {"target": "dir"}, "cannot open database", id="db-path-is-a-dir"),
    pytest.param(
        [], {"target": "parent-is-file"}, "cannot open database", id="db-parent-is-a-file"
    ),
    pytest.param([], {"target": "text-file"}, "cannot open database", id="db-is-a-text-file"),
]


@pytest.mark.parametrize(("args", "extra", "message"), USAGE_ERRORS)
def test_usage_and_config_errors_exit_2_and_touch_nothing(
    workdir: Path,
    env: dict[str, str],
    sim: MarketSimulator,
    tmp_path: Path,
    args: list[str],
    extra: dict[str, str],
    message: str,
) -> None:
    extra = dict(extra)
    target = extra.pop("target", None)
    if target is not None:
        extra["SYNCPOINT_DATABASE_URL"] = _prepare_target(target, tmp_path)
    before_files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    before = sqlite_dump(workdir / "syncpoint.db")
    sim.reset_stats()

    result = run_cli([*run_args(workdir / "tickers.txt"), *args], {**env, **extra}, workdir)

    assert_one_line_error(result, message)
    assert "pw@" not in result.stderr  # a URL's password is never echoed
    assert sim.stats()["requests"] == 0
    assert sqlite_dump(workdir / "syncpoint.db") == before
    # The bad target is left as it was: no database written over or beside it.
    after_files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after_files == before_files
    if target == "dir":
        assert list((tmp_path / "is-a-dir.db").iterdir()) == []
    assert not Path("/proc/syncpoint-test.db").exists()


def test_the_existing_run_continues_after_rejected_commands(
    workdir: Path, env: dict[str, str]
) -> None:
    result = run_cli(run_args(workdir / "tickers.txt"), env, workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "COMPLETED (resumed)" in result.stdout
    assert len(table_rows(f"sqlite:///{workdir / 'syncpoint.db'}", "dcf_valuations")) == 6


# --- bad tickers files ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param("", "is empty", id="empty-file"),
        pytest.param("\n  \n# only a comment\n", "is empty", id="blank-lines-only"),
        pytest.param(
            "name,exchange\nApple,NASDAQ\n",
            "no 'symbol' or 'ticker' column",
            id="csv-without-symbol-column",
        ),
    ],
)
def test_unusable_tickers_file_is_a_one_line_usage_error(
    env: dict[str, str], tmp_path: Path, content: str, message: str
) -> None:
    file = tmp_path / "tickers.csv"
    file.write_text(content)
    result = run_cli(run_args(file), env, tmp_path)
    assert_one_line_error(result, message)


def test_a_run_stopped_by_an_empty_file_continues_once_the_file_is_fixed(
    env: dict[str, str], sim: MarketSimulator, tmp_path: Path
) -> None:
    file = tmp_path / "tickers.txt"
    file.write_text("")
    first = run_cli(run_args(file), env, tmp_path)
    assert_one_line_error(first, "is empty")
    db = tmp_path / "syncpoint.db"
    assert not db.exists() or sqlite_dump(db).get("stock_prices", []) == []

    tickers = good(sim, 620)
    tickers_file(tmp_path, tickers)
    second = run_cli(run_args(file), env, tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "COMPLETED" in second.stdout
    url = f"sqlite:///{tmp_path / 'syncpoint.db'}"
    assert {r[0] for r in table_rows(url, "dcf_valuations")} == set(tickers)


def test_duplicates_are_ignored_and_counted_once(
    env: dict[str, str], sim: MarketSimulator, tmp_path: Path
) -> None:
    tickers = good(sim, 640)
    lines = [*tickers, tickers[0], f"  {tickers[1].lower()}  ", tickers[0], tickers[2]]
    sim.reset_stats()
    result = run_cli(run_args(tickers_file(tmp_path, lines)), env, tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    (run,) = status(env, tmp_path)
    assert run["stages"]["universe"]["total"] == len(tickers)
    assert run["stages"]["prices"] == {
        "total": len(tickers),
        "done": len(tickers),
        "failed": 0,
        "retrying": 0,
        "untouched": 0,
    }
    assert run["failures"] == []
    for ticker in tickers:
        assert sim.requests_for(ticker, "historical-price-eod/full") == 1, ticker
    url = f"sqlite:///{tmp_path / 'syncpoint.db'}"
    assert len(table_rows(url, "dcf_valuations")) == len(tickers)


SUFFIX_RULE = "malformed symbol: only A-Z, 0-9 and one '.' or '-' class suffix are allowed"
# A malformed symbol -> the reason it is skipped for. It is reported by its line number,
# never by its text: a rejected line is exactly the one that may hold something private.
MALFORMED = {
    "../x": SUFFIX_RULE,
    "A'; DROP TABLE t": SUFFIX_RULE,
    "Q" * 2000: "malformed symbol: 2000 characters (at most 16)",
    "ÄPFEL": "malformed symbol: non-ASCII characters",
    "A\u200bB": "malformed symbol: non-ASCII characters",
}


def test_malformed_symbols_are_skipped_by_line_number_and_good_ones_sync(
    database_url: str, env: dict[str, str], sim: MarketSimulator, tmp_path: Path
) -> None:
    tickers = good(sim, 660)
    malformed = list(MALFORMED)
    lines = [tickers[0], *malformed[:3], *tickers[1:3], *malformed[3:], tickers[3]]
    sim.reset_stats()
    result = run_cli(
        run_args(tickers_file(tmp_path, lines)),
        {**env, "SYNCPOINT_DATABASE_URL": database_url},
        tmp_path,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "COMPLETED" in result.stdout
    assert "Traceback" not in result.stderr
    # Only the good symbols ever reached the API.
    assert set(sim.stats()["by_symbol"]) == set(tickers)
    (run,) = status({**env, "SYNCPOINT_DATABASE_URL": database_url}, tmp_path)
    assert run["status"] == "completed"
    assert run["stages"]["universe"] == {
        "total": len(tickers) + len(MALFORMED),
        "done": len(tickers),
        "failed": len(MALFORMED),
        "retrying": 0,
        "untouched": 0,
    }
    expected = {f"line {lines.index(m) + 1}": why for m, why in MALFORMED.items()}
    assert expected.keys() == {"line 2", "line 3", "line 4", "line 7", "line 8"}
    failures = {f["item"]: f for f in run["failures"]}
    assert {item: f["error"] for item, f in failures.items()} == expected
    for item, failure in failures.items():
        assert (failure["stage"], failure["error_kind"]) == ("universe", "permanent")
        assert f"universe/{item}: permanent" in result.stdout
    # Tables intact: every table is there, the data is exactly the good tickers'.
    dump = url_dump(database_url)
    assert set(dump) >= TABLES
    assert {r[0] for r in dump["stock_prices"]} == set(tickers)
    assert {r[0] for r in dump["dcf_valuations"]} == set(tickers)
    # The rejected text itself is nowhere: not printed, not in any row.
    shown = result.stdout + result.stderr + repr(dump)
    for text in ("../x", "../X", "DROP TABLE", "QQQQQQQQ", "ÄPFEL", "\u200b", "\\u200b"):
        assert text not in shown, text


@pytest.mark.parametrize(
    ("header", "row"),
    [
        pytest.param("Symbol,name", "{s},Company {i}", id="csv-symbol-column"),
        pytest.param("name,ticker", "Company {i},{s}", id="csv-ticker-column"),
    ],
)
def test_csv_with_a_symbol_or_ticker_column(
    env: dict[str, str], sim: MarketSimulator, tmp_path: Path, header: str, row: str
) -> None:
    tickers = good(sim, 680)
    file = tmp_path / "tickers.csv"
    file.write_text("\n".join([header, *(row.format(s=s, i=i) for i, s in enumerate(tickers))]))
    sim.reset_stats()
    result = run_cli(run_args(file), env, tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    url = f"sqlite:///{tmp_path / 'syncpoint.db'}"
    assert {r[0] for r in table_rows(url, "dcf_valuations")} >= set(tickers)
    # Only the rows under the header are tickers.
    assert set(sim.stats()["by_symbol"]) == set(tickers)
    (run,) = status(env, tmp_path)
    assert run["stages"]["universe"]["total"] == len(tickers)
    assert run["failures"] == []


# --- the tickers_file parameter of a flow run not started by the CLI ----------------------
#
# Anyone who may start a deployment run sets its parameters; the worker reads files on
# its own machine. A flow run reads a tickers file only from SYNCPOINT_TICKERS_DIR
# (resolved: symlinks and `..` cannot leave it), or one the `syncpoint` command was given.
# The flow is called in-process here, as a worker calls it: not through the CLI.


@pytest.fixture
def flow_env(
    monkeypatch: pytest.MonkeyPatch, sim: MarketSimulator, prefect_api: str, tmp_path: Path
) -> Iterator[Path]:
    """The worker's environment for an in-process flow run; its database file."""
    db = tmp_path / "worker.db"
    monkeypatch.setenv("MARKET_API_URL", sim.base_url)
    monkeypatch.setenv("SYNCPOINT_DATABASE_URL", f"sqlite:///{db}")
    monkeypatch.delenv("SYNCPOINT_TICKERS_DIR", raising=False)
    sim.reset_stats()
    yield db
    from syncpoint.core.db import dispose_engines

    dispose_engines()


SECRET_LINE = "pw-4f1e9c22b7a0-never-shown"


def secret_folders(tmp_path: Path, sim: MarketSimulator) -> tuple[Path, Path]:
    """An allowed folder with a tickers file, and a folder beside it with a `.env`."""
    allowed, private = tmp_path / "tickers", tmp_path / "private"
    allowed.mkdir()
    private.mkdir()
    (allowed / "nightly.txt").write_text("\n".join(good(sim, 700)) + "\n")
    (private / ".env").write_text(f"DB_PASSWORD={SECRET_LINE}\n")
    (allowed / "linked.txt").symlink_to(private / ".env")
    return allowed, private


@pytest.mark.parametrize(
    ("tickers_dir", "path", "message"),
    [
        pytest.param(
            None,
            "{private}/.env",
            "is refused: a flow run reads tickers files only from SYNCPOINT_TICKERS_DIR, "
            "which is not set where it runs",
            id="no-allowed-folder",
        ),
        pytest.param(
            "{allowed}",
            "{private}/.env",
            "is refused: it is not inside SYNCPOINT_TICKERS_DIR",
            id="absolute-path-outside",
        ),
        pytest.param(
            "{allowed}",
            "../private/.env",
            "is refused: it is not inside SYNCPOINT_TICKERS_DIR",
            id="dot-dot-out",
        ),
        pytest.param(
            "{allowed}",
            "linked.txt",
            "is refused: it is not inside SYNCPOINT_TICKERS_DIR",
            id="symlink-out",
        ),
    ],
)
def test_a_flow_run_refuses_a_tickers_file_outside_the_allowed_folder(
    flow_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    sim: MarketSimulator,
    tmp_path: Path,
    tickers_dir: str | None,
    path: str,
    message: str,
) -> None:
    from syncpoint.flows.daily_sync import daily_sync

    allowed, private = secret_folders(tmp_path, sim)
    if tickers_dir is not None:
        monkeypatch.setenv("SYNCPOINT_TICKERS_DIR", tickers_dir.format(allowed=allowed))
    given = path.format(private=private)

    state = daily_sync(run_date=DAY, tickers_file=given, return_state=True)

    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, ConfigError)
    assert str(error).startswith(f"tickers_file {given!r} {message}"), str(error)
    assert SECRET_LINE not in str(error)
    # Refused before the run started: no request, no checkpoint.
    assert sim.stats()["requests"] == 0
    assert not flow_env.exists() or sqlite_dump(flow_env).get("sync_runs", []) == []


def test_a_flow_run_reads_the_allowed_folder_and_reports_rejected_lines_by_number(
    flow_env: Path, monkeypatch: pytest.MonkeyPatch, sim: MarketSimulator, tmp_path: Path
) -> None:
    from syncpoint.flows.daily_sync import daily_sync

    allowed, _ = secret_folders(tmp_path, sim)
    tickers = good(sim, 700)
    lines = [tickers[0], f"DB_PASSWORD={SECRET_LINE}", *tickers[1:], "# fine", "../x"]
    (allowed / "nightly.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("SYNCPOINT_TICKERS_DIR", str(allowed))

    summary = daily_sync(run_date=DAY, tickers_file="nightly.txt")

    assert summary["status"] == "completed"
    failures = {f["item"]: f["error"] for f in summary["failures"]}
    assert failures == {
        "line 2": f"malformed symbol: {len(lines[1])} characters (at most 16)",
        "line 7": SUFFIX_RULE,
    }
    assert {r[0] for r in table_rows(f"sqlite:///{flow_env}", "dcf_valuations")} == set(tickers)
    dump = repr(sqlite_dump(flow_env))
    assert SECRET_LINE.upper() not in dump
    assert "DB_PASSWORD" not in dump
    assert "DB_PASSWORD" not in repr(summary)
