"""Fresh databases for each application under test: SQLite files and PostgreSQL databases."""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

ADMIN_URL_VARIABLE = "BENCH_POSTGRES_URL"
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
BACKENDS = ("sqlite", "postgresql")


@dataclass(frozen=True)
class Database:
    backend: str
    url: str
    """Plain URL, as the peers read it: sqlite:////path or postgresql://user@host:port/name."""

    @property
    def sqlalchemy_url(self) -> str:
        """Return the URL with the psycopg driver named, as safereset reads it."""
        if self.backend == "postgresql":
            return self.url.replace("postgresql://", "postgresql+psycopg://", 1)
        return self.url


def admin_url() -> str:
    return os.environ.get(ADMIN_URL_VARIABLE, DEFAULT_ADMIN_URL)


def postgres_problem() -> str | None:
    """Return why PostgreSQL cannot be used, or None when it can."""
    try:
        with psycopg.connect(admin_url(), connect_timeout=5):
            return None
    except psycopg.Error as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        return f"PostgreSQL at {admin_url()} is not reachable ({first_line})"


def postgres_version() -> str:
    with psycopg.connect(admin_url(), connect_timeout=5) as connection:
        row = connection.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "unknown"


def sqlite_version() -> str:
    return sqlite3.sqlite_version


def fresh(backend: str, name: str, folder: Path) -> Database:
    """Create an empty database called ``name``, dropping an earlier one of that name."""
    if backend == "sqlite":
        path = folder / f"{name}.db"
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return Database("sqlite", f"sqlite:///{path.resolve()}")
    if backend != "postgresql":
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    with psycopg.connect(admin_url(), autocommit=True) as connection:
        identifier = sql.Identifier(name)
        connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(identifier))
        connection.execute(sql.SQL("CREATE DATABASE {}").format(identifier))
    server = admin_url().rsplit("/", 1)[0]
    return Database("postgresql", f"{server}/{name}")


def drop(database: Database) -> None:
    if database.backend == "sqlite":
        path = database.url.removeprefix("sqlite:///")
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    name = database.url.rsplit("/", 1)[1]
    with psycopg.connect(admin_url(), autocommit=True) as connection:
        statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        connection.execute(statement.format(sql.Identifier(name)))
