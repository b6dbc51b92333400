"""Engine factory and the one managed session.

`Database.session()` yields a session that commits on success and rolls back on any
exception; database-level failures become domain errors here (`ServiceUnavailable` for an
unreachable or locked database, `Conflict` for a constraint no store anticipated).

SQLite runs in WAL mode with foreign keys on. Its write transactions start with
``BEGIN IMMEDIATE`` (``Database.session(write=True)``): a deferred transaction that reads
and then writes can fail with "database is locked" without waiting, an immediate one
waits its turn for ``busy_timeout``.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from registry.errors import Conflict, ServiceUnavailable

__all__ = ["Database", "make_engine"]

_BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine for ``url`` with Brickyard's connection settings.

    Args:
        url: SQLAlchemy URL (``sqlite:///...`` or ``postgresql+psycopg://...``).
        kwargs: passed to `sqlalchemy.create_engine`.
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 10)
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_timeout", 10)
    return create_engine(url, **kwargs)


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (see _sqlite_begin)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    immediate = connection.get_execution_options().get("brickyard_write", False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class Database:
    """An engine plus session factories for reads and writes."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._read = sessionmaker(engine, expire_on_commit=False)
        self._write = sessionmaker(engine.execution_options(brickyard_write=True), expire_on_commit=False)
        self._watch: sqlite3.Connection | None = None
        self._watch_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> Database:
        """A `Database` on a new engine for ``url``."""
        return cls(make_engine(url))

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    def change_marker(self) -> int | None:
        """A number that changes whenever a commit reaches the database file from any
        connection of any process (SQLite's ``PRAGMA data_version`` on a connection kept for
        this), read in microseconds; None where there is no such thing (PostgreSQL, a
        database in memory). Lets a cache skip re-reading what cannot have changed."""
        path = self.engine.url.database
        if self.dialect != "sqlite" or not path or path == ":memory:":
            return None
        with self._watch_lock:
            try:
                if self._watch is None:
                    self._watch = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                return int(self._watch.execute("PRAGMA data_version").fetchone()[0])
            except sqlite3.Error as exc:
                raise ServiceUnavailable("the database is unavailable or busy; retry later", errors=[str(exc)]) from exc

    @contextmanager
    def session(self, *, write: bool = False) -> Iterator[Session]:
        """A session committed on success and rolled back on error.

        Args:
            write: start a write transaction (``BEGIN IMMEDIATE`` on SQLite).

        Raises:
            ServiceUnavailable: the database is unreachable, locked past its timeout, or
                the connection pool is exhausted.
            Conflict: a unique or foreign-key constraint failed and no store handled it.
        """
        factory = self._write if write else self._read
        try:
            with factory() as session, session.begin():
                yield session
        except IntegrityError as exc:
            raise Conflict("the change conflicts with existing data", errors=[_orig(exc)]) from exc
        except (OperationalError, PoolTimeout) as exc:
            raise ServiceUnavailable("the database is unavailable or busy; retry later", errors=[_orig(exc)]) from exc
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise ServiceUnavailable("lost the database connection; retry later") from exc
            raise

    def dispose(self) -> None:
        """Close every pooled connection."""
        with self._watch_lock:
            if self._watch is not None:
                self._watch.close()
                self._watch = None
        self.engine.dispose()


def _orig(exc: DBAPIError | PoolTimeout) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
