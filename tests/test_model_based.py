"""Random sequences of use cases against a small reference model.

Hypothesis drives the real service (store, machines and outbox on a SQLite
file or a PostgreSQL schema, clock moved by the test) and a model written
here from the security properties alone. After every step the two must
agree, and invariants over the database must hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)
from sqlalchemy import func, select

from safereset.errors import InvalidCredentials, InvalidSession, InvalidToken
from safereset.mail.worker import Worker
from safereset.passwords import Hasher
from safereset.runtime import build
from safereset.store import models
from safereset.store.db import migrate
from tests.conftest import FakeClock, make_settings, text_body
from tests.postgres_support import postgres_schema
from tests.test_security_properties import table_rows_as_text

EXAMPLES = int(os.environ.get("SAFERESET_MODEL_EXAMPLES", "200"))
# Each PostgreSQL example creates and migrates a schema of its own, which
# makes it several times slower than a SQLite one.
POSTGRES_EXAMPLES = int(os.environ.get("SAFERESET_MODEL_EXAMPLES_POSTGRESQL", "50"))
ADDRESSES = ("alice@example.com", "bob@example.com")
VARIANTS = {
    # The third form spells the first letter as FULLWIDTH LATIN SMALL LETTER A.
    "alice@example.com": ("alice@example.com", "ALICE@Example.com", "\uff41lice@example.com"),
    "bob@example.com": ("bob@example.com", "Bob@EXAMPLE.COM"),
}
PASSWORDS = ("first passphrase", "second passphrase", "third passphrase")
HASHER = Hasher(PasswordHasher.from_parameters(CHEAPEST))
# The model leaves rate limits out (their own tests cover them), so no
# sequence of steps here may reach one.
UNLIMITED = {
    name: "100000/1s"
    for name in (
        "limit_recovery_per_client",
        "limit_recovery_per_address",
        "limit_completion_per_client",
        "limit_login_per_account",
        "limit_login_per_client",
        "limit_mail_per_account",
    )
}


class Inbox:
    """A transport that keeps messages in memory, for the model to read links from."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []

    async def send(self, message: EmailMessage) -> None:
        self.messages.append(message)

    def describe(self) -> str:
        return "memory"


@dataclass
class ModelUser:
    password: str | None
    active: bool = True
    usable_ticket: str | None = None
    ticket_expires: object = None
    sessions: dict[str, object] = field(default_factory=dict)  # token -> expiry


