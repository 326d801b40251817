"""Fixtures for the engine's direct tests: a real SQLite ledger, no Prefect server.

Owners a test claims runs with are released at teardown: the ledger remembers the live
owners of this process in a module-level set, and one test's leftovers must not make
another test's run look held.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from syncpoint.core.db import Database, dispose_engines
from syncpoint.core.ledger import Ledger, new_owner


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    """A ledger on a new SQLite file; creating the engine builds the schema."""
    engine = Database.from_url(f"sqlite:///{tmp_path / 'x.db'}").engine()
    yield Ledger(engine)
    dispose_engines()


@pytest.fixture
def make_owner(ledger: Ledger) -> Iterator[Callable[[], str]]:
    """New owner names (host:pid:token of this process); released after the test."""
    made: list[str] = []

    def make() -> str:
        owner = new_owner()
        made.append(owner)
        return owner

    yield make
    for owner in made:
        ledger.release(owner)
