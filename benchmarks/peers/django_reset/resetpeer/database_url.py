"""Turn ``PEER_DATABASE_URL`` into an entry of Django's ``DATABASES`` setting."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

SQLITE_PREFIX = "sqlite:///"
POSTGRESQL_SCHEMES = ("postgresql", "postgres")


class DatabaseUrlError(ValueError):
    """The database URL is missing, malformed or names an unsupported database."""


def parse_database_url(url: str) -> dict[str, Any]:
    """Return the ``DATABASES["default"]`` entry for a SQLite or PostgreSQL URL.

    Accepted forms: ``sqlite:////absolute/path.db`` and
    ``postgresql://user[:password]@host[:port]/dbname``. Raises ``DatabaseUrlError``.
    """
    if not url:
        raise DatabaseUrlError(
            "PEER_DATABASE_URL is missing. Set it to sqlite:////absolute/path.db "
            "or postgresql://user@host:port/dbname"
        )
    if url.startswith(SQLITE_PREFIX):
        return _sqlite_settings(url)
    if urlsplit(url).scheme in POSTGRESQL_SCHEMES:
        return _postgresql_settings(url)
    raise DatabaseUrlError(
        f"database URL {_redact(url)!r} is not supported. Use sqlite:////absolute/path.db "
        "or postgresql://user@host:port/dbname"
    )


def describe_database(database: dict[str, Any]) -> str:
    """Return a short, password-free name of a ``DATABASES`` entry for messages."""
    if database["ENGINE"].endswith("sqlite3"):
        return f"SQLite database {database['NAME']}"
    return f"PostgreSQL database {database['NAME']} at {database['HOST']}:{database['PORT']}"


def _sqlite_settings(url: str) -> dict[str, Any]:
    path = unquote(url.removeprefix(SQLITE_PREFIX))
    if not path.startswith("/"):
        raise DatabaseUrlError(
            f"SQLite URL {url!r} needs an absolute path, as in sqlite:////tmp/peer.db"
        )
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": path,
        "OPTIONS": {
            # The same durability cost as safereset on SQLite: a write-ahead
            # log, a 30 s busy timeout, and BEGIN IMMEDIATE so that writers
            # queue for the lock instead of failing with "database is locked".
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA busy_timeout=30000;",
            "transaction_mode": "IMMEDIATE",
        },
    }


def _postgresql_settings(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise DatabaseUrlError(f"PostgreSQL URL {_redact(url)!r} has an invalid port") from None
    name = unquote(parts.path.removeprefix("/"))
    if not name or "/" in name:
        raise DatabaseUrlError(
            f"PostgreSQL URL {_redact(url)!r} needs one database name, as in "
            "postgresql://postgres@127.0.0.1:5432/peer"
        )
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": name,
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(port or ""),
        # psycopg_pool 3.3's defaults apply: 4 connections and a 30 s wait for a free one.
        "OPTIONS": {"pool": True},
    }


def _redact(url: str) -> str:
    """Return ``url`` with any password replaced, so that it can go into a message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
