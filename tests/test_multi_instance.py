"""Several `safereset` processes on one database: workers, servers, migrations.

The processes are the real command, started as an operator would start them.
Mail goes over SMTP to servers in this process on loopback.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx2
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from safereset.errors import InvalidCredentials
from safereset.passwords import Hasher
from safereset.runtime import Runtime, build
from safereset.store.db import MIGRATION_LOCK_KEY, MIGRATIONS, migrate
from safereset.store.models import Base
from tests.concurrency_support import (
    WAIT_SECONDS,
    CommandLauncher,
    SharedDeployment,
    StallingSmtpServer,
    outbox_rows,
    wait_until,
)
from tests.conftest import Mailbox, free_port, make_settings
from tests.e2e_support import (
    STARTUP_TIMEOUT_SECONDS,
    WORKER_POLL_SECONDS,
    ServerProcess,
    recovery_link,
    token_of,
)

pytestmark = pytest.mark.e2e

EMAIL = "racer@example.com"
OLD_PASSWORD = "old password 0"
NEW_PASSWORD = "new password 1"
OTHER_PASSWORD = "other password 2"
# The settings require the lease to outlast one SMTP attempt by more than 1 s.
LEASE_SECONDS = 4
SMTP_TIMEOUT_SECONDS = 2
MIGRATORS = 4
# Long enough for every worker to poll several times.
QUIET_SECONDS = 5 * float(WORKER_POLL_SECONDS)


@pytest.fixture
def commands(tmp_path: Path) -> Iterator[CommandLauncher]:
    launcher = CommandLauncher(tmp_path)
    yield launcher
    launcher.stop_all()


@pytest.fixture
def stalling_smtp() -> Iterator[StallingSmtpServer]:
    server = StallingSmtpServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    """Collect the `safereset serve` processes that the test starts, and stop them at teardown."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()


@pytest.fixture
def wall_clock_runtime(
    database_url: str, tmp_path: Path, cheap_hasher: Hasher
) -> Iterator[Runtime]:
    """Build a migrated runtime on the real clock, which the worker subprocesses use too."""
    settings = make_settings(
        tmp_path,
        database_url=database_url,
        mail_lease_seconds=LEASE_SECONDS,
        smtp_timeout_seconds=SMTP_TIMEOUT_SECONDS,
    )
    runtime = build(settings, hasher=cheap_hasher)
    migrate(runtime.service.engine)
    yield runtime
    runtime.service.engine.dispose()


@pytest.mark.threat("T26")
def test_killed_worker_lease_taken_over(
    database_url: str,
    tmp_path: Path,
    wall_clock_runtime: Runtime,
    smtp_server: Mailbox,
    stalling_smtp: StallingSmtpServer,
    commands: CommandLauncher,
) -> None:
    service = wall_clock_runtime.service
    service.add_user(EMAIL, OLD_PASSWORD)
    service.request_recovery(EMAIL)
    stalled = SharedDeployment(
        data_dir=tmp_path / "data",
        mail_url=stalling_smtp.url,
        port=free_port(),
        database_url=database_url,
        extra={
            "SAFERESET_MAIL_LEASE_SECONDS": str(LEASE_SECONDS),
            "SAFERESET_SMTP_TIMEOUT_SECONDS": str(SMTP_TIMEOUT_SECONDS),
        },
    )

    # The first worker sends the whole message and waits for a reply that never comes.
    first = commands.start(stalled, "worker")
    assert stalling_smtp.received.wait(STARTUP_TIMEOUT_SECONDS), first.log()
    first.kill()
    [leased] = outbox_rows(service.engine)
    assert leased.state == "leased"
    assert f":{first.pid}:" in (leased.worker or "")
    lease_end = leased.due_at

    commands.start(stalled.mailing_to(smtp_server.url), "worker")
    assert datetime.now(UTC) < lease_end  # the second worker starts while the lease runs
    [mail] = smtp_server.wait_for(1, timeout=LEASE_SECONDS + STARTUP_TIMEOUT_SECONDS)
    arrived_at = datetime.now(UTC)
    assert arrived_at >= lease_end, "the second worker did not wait for the lease to end"
    time.sleep(QUIET_SECONDS)
    assert len(smtp_server.messages) == 1
    assert len(stalling_smtp.messages) == 1

    [row] = outbox_rows(service.engine)
    assert row.state == "sent"
    assert row.attempt == 2  # the lost lease counts as the first attempt
    service.complete_recovery(token_of(recovery_link(mail)), NEW_PASSWORD)
    service.log_in(EMAIL, NEW_PASSWORD)
    with pytest.raises(InvalidCredentials):
        service.log_in(EMAIL, OLD_PASSWORD)


