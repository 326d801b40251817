"""Database targets and engines: one engine per URL per process, schema checked on first use.

A `Database` carries its URL as a SecretStr so it can be handed to Prefect tasks and
logged without leaking a password; `describe()` is the only form that reaches output.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError, SQLAlchemyError

from syncpoint.core.errors import ConfigError, StorageError
from syncpoint.core.redact import redact, register_secret
from syncpoint.core.schema import ensure_current

_engines: dict[tuple[str, str], Engine] = {}
# connect_args whose value is a secret (password, sslpassword, token...), not a path or mode.
_SECRET_ARG = re.compile(r"pass|secret|token|credential|api_?key", re.IGNORECASE)
_lock = threading.Lock()


@dataclass(frozen=True)
class Database:
    """A SQL database syncpoint reads and writes, by SQLAlchemy URL.

    `connect_args` go to the driver as they are (e.g. sslmode, sslrootcert from a
    SqlAlchemyConnector block); a SecretStr, because they may hold a password too.
    """

    url: SecretStr
    connect_args: SecretStr = field(default_factory=lambda: SecretStr("{}"))

    @classmethod
    def from_url(cls, url: str | URL, connect_args: dict[str, Any] | None = None) -> Database:
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise ConfigError(f"not a database URL: {_safe(str(url))!r} ({exc})") from None
        if parsed.get_backend_name() not in ("sqlite", "postgresql"):
            raise ConfigError(
                f"unsupported database {parsed.get_backend_name()!r}: use sqlite or postgresql"
            )
        # A driver's error can quote the password in any words: mask the value itself.
        register_secret(parsed.password)
        for name, value in (connect_args or {}).items():
            if _SECRET_ARG.search(str(name)) and isinstance(value, str):
                register_secret(value)
        return cls(
            SecretStr(_normalise(parsed).render_as_string(hide_password=False)),
            SecretStr(json.dumps(connect_args or {}, sort_keys=True, default=str)),
        )

    @classmethod
    def from_connector(cls, connector: Any) -> Database:
        """A prefect_sqlalchemy SqlAlchemyConnector block's database, through its public
        fields: the URL its connection_info builds and its connect_args."""
        info = connector.connection_info
        url = info.create_url() if hasattr(info, "create_url") else make_url(str(info))
        return cls.from_url(url, dict(connector.connect_args or {}))

    @property
    def dialect(self) -> str:
        return make_url(self.url.get_secret_value()).get_backend_name()

    def describe(self) -> str:
        """The URL with any password masked: the only form fit for logs and errors."""
        return make_url(self.url.get_secret_value()).render_as_string(hide_password=True)

    def engine(self) -> Engine:
        return engine_for(self.url.get_secret_value(), self.connect_args.get_secret_value())

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
    # syncpoint speaks psycopg 3 (its bulk path uses COPY through it) and plain sqlite3:
    # postgresql://, +psycopg2 and +asyncpg URLs (a connector block's usual drivers) and
    # sqlite+aiosqlite reach the same database through the driver syncpoint ships.
    if url.get_backend_name() == "postgresql":
        return url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() == "sqlite":
        return url.set(drivername="sqlite")
    return url


def engine_for(url: str, connect_args: str = "{}") -> Engine:
    """The process-wide engine for `url` (and its JSON `connect_args`), with the schema
    checked on first use."""
    with _lock:
        engine = _engines.get((url, connect_args))
        if engine is None:
            engine = _create(url, json.loads(connect_args))
            _engines[(url, connect_args)] = engine
        return engine


def dispose_engines() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def unchecked_engine(database: Database) -> Engine:
    """A new engine without the schema check, for `syncpoint db upgrade`; dispose it."""
    return _create(
        database.url.get_secret_value(),
        json.loads(database.connect_args.get_secret_value()),
        check_schema=False,
    )


def _create(url: str, connect_args: dict[str, Any], *, check_schema: bool = True) -> Engine:
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "connect_args": dict(connect_args)}
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite_path(parsed)
        # Prefect runs tasks in worker threads; each borrows its own connection.
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30, **connect_args}
    engine = create_engine(parsed, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", sqlite_pragmas)
    if not check_schema:
        return engine
    try:
        # An empty database gets the schema; an older one is refused with the command
        # that upgrades it (syncpoint.core.schema).
        ensure_current(engine)
    except ConfigError:
        engine.dispose()
        raise
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


def sqlite_pragmas(dbapi_connection: Any, _record: Any = None) -> None:
    """Set up a new SQLite connection: WAL, NORMAL sync, a 30 s busy timeout."""
    cursor = dbapi_connection.cursor()
    try:
        # The busy timeout first, so everything after it waits for a lock instead of failing.
        cursor.execute("PRAGMA busy_timeout=30000")
        _use_wal(cursor)
        # NORMAL is durable in WAL mode against process crashes, the failure we design for.
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _use_wal(cursor: Any, *, patience: float = 30.0) -> None:
    """Switch the database to WAL, so `syncpoint status` reads while a run writes.

    Why the loop: switching the journal mode needs an exclusive lock and SQLite does not
    call the busy handler for it, so two processes (or pool threads) opening a fresh
    database at the same moment fail with "database is locked" at once. Once the file is
    in WAL mode the switch is never needed again: ask first, switch only when not.
    """
    deadline = time.monotonic() + patience
    while True:
        try:
            if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                return
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""
