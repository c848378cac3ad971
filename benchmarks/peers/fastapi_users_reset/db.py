"""The user table and the async engine, shared by the application and the seed command."""

from __future__ import annotations

from typing import Any

from fastapi_users_db_sqlalchemy import SQLAlchemyBaseUserTableUUID
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase

# The async driver that replaces each accepted URL scheme.
ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}


class Base(DeclarativeBase):
    pass


class User(SQLAlchemyBaseUserTableUUID, Base):
    pass


class DatabaseURLError(ValueError):
    """The database URL is missing, malformed or of an unsupported kind."""


def to_async_url(url: str) -> URL:
    """Return the aiosqlite or asyncpg form of a ``sqlite`` or ``postgresql`` URL.

    Raises ``DatabaseURLError`` for any other URL.
    """
    if not url:
        raise DatabaseURLError("the database URL is missing")
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseURLError(f"the database URL {url!r} is invalid") from None
    driver = ASYNC_DRIVERS.get(parsed.drivername)
    if driver is None:
        raise DatabaseURLError(
            f"the database URL scheme {parsed.drivername!r} is not supported: "
            "use sqlite:////absolute/path.db or postgresql://user@host:port/dbname"
        )
    if driver.startswith("sqlite") and parsed.database in (None, "", ":memory:"):
        raise DatabaseURLError(
            f"the SQLite URL {url!r} has no file path: use sqlite:////absolute/path.db"
        )
    return parsed.set(drivername=driver)


def create_engine(url: str) -> AsyncEngine:
    """Create the async engine; on SQLite with one connection, WAL and BEGIN IMMEDIATE.

    PostgreSQL keeps SQLAlchemy's default async pool.
    """
    async_url = to_async_url(url)
    if async_url.get_backend_name() != "sqlite":
        return create_async_engine(async_url)
    # One connection, as safereset has on SQLite: every transaction takes the
    # write lock anyway, and waiting requests then queue in the pool instead
    # of polling the lock in SQLite's busy handler.
    engine = create_async_engine(async_url, pool_size=1, max_overflow=0, pool_timeout=30)
    event.listen(engine.sync_engine, "connect", _configure_sqlite)
    event.listen(engine.sync_engine, "begin", _begin_immediate)
    return engine


def _configure_sqlite(dbapi_connection: Any, connection_record: Any) -> None:
    # Stop the driver from sending its own deferred BEGIN, so that
    # _begin_immediate decides how each transaction starts.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _begin_immediate(connection: Any) -> None:
    # BEGIN IMMEDIATE takes the write lock at the start, so two writers wait
    # for each other (up to busy_timeout) instead of one failing with
    # "database is locked" when its read turns into a write. Read-only
    # transactions take the lock too.
    connection.exec_driver_sql("BEGIN IMMEDIATE")