def schema_state(url: str) -> tuple[list[str], set[str]]:
    """Return the revisions in alembic_version and the names of the tables."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            revisions = list(connection.scalars(text("SELECT version_num FROM alembic_version")))
            tables = set(inspect(connection).get_table_names())
    finally:
        engine.dispose()
    return revisions, tables


HEAD = ScriptDirectory(str(MIGRATIONS)).get_current_head()
TABLES = {"alembic_version", *Base.metadata.tables}


def distinct_free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


# Counts the requests that wait for the migration lock. pg_locks shows a bigint
# advisory key as its high 32 bits (classid) and low 32 bits (objid), objsubid 1.
WAITING_FOR_MIGRATION_LOCK = text(
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    " AND classid::bigint = :high AND objid::bigint = :low AND objsubid = 1"
).bindparams(high=MIGRATION_LOCK_KEY >> 32, low=MIGRATION_LOCK_KEY & 0xFFFFFFFF)


@contextlib.contextmanager
def migration_lock(url: str) -> Iterator[Callable[[], int]]:
    """Hold the lock that `safereset` takes to migrate, until the block ends.

    Yields a function that counts the processes waiting for the lock. Those
    started inside the block wait, and then migrate right after one another.
    """
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})

            def waiting() -> int:
                count: int = connection.scalar(WAITING_FOR_MIGRATION_LOCK)
                return count

            yield waiting
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
    finally:
        engine.dispose()


def test_link_completes_on_other_instance(
    postgres_url: str, tmp_path: Path, smtp_server: Mailbox, servers: list[ServerProcess]
) -> None:
    first_port, second_port = distinct_free_ports(2)
    first = SharedDeployment(
        data_dir=tmp_path / "data",
        mail_url=smtp_server.url,
        port=first_port,
        database_url=postgres_url,
    )
    second = first.on_port(second_port)
    servers.append(ServerProcess(first, (), tmp_path / "server-a.log"))
    servers.append(ServerProcess(second, (), tmp_path / "server-b.log"))
    with migration_lock(postgres_url) as waiting:
        for server in servers:
            server.start()
        wait_until(
            lambda: waiting() == len(servers),
            STARTUP_TIMEOUT_SECONDS,
            "both servers to wait for the migration lock",
        )
    for server in servers:
        server.wait_until_healthy()
    assert schema_state(postgres_url) == ([HEAD], TABLES)
    first.add_user(EMAIL, OLD_PASSWORD)

    with (
        httpx2.Client(base_url=first.public_url, trust_env=False, timeout=10.0) as via_first,
        httpx2.Client(base_url=second.public_url, trust_env=False, timeout=10.0) as via_second,
    ):
        requested = via_first.post("/api/recovery", json={"email": EMAIL})
        assert requested.status_code == 202, requested.text
        [mail] = smtp_server.wait_for(1)
        token = token_of(recovery_link(mail))

        completed = via_second.post(
            "/api/recovery/complete", json={"token": token, "password": NEW_PASSWORD}
        )
        assert completed.status_code == 200, completed.text
        logged_in = via_first.post("/api/sessions", json={"email": EMAIL, "password": NEW_PASSWORD})
        assert logged_in.status_code == 201, logged_in.text

        reused = via_first.post(
            "/api/recovery/complete", json={"token": token, "password": OTHER_PASSWORD}
        )
        assert reused.status_code == 400
        assert reused.json()["error"] == "invalid_or_expired_token"

    smtp_server.wait_for(2)
    time.sleep(QUIET_SECONDS)
    subjects = [message["Subject"] for message in smtp_server.messages]
    assert subjects == ["Reset your password", "Your password was changed"]


def test_concurrent_migrations(
    postgres_url: str, tmp_path: Path, commands: CommandLauncher
) -> None:
    deployment = SharedDeployment(
        data_dir=tmp_path / "data",
        mail_url=(tmp_path / "mail").as_uri(),
        port=free_port(),
        database_url=postgres_url,
    )
    with migration_lock(postgres_url) as waiting:
        migrations = [commands.start(deployment, "migrate") for _ in range(MIGRATORS)]
        wait_until(
            lambda: waiting() == MIGRATORS,
            STARTUP_TIMEOUT_SECONDS,
            f"{MIGRATORS} migrations to wait for the migration lock",
        )

    exit_codes = [migration.wait(WAIT_SECONDS) for migration in migrations]
    assert exit_codes == [0] * MIGRATORS, "\n".join(m.log() for m in migrations)
    assert schema_state(postgres_url) == ([HEAD], TABLES)
