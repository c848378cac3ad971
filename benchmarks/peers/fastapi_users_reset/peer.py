"""Seed the fastapi-users peer's database and write the reset requests for the load tool.

Usage:
    python peer.py seed --database URL --users N --tokens K \\
        --password P --new-password Q --out FILE
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

import asyncpg
from db import Base, DatabaseURLError, User, create_engine
from fastapi_users_db_sqlalchemy import SQLAlchemyUserDatabase
from sqlalchemy import insert, inspect, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from users import MIN_PASSWORD_LENGTH, UserManager, password_helper

# The benchmark's growth phase seeds up to a million accounts.
MAX_USERS = 10_000_000
# Rows per executemany call when inserting users.
INSERT_BATCH_SIZE = 5_000
# Addresses per IN (...) query when loading the users that get a token.
LOAD_BATCH_SIZE = 500
RESET_PATH = "/auth/reset-password"
# OSError covers a refused or timed-out connection.
DATABASE_ERRORS = (SQLAlchemyError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


class SeedError(Exception):
    """An expected failure, reported as one line without a traceback."""


class TokenCollectingUserManager(UserManager):
    """The application's user manager, but it keeps each reset token instead of mailing it.

    ``forgot_password`` is the library's own code, so each token is the one the
    route would have mailed.
    """

    def __init__(self, user_db: SQLAlchemyUserDatabase[User, uuid.UUID]) -> None:
        super().__init__(user_db, mail_dir=Path())
        self.tokens: list[str] = []

    async def on_after_forgot_password(self, user, token, request=None) -> None:
        self.tokens.append(token)


def email_for(index: int) -> str:
    return f"user{index}@bench.example"


async def create_tables(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        existing = await connection.run_sync(
            lambda sync_connection: inspect(sync_connection).has_table(User.__tablename__)
        )
        if existing:
            raise SeedError(
                f"the database already has a {User.__tablename__!r} table: "
                "seed needs an empty database"
            )
        await connection.run_sync(Base.metadata.create_all)


async def insert_users(engine: AsyncEngine, count: int, hashed_password: str) -> None:
    """Insert ``count`` active, verified users that all share one password hash."""
    statement = insert(User.__table__)
    async with engine.begin() as connection:
        for start in range(0, count, INSERT_BATCH_SIZE):
            rows = [
                {
                    "id": uuid.uuid4(),
                    "email": email_for(index),
                    "hashed_password": hashed_password,
                    "is_active": True,
                    "is_superuser": False,
                    "is_verified": True,
                }
                for index in range(start, min(start + INSERT_BATCH_SIZE, count))
            ]
            await connection.execute(statement, rows)


async def collect_reset_tokens(engine: AsyncEngine, count: int) -> list[str]:
    """Return reset tokens for users 0 to ``count - 1``, in that order."""
    async with AsyncSession(engine, expire_on_commit=False) as session:
        manager = TokenCollectingUserManager(SQLAlchemyUserDatabase(session, User))
        for start in range(0, count, LOAD_BATCH_SIZE):
            emails = [
                email_for(index) for index in range(start, min(start + LOAD_BATCH_SIZE, count))
            ]
            result = await session.execute(select(User).where(User.email.in_(emails)))
            users_by_email = {user.email: user for user in result.scalars()}
            for email in emails:
                await manager.forgot_password(users_by_email[email])
    return manager.tokens


def write_requests(path: Path, tokens: list[str], new_password: str) -> None:
    """Write one reset-password request per line, as JSON with the body as a JSON string."""
    with path.open("w", encoding="utf-8") as out:
        for token in tokens:
            request = {
                "method": "POST",
                "path": RESET_PATH,
                "headers": {"Content-Type": "application/json"},
                "body": json.dumps({"token": token, "password": new_password}),
            }
            out.write(json.dumps(request) + "\n")


async def seed(args: argparse.Namespace) -> str:
    started = time.perf_counter()
    engine = create_engine(args.database)
    try:
        await create_tables(engine)
        # One hash for every row, because hashing each password would take hours.
        hashed_password = password_helper.hash(args.password)
        await insert_users(engine, args.users, hashed_password)
        inserted = time.perf_counter()
        tokens = await collect_reset_tokens(engine, args.tokens)
    except DATABASE_ERRORS as error:
        # SQLAlchemy wraps most driver errors and keeps the driver's in .orig,
        # but asyncpg's errors while connecting (a missing database) come unwrapped.
        cause = getattr(error, "orig", None) or error
        raise SeedError(f"the database failed: {one_line(cause)}") from None
    finally:
        await engine.dispose()
    try:
        write_requests(args.out, tokens, args.new_password)
    except OSError as error:
        raise SeedError(f"cannot write --out {args.out}: {error.strerror}") from None
    finished = time.perf_counter()
    backend = args.database.split(":", 1)[0]
    return (
        f"seeded {args.users} users into {backend} and wrote {len(tokens)} reset requests "
        f"to {args.out} in {finished - started:.1f} s "
        f"(users {inserted - started:.1f} s, tokens {finished - inserted:.1f} s)"
    )


def check_arguments(args: argparse.Namespace) -> None:
    if not 1 <= args.users <= MAX_USERS:
        raise SeedError(f"--users must be between 1 and {MAX_USERS}, got {args.users}")
    if not 0 <= args.tokens <= args.users:
        raise SeedError(f"--tokens must be between 0 and --users ({args.users}), got {args.tokens}")
    if not args.out.parent.is_dir():
        raise SeedError(f"the folder of --out {args.out} does not exist")
    if len(args.new_password) < MIN_PASSWORD_LENGTH:
        raise SeedError(
            f"--new-password must have at least {MIN_PASSWORD_LENGTH} characters, "
            "or the application rejects every reset"
        )


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    seed_parser = commands.add_parser(
        "seed", help="create the tables, insert users and write reset requests"
    )
    seed_parser.add_argument(
        "--database",
        required=True,
        help="sqlite:////absolute/path.db or postgresql://user@host:port/dbname (empty)",
    )
    seed_parser.add_argument(
        "--users", type=int, required=True, help="users to insert, user0@bench.example and up"
    )
    seed_parser.add_argument(
        "--tokens", type=int, required=True, help="users, from user0, that get a reset request"
    )
    seed_parser.add_argument("--password", required=True, help="the current password of all users")
    seed_parser.add_argument(
        "--new-password", required=True, help="the password each reset request sets"
    )
    seed_parser.add_argument(
        "--out", type=Path, required=True, help="file for the reset requests, one JSON per line"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    try:
        check_arguments(args)
        print(asyncio.run(seed(args)))
    except (SeedError, DatabaseURLError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def one_line(error: BaseException) -> str:
    """Fold a multi-line driver message into one line."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
