"""Shared fixtures: a real SQLite file, a controllable clock, a real SMTP server."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST
from fastapi.testclient import TestClient

from safereset.passwords import Hasher
from safereset.runtime import Runtime, build
from safereset.settings import Settings
from safereset.store.db import migrate
from safereset.web.app import create_app

pytest_plugins = ("tests.browser_support", "tests.postgres_support")

SECRET_KEY = "test-secret-key-0123456789abcdef0123456789"


class FakeClock:
    """A clock the test moves forward by hand."""

    def __init__(self, start: datetime | None = None) -> None:
        self.current = start or datetime(2026, 1, 15, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.current

    def advance(self, **delta: float) -> None:
        self.current += timedelta(**delta)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def cheap_hasher() -> Hasher:
    """Argon2id with the cheapest parameters, for tests that hash many times.

    The end-to-end tests use the real parameters.
    """
    return Hasher(PasswordHasher.from_parameters(CHEAPEST))


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "secret_key": SECRET_KEY,
        "public_url": "https://reset.example.test",
        "mail_url": (data_dir / "mail").as_uri(),
        **overrides,
    }
    return Settings(**values)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database on each backend: a SQLite file, or a PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'safereset.db'}"
    else:
        from tests.postgres_support import postgres_schema

        with postgres_schema() as url:
            yield url


@pytest.fixture
def runtime(
    database_url: str, tmp_path: Path, clock: FakeClock, cheap_hasher: Hasher
) -> Iterator[Runtime]:
    settings = make_settings(tmp_path, database_url=database_url)
    built = build(settings, hasher=cheap_hasher, clock=clock)
    migrate(built.service.engine)
    yield built
    built.service.engine.dispose()


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    app = create_app(runtime, run_worker=False)
    with TestClient(app, base_url="https://reset.example.test") as test_client:
        yield test_client


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Mailbox:
    """Messages a real SMTP server on loopback received, in order."""

    host: str
    port: int
    messages: list[EmailMessage] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    def wait_for(self, count: int, timeout: float = 15.0) -> list[EmailMessage]:
        with self.arrived:
            if not self.arrived.wait_for(lambda: len(self.messages) >= count, timeout):
                raise AssertionError(f"expected {count} message(s), got {len(self.messages)}")
            return list(self.messages)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        with self.arrived:
            self.messages.append(message)
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
            self.arrived.notify_all()
        return "250 OK"


@pytest.fixture
def smtp_server() -> Iterator[Mailbox]:
    """A real aiosmtpd server on a free loopback port."""
    mailbox = Mailbox("127.0.0.1", free_port())
    controller = Controller(mailbox, hostname=mailbox.host, port=mailbox.port)
    controller.start()
    yield mailbox
    controller.stop()


def text_body(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    content: str = part.get_content()
    return content


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print how many (machine, state, input) cases the exhaustive suite covers."""
    from safereset.machines import MACHINES

    parts = []
    total = 0
    for machine in MACHINES.values():
        states, inputs = len(machine.state_names()), len(machine.input_names())
        total += states * inputs
        parts.append(f"{machine.name} {states} states x {inputs} inputs = {states * inputs}")
    terminalreporter.write_line(f"state machine cases: {'; '.join(parts)}; total {total}")
