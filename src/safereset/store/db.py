"""Engine set-up and schema migrations (Alembic)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError

MIGRATIONS = Path(__file__).with_name("migrations")


class DatabaseError(Exception):
    """The database cannot be used: unreachable, invalid URL, or schema behind."""


def _one_line(error: object) -> str:
    """Fold a driver's multi-line message (psycopg adds hint lines) into one line."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


# How long a connection attempt to PostgreSQL may take before start-up or a
# request gives up with a clear error instead of hanging.
CONNECT_TIMEOUT_SECONDS = 5
# A fixed key for pg_advisory_xact_lock, so that instances migrating at once
# take turns. The value is arbitrary; it must only stay the same.
MIGRATION_LOCK_KEY = 0x5AFE_2E5E7


@dataclass(frozen=True)
class PoolSettings:
    """Connection pool bounds for a server database (SQLAlchemy's QueuePool)."""

    size: int = 5
    max_overflow: int = 10
    timeout_seconds: float = 10.0


def make_engine(url: str, pool: PoolSettings | None = None) -> Engine:
    """Create an engine; SQLite gets a busy timeout, WAL and foreign keys."""
    pool = pool or PoolSettings()
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() != "sqlite":
            return create_engine(
                parsed,
                pool_pre_ping=True,
                pool_size=pool.size,
                max_overflow=pool.max_overflow,
                pool_timeout=pool.timeout_seconds,
                connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS},
            )
        if parsed.database and parsed.database != ":memory:":
            _create_private_file(Path(parsed.database))
            # SQLite lets one transaction at a time hold the write lock, and every
            # transaction here takes it (see _begin_immediate). With one pooled
            # connection, the threads of this process queue for the pool and
            # wake as soon as it is free. With several, they contend for the lock
            # inside SQLite, whose busy handler sleeps in steps of up to 100 ms.
            engine = create_engine(
                parsed,
                connect_args={"timeout": 30},
                pool_size=1,
                max_overflow=0,
                pool_timeout=pool.timeout_seconds,
            )
        else:
            engine = create_engine(parsed, connect_args={"timeout": 30})
    except ArgumentError as error:
        # NoSuchModuleError, an unknown dialect, is an ArgumentError too.
        raise DatabaseError(f"SAFERESET_DATABASE_URL is not usable: {_one_line(error)}") from None
    except ImportError as error:
        raise DatabaseError(
            f"the database driver for SAFERESET_DATABASE_URL is not installed: {error}"
        ) from None
    except OSError as error:
        raise DatabaseError(
            f"cannot create the SQLite database {parsed.database}: {error.strerror}"
        ) from None
    event.listen(engine, "connect", _configure_sqlite)
    event.listen(engine, "begin", _begin_immediate)
    return engine


def _create_private_file(path: Path) -> None:
    """Create an empty database file that only its owner may read, unless it exists.

    The file contains password hashes. SQLite would create it with the
    process umask, often 0644, and it gives the -wal and -shm files the
    database file's permissions.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _configure_sqlite(connection: Any, record: Any) -> None:
    # Let SQLAlchemy issue BEGIN itself (see _begin_immediate).
    connection.isolation_level = None
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _begin_immediate(connection: Any) -> None:
    # BEGIN IMMEDIATE takes the write lock at the start, so two writers wait
    # for each other instead of one failing at commit with "database is locked".
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def migrate(engine: Engine) -> str:
    """Bring the schema to the newest revision and return it.

    Safe to run from several instances at once.
    """
    config = _alembic_config(engine)
    try:
        command.upgrade(config, "head")
    except OperationalError as error:
        raise DatabaseError(f"cannot migrate the database: {_one_line(error.orig)}") from None
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None  # the package ships its migrations
    return head


def check_schema(engine: Engine) -> None:
    """Raise ``DatabaseError`` when the database is unreachable or not migrated."""
    head = ScriptDirectory.from_config(_alembic_config(engine)).get_current_head()
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    except OperationalError as error:
        raise DatabaseError(f"cannot connect to the database: {_one_line(error.orig)}") from None
    if current != head:
        raise DatabaseError(
            f"database schema is at revision {current or 'none'}, expected {head}: "
            "run `safereset migrate`"
        )
