"""Database targets and engines: one engine per URL per process, schema on first use.

A `Database` carries its URL as a SecretStr so it can be handed to Prefect tasks and
logged without leaking a password; `describe()` is the only form that reaches output.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError, SQLAlchemyError

from syncpoint.core.errors import ConfigError, StorageError
from syncpoint.core.redact import redact
from syncpoint.core.tables import metadata

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class Database:
    """A SQL database syncpoint reads and writes, by SQLAlchemy URL."""

    url: SecretStr

    @classmethod
    def from_url(cls, url: str) -> Database:
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise ConfigError(f"not a database URL: {_safe(url)!r} ({exc})") from None
        if parsed.get_backend_name() not in ("sqlite", "postgresql"):
            raise ConfigError(
                f"unsupported database {parsed.get_backend_name()!r}: use sqlite or postgresql"
            )
        return cls(SecretStr(_normalise(parsed).render_as_string(hide_password=False)))

    @property
    def dialect(self) -> str:
        return make_url(self.url.get_secret_value()).get_backend_name()

    def describe(self) -> str:
        """The URL with any password masked: the only form fit for logs and errors."""
        return make_url(self.url.get_secret_value()).render_as_string(hide_password=True)

    def engine(self) -> Engine:
        return engine_for(self.url.get_secret_value())

    def same_as(self, other: Database) -> bool:
        return self.url.get_secret_value() == other.url.get_secret_value()


@contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Turn a driver's exception (and its page of traceback) into one StorageError line.

    `what` names the database, already safe to print (Database.describe()).
    """
    try:
        yield
    except SQLAlchemyError as exc:
        cause = redact(_first_line(getattr(exc, "orig", None) or exc))
        if isinstance(exc, OperationalError | InterfaceError) or getattr(
            exc, "connection_invalidated", False
        ):
            raise StorageError(
                f"database {what} is unreachable ({type(exc).__name__}: {cause}). "
                "Nothing is lost: rerun once it is back to continue."
            ) from None
        raise StorageError(
            f"database {what} rejected the write ({type(exc).__name__}: {cause}). "
            "The batch was not stored; fix the cause and rerun to continue."
        ) from None


def _safe(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable>"


def _normalise(url: URL) -> URL:
    # Plain postgresql:// would pick psycopg2, which we do not install; psycopg 3 is.
    if url.drivername == "postgresql":
        return url.set(drivername="postgresql+psycopg")
    return url


def engine_for(url: str) -> Engine:
    """The process-wide engine for `url`, with the schema created on first use."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _create(url)
            _engines[url] = engine
        return engine


def dispose_engines() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def _create(url: str) -> Engine:
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite_path(parsed)
        # Prefect runs tasks in worker threads; each borrows its own connection.
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = create_engine(parsed, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    try:
        metadata.create_all(engine)
    except SQLAlchemyError as exc:
        engine.dispose()
        cause = getattr(exc, "orig", None) or exc
        raise ConfigError(
            f"cannot open database {parsed.render_as_string(hide_password=True)}: "
            f"{type(cause).__name__}: {_first_line(cause)}"
        ) from None
    return engine


def _check_sqlite_path(url: URL) -> None:
    if not url.database or url.database == ":memory:":
        return
    parent = Path(url.database).expanduser().resolve().parent
    if not parent.is_dir():
        raise ConfigError(f"cannot open database {url.database}: folder {parent} does not exist")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets `syncpoint status` read while a run writes; NORMAL is durable in WAL mode
    # against process crashes, which is the failure we design for.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""
