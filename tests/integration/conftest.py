"""Fixtures shared by the integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncpoint.simulator import MarketSimulator


@pytest.fixture
def env(
    sync_env: MarketSimulator, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> MarketSimulator:
    """The flow's environment, as a worker's: the database, and tickers files allowed.
    (A module with an `env` of its own uses that one.)"""
    monkeypatch.setenv("SYNCPOINT_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("SYNCPOINT_TICKERS_DIR", str(tmp_path))
    return sync_env
