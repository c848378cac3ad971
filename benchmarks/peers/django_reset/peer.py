"""Command line of the Django peer for the benchmark harness.

``python peer.py seed --database URL --users N --tokens K --password P
--new-password Q --out FILE`` creates the schema, N users with password P,
and for the first K users a reset session as after the confirm view's GET
step. It writes one POST request per line to FILE that sets password Q.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import import_module
from pathlib import Path
from typing import IO, Any, NoReturn
from urllib.parse import urlencode

from resetpeer.database_url import DatabaseUrlError, describe_database, parse_database_url

SETTINGS_MODULE = "resetpeer.settings"
USER_INSERT_BATCH = 5000
TOKEN_LOOKUP_BATCH = 500


class SeedError(Exception):
    """An expected failure of the seed command, whose message is printed as is."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """An argument parser that reports a usage error in one line, with exit status 1."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"{self.prog}: {message} (see --help)\n")


def user_email(index: int) -> str:
    return f"user{index}@bench.example"


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="peer.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    seed = commands.add_parser(
        "seed",
        help="create the schema, the users and the reset sessions",
        description="Create the schema, the users and the reset sessions in an empty database.",
    )
    seed.add_argument(
        "--database",
        required=True,
        help="sqlite:////absolute/path.db or postgresql://user@host:port/dbname",
    )
    seed.add_argument("--users", type=int, required=True, help="number of users to create")
    seed.add_argument(
        "--tokens",
        type=int,
        required=True,
        help="number of users, from user0 on, that get a reset session and a request line",
    )
    seed.add_argument("--password", required=True, help="password of every user")
    seed.add_argument("--new-password", required=True, help="password that each request line sets")
    seed.add_argument("--out", type=Path, required=True, help="file for the request lines")

    arguments = parser.parse_args(argv)
    if arguments.users < 1:
        parser.error(f"--users must be at least 1, got {arguments.users}")
    if not 0 <= arguments.tokens <= arguments.users:
        parser.error(
            f"--tokens must be between 0 and --users ({arguments.users}), got {arguments.tokens}"
        )
    if not arguments.password:
        parser.error("--password must not be empty")
    return arguments


def seed(arguments: argparse.Namespace) -> str:
    """Seed the database, write the request lines and return a one-line summary."""
    started = time.perf_counter()
    try:
        database = parse_database_url(arguments.database)
    except DatabaseUrlError as error:
        raise SeedError(str(error)) from None
    _setup_django(arguments.database)
    _check_new_password(arguments.new_password)

    from django.db import DatabaseError, connections

    try:
        _create_schema()
        # Open the output before the inserts, so that a bad path fails early.
        with arguments.out.open("w", encoding="utf-8") as out:
            _insert_users(arguments.users, arguments.password)
            _insert_reset_sessions(arguments.tokens, arguments.new_password, out)
    except DatabaseError as error:
        raise SeedError(f"{describe_database(database)}: {_first_line(error)}") from None
    except OSError as error:
        raise SeedError(f"cannot write {arguments.out}: {error.strerror}") from None
    finally:
        connections.close_all()

    elapsed = time.perf_counter() - started
    return (
        f"seeded {describe_database(database)}: {arguments.users} users sharing one "
        f"Argon2id hash, {arguments.tokens} reset sessions, {arguments.tokens} request "
        f"lines in {arguments.out}, in {elapsed:.1f} s"
    )


def _setup_django(database_url: str) -> None:
    os.environ["PEER_DATABASE_URL"] = database_url
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS_MODULE

    import django
    from django.conf import settings

    # The seed needs one connection, not a pool. Without the pool an
    # unreachable server fails at once with psycopg's own message, where the
    # pool would wait 30 s and then report only a timeout.
    settings.DATABASES["default"]["OPTIONS"].pop("pool", None)
    django.setup()


def _check_new_password(new_password: str) -> None:
    """Reject a new password that the server's validators would reject, to fail early."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.password_validation import validate_password
    from django.core.exceptions import ValidationError

    user_model = get_user_model()
    sample_user = user_model(username=user_email(0), email=user_email(0))
    try:
        validate_password(new_password, sample_user)
    except ValidationError as error:
        reasons = " ".join(error.messages)
        raise SeedError(f"--new-password fails the password validators: {reasons}") from None


def _create_schema() -> None:
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    if get_user_model().objects.exists():
        raise SeedError("the database already contains users, but seed needs an empty database")


def _insert_users(count: int, password: str) -> None:
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password
    from django.db import transaction

    user_model = get_user_model()
    # One Argon2id hash shared by every row, because hashing 100,000 passwords
    # one by one takes hours (about 0.2 s each on a 2-core machine).
    password_hash = make_password(password)
    with transaction.atomic():
        for first in range(0, count, USER_INSERT_BATCH):
            batch = []
            for index in range(first, min(first + USER_INSERT_BATCH, count)):
                email = user_email(index)
                batch.append(user_model(username=email, email=email, password=password_hash))
            user_model.objects.bulk_create(batch)


def _insert_reset_sessions(count: int, new_password: str, out: IO[str]) -> None:
    """Store a reset token in a new session for users 0 to count-1 and write their requests.

    Each session contains what PasswordResetConfirmView's GET step stores, so the
    POST to /reset/<uidb64>/set-password/ passes without that step.
    """
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.contrib.auth.tokens import default_token_generator
    from django.contrib.auth.views import INTERNAL_RESET_SESSION_TOKEN
    from django.contrib.sessions.backends.base import VALID_KEY_CHARS
    from django.db import transaction
    from django.utils.crypto import get_random_string
    from django.utils.encoding import force_bytes
    from django.utils.http import urlsafe_base64_encode

    user_model = get_user_model()
    session_store_class = import_module(settings.SESSION_ENGINE).SessionStore
    session_model = session_store_class.get_model_class()
    session_store = session_store_class()
    expire_date = session_store.get_expiry_date()
    body = urlencode([("new_password1", new_password), ("new_password2", new_password)])

    with transaction.atomic():
        for first in range(0, count, TOKEN_LOOKUP_BATCH):
            emails = [
                user_email(index) for index in range(first, min(first + TOKEN_LOOKUP_BATCH, count))
            ]
            users = user_model.objects.in_bulk(emails, field_name="username")
            sessions = []
            lines = []
            for email in emails:
                user = users[email]
                token = default_token_generator.make_token(user)
                uidb64 = urlsafe_base64_encode(force_bytes(user.pk))
                # The key generation of SessionStore, without its existence
                # query per key: the primary key still rejects a duplicate.
                session_key = get_random_string(32, VALID_KEY_CHARS)
                session_data = session_store.encode({INTERNAL_RESET_SESSION_TOKEN: token})
                sessions.append(
                    session_model(
                        session_key=session_key, session_data=session_data, expire_date=expire_date
                    )
                )
                lines.append(_request_line(uidb64, session_key, body, settings.SESSION_COOKIE_NAME))
            session_model.objects.bulk_create(sessions)
            out.writelines(lines)


def _request_line(uidb64: str, session_key: str, body: str, cookie_name: str) -> str:
    request: dict[str, Any] = {
        "method": "POST",
        "path": f"/reset/{uidb64}/set-password/",
        "headers": {
            "Content-Type": "application/x-www-form-urlencoded",
            "Cookie": f"{cookie_name}={session_key}",
        },
        "body": body,
    }
    return json.dumps(request) + "\n"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    try:
        summary = seed(arguments)
    except SeedError as error:
        print(f"peer.py seed: {error}", file=sys.stderr)
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