class RecoveryModel(RuleBasedStateMachine):
    tickets = Bundle("tickets")
    sessions = Bundle("sessions")

    def __init__(self) -> None:
        super().__init__()
        self.folder = tempfile.TemporaryDirectory()
        self.resources = contextlib.ExitStack()
        self.clock = FakeClock()
        try:
            settings = make_settings(
                Path(self.folder.name), database_url=self.open_database(), **UNLIMITED
            )
            self.runtime = build(settings, hasher=HASHER, clock=self.clock)
            migrate(self.runtime.service.engine)
        except BaseException:
            self.resources.close()
            self.folder.cleanup()
            raise
        self.service = self.runtime.service
        self.inbox = Inbox()
        self.worker = Worker(
            self.runtime.outbox,
            self.inbox,
            sender="s@example.test",
            public_url="https://x.test",
            before_delivery=self.service.process_recovery_requests,
        )
        self.users: dict[str, ModelUser] = {}
        self.secrets: set[str] = set()

    def open_database(self) -> str | None:
        """Return the database URL for this example, or None for a SQLite file in the folder."""
        return None

    def close_database(self) -> bytes:
        """Close the engine and return the raw bytes of the SQLite files."""
        database = Path(self.folder.name) / "safereset.db"
        self.service.engine.dispose()
        return b"".join(
            path.read_bytes() for path in database.parent.glob("safereset.db*") if path.is_file()
        )

    def teardown(self) -> None:
        try:
            stored = self.close_database()
        finally:
            self.resources.close()
            self.folder.cleanup()
        for secret in self.secrets:
            assert secret.encode() not in stored, "a plaintext token or password is in the database"

    def _deliver(self) -> list[EmailMessage]:
        before = len(self.inbox.messages)
        asyncio.run(self.worker.deliver_due())
        return self.inbox.messages[before:]

    @rule(address=st.sampled_from(ADDRESSES), password=st.sampled_from(PASSWORDS))
    def add_user(self, address: str, password: str) -> None:
        if address in self.users:
            return
        self.service.add_user(address, password)
        self.users[address] = ModelUser(password)
        self.secrets.add(password)

    @rule(target=tickets, address=st.sampled_from(ADDRESSES), variant=st.integers(0, 2))
    def request_recovery(self, address: str, variant: int) -> str:
        typed = VARIANTS[address][variant % len(VARIANTS[address])]
        self.service.request_recovery(typed)
        mails = [m for m in self._deliver() if m["Subject"] == "Reset your password"]
        user = self.users.get(address)
        if user is None or not user.active:
            assert mails == [], "a recovery mail went out for an unknown or disabled account"
            return "srt_" + "x" * 43
        assert len(mails) == 1
        assert mails[0]["To"] == address, "mail went to the typed address, not the stored one"
        token = text_body(mails[0]).split("token=")[1].split()[0]
        user.usable_ticket = token
        user.ticket_expires = self.clock() + self.service.token_ttl
        self.secrets.add(token)
        return token

    def _owner(self, token: str) -> ModelUser | None:
        for user in self.users.values():
            if user.usable_ticket == token:
                return user
        return None

    @rule(token=tickets, password=st.sampled_from(PASSWORDS))
    def complete_recovery(self, token: str, password: str) -> None:
        owner = self._owner(token)
        works = owner is not None and owner.active and self.clock() < owner.ticket_expires
        try:
            self.service.complete_recovery(token, password)
        except InvalidToken:
            assert not works, "a usable ticket was rejected"
            return
        assert works, "an unusable ticket completed a reset"
        assert owner is not None
        owner.password = password
        owner.usable_ticket = None
        owner.sessions.clear()
        notices = [m for m in self._deliver() if m["Subject"] == "Your password was changed"]
        assert len(notices) == 1

    @rule(target=sessions, address=st.sampled_from(ADDRESSES), password=st.sampled_from(PASSWORDS))
    def log_in(self, address: str, password: str) -> str:
        user = self.users.get(address)
        works = user is not None and user.active and user.password == password
        try:
            token = self.service.log_in(address, password)
        except InvalidCredentials:
            assert not works, "correct credentials were rejected"
            return "srt_" + "y" * 43
        assert works, "wrong credentials opened a session"
        assert user is not None
        user.sessions[token] = self.clock() + self.service.session_ttl
        self.secrets.add(token)
        return token

    def _session_works(self, token: str) -> bool:
        return any(
            token in user.sessions and self.clock() < user.sessions[token]
            for user in self.users.values()
        )

    @rule(token=sessions)
    def authenticate(self, token: str) -> None:
        works = self._session_works(token)
        try:
            self.service.authenticate(token)
        except InvalidSession:
            assert not works, "a live session was rejected"
            return
        assert works, "a dead session was accepted"

    @rule(token=sessions)
    def log_out(self, token: str) -> None:
        works = self._session_works(token)
        try:
            self.service.log_out(token)
        except InvalidSession:
            assert not works, "logout of a live session failed"
            return
        assert works, "logout of a dead session succeeded"
        for user in self.users.values():
            user.sessions.pop(token, None)

    @precondition(lambda self: bool(self.users))
    @rule(address=st.sampled_from(ADDRESSES), disable=st.booleans())
    def set_standing(self, address: str, disable: bool) -> None:
        user = self.users.get(address)
        if user is None:
            return
        if disable:
            self.service.disable_user(address)
            user.active = False
            user.usable_ticket = None
            user.sessions.clear()
        else:
            self.service.enable_user(address)
            user.active = True

    @rule(minutes=st.sampled_from([1, 10, 29, 31, 60 * 13]))
    def wait(self, minutes: int) -> None:
        self.clock.advance(minutes=minutes)

    @invariant()
    def at_most_one_usable_ticket(self) -> None:
        with self.service.engine.connect() as connection:
            counts = connection.execute(
                select(models.Ticket.user_id, func.count())
                .where(models.Ticket.state == "issued", models.Ticket.expires_at > self.clock())
                .group_by(models.Ticket.user_id)
            ).all()
        assert all(count <= 1 for _, count in counts), f"several usable tickets: {counts}"

    @invariant()
    def sessions_end_with_password_change(self) -> None:
        with self.service.engine.connect() as connection:
            stale = connection.execute(
                select(func.count())
                .select_from(models.Session)
                .join(models.User, models.User.id == models.Session.user_id)
                .where(
                    models.Session.state == "active",
                    models.Session.created_at < models.User.password_changed_at,
                )
            ).scalar_one()
        assert stale == 0, "a session from before the last password change is active"

    @invariant()
    def one_mail_per_promise(self) -> None:
        with self.service.engine.connect() as connection:
            tickets = connection.execute(
                select(func.count()).select_from(models.Ticket)
            ).scalar_one()
            redeemed = connection.execute(
                select(func.count())
                .select_from(models.Ticket)
                .where(models.Ticket.state == "redeemed")
            ).scalar_one()
            links = connection.execute(
                select(func.count())
                .select_from(models.OutboxMessage)
                .where(models.OutboxMessage.kind == "recovery_link")
            ).scalar_one()
            notices = connection.execute(
                select(func.count())
                .select_from(models.OutboxMessage)
                .where(models.OutboxMessage.kind == "password_changed")
            ).scalar_one()
        assert links == tickets, "each issued ticket has exactly one recovery mail"
        assert notices == redeemed, "each redeemed ticket has exactly one notice"


RecoveryModel.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_recovery_model = pytest.mark.filterwarnings("ignore")(RecoveryModel.TestCase)


class PostgresRecoveryModel(RecoveryModel):
    """The same model on PostgreSQL, in a fresh schema for each example."""

    def open_database(self) -> str:
        return self.resources.enter_context(postgres_schema())

    def close_database(self) -> bytes:
        """Close the engine and return every row of the schema as text."""
        try:
            return b"\n".join(table_rows_as_text(self.service.engine).values())
        finally:
            self.service.engine.dispose()


PostgresRecoveryModel.TestCase.settings = settings(
    max_examples=POSTGRES_EXAMPLES,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# When no PostgreSQL server can create a schema, the postgres_url fixture
# skips the test (fails it in CI, see tests/availability.py) before
# Hypothesis starts.
test_recovery_model_postgresql = pytest.mark.usefixtures("postgres_url")(
    pytest.mark.filterwarnings("ignore")(PostgresRecoveryModel.TestCase)
)
