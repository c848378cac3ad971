"""Operating safereset: the connection pool, start-up errors, lost connections, dead mail.

The PostgreSQL cases use a throw-away schema on the server that
SAFERESET_TEST_POSTGRES_URL names. The lost-connection tests put a TCP proxy
on 127.0.0.1 between the app and that server and cut it mid-test.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.pool import QueuePool

from safereset.machines.outbox import RetryPolicy
from safereset.mail.transports import TransportError
from safereset.mail.worker import Worker
from safereset.passwords import Hasher
from safereset.runtime import Runtime, build
from safereset.settings import Settings, SettingsError, load_settings
from safereset.store import models
from safereset.store.db import CONNECT_TIMEOUT_SECONDS, make_engine, migrate
from safereset.usecases.intake import REQUESTS_PER_ROUND
from safereset.web.app import create_app
from tests.conftest import SECRET_KEY, FakeClock, free_port, make_settings
from tests.test_cli import error_line, run_cli
from tests.test_security_properties import record_tokens

ALICE = "alice@example.com"
BOB = "bob@example.com"
OLD_PASSWORD = "old correct horse 1"
NEW_PASSWORD = "new battery staple 2"
SENDER = "safereset <no-reply@example.test>"
RELAY_ERROR = "550 relay rejected the message"
# An estimate of how long the console script takes to start on a slow machine.
START_UP_ALLOWANCE_SECONDS = 10


def settings_from_environment(monkeypatch: pytest.MonkeyPatch, **variables: str) -> Settings:
    """Load settings from only the given SAFERESET_* variables."""
    for name in list(os.environ):
        if name.startswith("SAFERESET_"):
            monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return load_settings()


# Pool settings


def test_pool_settings_reach_engine(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_from_environment(
        monkeypatch,
        SAFERESET_DATA_DIR=str(tmp_path),
        SAFERESET_SECRET_KEY=SECRET_KEY,
        SAFERESET_DATABASE_URL=postgres_url,
        SAFERESET_DB_POOL_SIZE="2",
        SAFERESET_DB_MAX_OVERFLOW="1",
        SAFERESET_DB_POOL_TIMEOUT_SECONDS="0.5",
    )
    engine = build(settings).service.engine
    try:
        pool = engine.pool
        assert isinstance(pool, QueuePool)
        assert pool.size() == 2
        assert pool.timeout() == 0.5

        checked_out = [engine.connect() for _ in range(3)]
        assert pool.overflow() == 1
        started = time.monotonic()
        with pytest.raises(PoolTimeout):
            engine.connect()
        assert time.monotonic() - started >= 0.5
        for connection in checked_out:
            connection.close()
    finally:
        engine.dispose()


def test_sqlite_pool_one_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every SQLite transaction takes the write lock, so the threads of one
    # process queue for one pooled connection instead of polling the lock.
    settings = settings_from_environment(
        monkeypatch,
        SAFERESET_DATA_DIR=str(tmp_path),
        SAFERESET_SECRET_KEY=SECRET_KEY,
        SAFERESET_DB_POOL_SIZE="4",
        SAFERESET_DB_POOL_TIMEOUT_SECONDS="0.5",
    )
    engine = build(settings).service.engine
    try:
        pool = engine.pool
        assert isinstance(pool, QueuePool)
        assert pool.size() == 1
        assert pool.timeout() == 0.5

        with engine.connect(), pytest.raises(PoolTimeout):
            engine.connect()
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SAFERESET_DB_POOL_SIZE", "0"),
        ("SAFERESET_DB_POOL_SIZE", "five"),
        ("SAFERESET_DB_MAX_OVERFLOW", "-1"),
        ("SAFERESET_DB_POOL_TIMEOUT_SECONDS", "0"),
        ("SAFERESET_DB_POOL_TIMEOUT_SECONDS", "soon"),
    ],
)
def test_invalid_pool_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    with pytest.raises(SettingsError, match=variable):
        settings_from_environment(
            monkeypatch, SAFERESET_DATA_DIR=str(tmp_path), **{variable: value}
        )


def test_exhausted_pool_503(
    postgres_url: str, tmp_path: Path, cheap_hasher: Hasher, clock: FakeClock
) -> None:
    settings = make_settings(
        tmp_path,
        database_url=postgres_url,
        db_pool_size=1,
        db_max_overflow=0,
        db_pool_timeout_seconds=0.2,
    )
    runtime = build(settings, hasher=cheap_hasher, clock=clock)
    migrate(runtime.service.engine)
    try:
        with (
            TestClient(
                create_app(runtime, run_worker=False), base_url="https://reset.example.test"
            ) as client,
            runtime.service.engine.connect(),  # the pool's only connection
        ):
            response = client.post("/api/recovery", json={"email": ALICE})

        assert response.status_code == 503
        assert response.json()["error"] == "unavailable"
        assert "retry-after" in response.headers
    finally:
        runtime.service.engine.dispose()


# Start-up errors


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts connections and never sends a byte."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # the listener was closed
            self.connections.append(connection)

    def close(self) -> None:
        # On Linux, shutdown() wakes the thread blocked in accept(), but close() alone does not.
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(timeout=5)
        for connection in self.connections:
            connection.close()


@pytest.fixture(params=["closed-port", "silent-server"])
def unreachable_port(request: pytest.FixtureRequest) -> Iterator[int]:
    """A port on 127.0.0.1 where nothing listens, or where a server never responds."""
    if request.param == "closed-port":
        yield free_port()
        return
    server = SilentServer()
    yield server.port
    server.close()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["user", "list"], "cannot connect to the database"),
        (["migrate"], "cannot migrate the database"),
    ],
    ids=["user-list", "migrate"],
)
def test_cli_unreachable_database(
    tmp_path: Path, unreachable_port: int, args: list[str], expected: str
) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{unreachable_port}/test"

    started = time.monotonic()
    result = run_cli(tmp_path, *args, SAFERESET_DATABASE_URL=url)
    elapsed = time.monotonic() - started

    assert expected in error_line(result)
    assert elapsed < CONNECT_TIMEOUT_SECONDS + START_UP_ALLOWANCE_SECONDS


def test_cli_unmigrated_postgres(tmp_path: Path, postgres_url: str) -> None:
    result = run_cli(tmp_path, "user", "list", SAFERESET_DATABASE_URL=postgres_url)

    assert "run `safereset migrate`" in error_line(result)


# Lost connections


class CuttableProxy:
    """A TCP proxy on 127.0.0.1 in front of the PostgreSQL server, which a test can cut.

    ``cut`` drops every open connection and closes the listening socket, so
    new connections are refused. ``restore`` listens on the same port again.
    The proxy runs an asyncio event loop in a thread of its own.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.port = 0  # chosen by the system on the first restore()
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.restore()

    def restore(self) -> None:
        self._run(self._listen())

    def cut(self) -> None:
        self._run(self._cut())
        self.cuts += 1

    def close(self) -> None:
        self._run(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def _run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for transport in self._transports:
            transport.abort()
        self._transports.clear()
        # From Python 3.12 on, this also waits for the aborted connections to close.
        if server is not None:
            await server.wait_closed()

    async def _relay(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        try:
            server_reader, server = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            client.transport.abort()
            return
        if self._server is None:  # cut while this connection was being opened
            client.transport.abort()
            server.transport.abort()
            return
        self._transports.update((client.transport, server.transport))
        await asyncio.gather(self._pump(client_reader, server), self._pump(server_reader, client))

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass  # the other side dropped the connection, or cut() aborted it
        finally:
            writer.transport.abort()


@pytest.fixture
def proxy(postgres_url: str) -> Iterator[CuttableProxy]:
    upstream = make_url(postgres_url)
    started = CuttableProxy(upstream.host or "127.0.0.1", upstream.port or 5432)
    yield started
    started.close()


@pytest.fixture
def proxied_runtime(
    postgres_url: str,
    proxy: CuttableProxy,
    tmp_path: Path,
    cheap_hasher: Hasher,
    clock: FakeClock,
) -> Iterator[Runtime]:
    """A runtime whose connections go through the proxy to the test's schema."""
    url = make_url(postgres_url).set(host="127.0.0.1", port=proxy.port)
    settings = make_settings(tmp_path, database_url=url.render_as_string(hide_password=False))
    runtime = build(settings, hasher=cheap_hasher, clock=clock)
    migrate(runtime.service.engine)
    yield runtime
    runtime.service.engine.dispose()


@pytest.fixture
def proxied_client(proxied_runtime: Runtime) -> Iterator[TestClient]:
    app = create_app(proxied_runtime, run_worker=False)
    with TestClient(app, base_url="https://reset.example.test") as client:
        yield client


@pytest.fixture
def direct_engine(postgres_url: str) -> Iterator[Engine]:
    """An engine on the test's schema that bypasses the proxy."""
    engine = make_engine(postgres_url)
    yield engine
    engine.dispose()


@pytest.fixture
def issued_token(proxied_runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> str:
    """Add Alice with a password, request recovery for her and return the link's token."""
    issued = record_tokens(monkeypatch)
    proxied_runtime.service.add_user(ALICE, OLD_PASSWORD)
    proxied_runtime.service.request_recovery(ALICE)
    proxied_runtime.service.process_recovery_requests()
    [token] = issued
    return token


def ticket_states(engine: Engine) -> list[str]:
    with DbSession(engine) as db:
        return sorted(db.scalars(select(models.Ticket.state)))


def password_hash(engine: Engine) -> str | None:
    with DbSession(engine) as db:
        return db.scalar(select(models.User.password_hash).where(models.User.email == ALICE))


def outbox_count(engine: Engine) -> int:
    with DbSession(engine) as db:
        return db.scalar(select(func.count()).select_from(models.OutboxMessage)) or 0


def assert_unavailable(response: Any) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "unavailable"
    assert int(response.headers["retry-after"]) > 0


def test_lost_connection_completion_503(
    proxy: CuttableProxy, proxied_client: TestClient, direct_engine: Engine, issued_token: str
) -> None:
    hash_before = password_hash(direct_engine)
    proxy.cut()

    response = proxied_client.post(
        "/api/recovery/complete", json={"token": issued_token, "password": NEW_PASSWORD}
    )

    assert_unavailable(response)
    assert ticket_states(direct_engine) == ["issued"]
    assert password_hash(direct_engine) == hash_before
    assert outbox_count(direct_engine) == 1


def test_lost_connection_request_503(
    proxy: CuttableProxy, proxied_client: TestClient, direct_engine: Engine, issued_token: str
) -> None:
    proxy.cut()

    response = proxied_client.post("/api/recovery", json={"email": ALICE})

    assert_unavailable(response)
    assert ticket_states(direct_engine) == ["issued"]
    assert outbox_count(direct_engine) == 1


@pytest.fixture
def cut_at_commit(proxied_runtime: Runtime, proxy: CuttableProxy, issued_token: str) -> None:
    """Cut the proxy just before the app next commits a transaction that queued work.

    That is mail (a completed reset) or a recovery request for the worker.

    The transaction has then sent its changes, and the server rolls them back
    when the connection drops.
    """
    engine = proxied_runtime.service.engine
    queued: list[bool] = []

    @event.listens_for(engine, "before_cursor_execute")
    def watch(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith(("INSERT INTO OUTBOX", "INSERT INTO RECOVERY_")):
            queued.append(True)

    @event.listens_for(engine, "commit")
    def cut(conn: Any) -> None:
        if queued:
            proxy.cut()


@pytest.mark.parametrize(
    "request_kind", ["complete", "request"], ids=["recovery-complete", "recovery"]
)
def test_connection_lost_at_commit_503(
    proxy: CuttableProxy,
    proxied_client: TestClient,
    direct_engine: Engine,
    issued_token: str,
    cut_at_commit: None,
    request_kind: str,
) -> None:
    hash_before = password_hash(direct_engine)

    if request_kind == "complete":
        response = proxied_client.post(
            "/api/recovery/complete", json={"token": issued_token, "password": NEW_PASSWORD}
        )
    else:
        response = proxied_client.post("/api/recovery", json={"email": ALICE})

    assert proxy.cuts == 1
    assert_unavailable(response)
    assert ticket_states(direct_engine) == ["issued"]
    assert password_hash(direct_engine) == hash_before
    assert outbox_count(direct_engine) == 1


def test_requests_succeed_after_restore(
    proxy: CuttableProxy,
    proxied_client: TestClient,
    proxied_runtime: Runtime,
    direct_engine: Engine,
    issued_token: str,
) -> None:
    completion = {"token": issued_token, "password": NEW_PASSWORD}
    proxy.cut()
    assert_unavailable(proxied_client.post("/api/recovery/complete", json=completion))
    assert_unavailable(proxied_client.post("/api/recovery", json={"email": ALICE}))

    proxy.restore()

    completed = proxied_client.post("/api/recovery/complete", json=completion)
    assert completed.status_code == 200, completed.text
    requested = proxied_client.post("/api/recovery", json={"email": ALICE})
    assert requested.status_code == 202, requested.text
    proxied_runtime.service.process_recovery_requests()
    assert ticket_states(direct_engine) == ["issued", "redeemed"]
    # The first link, the password-changed notice and the second link.
    assert outbox_count(direct_engine) == 3


def test_stale_pool_connection_replaced(
    proxy: CuttableProxy, proxied_client: TestClient, direct_engine: Engine, issued_token: str
) -> None:
    # The pool keeps the connection that created the ticket. Cutting and
    # restoring the proxy with no request in between leaves it broken, and
    # the pre-ping on checkout must replace it.
    proxy.cut()
    proxy.restore()

    response = proxied_client.post(
        "/api/recovery/complete", json={"token": issued_token, "password": NEW_PASSWORD}
    )

    assert response.status_code == 200, response.text
    assert ticket_states(direct_engine) == ["redeemed"]


def test_health_follows_connection(proxy: CuttableProxy, proxied_client: TestClient) -> None:
    assert proxied_client.get("/healthz").status_code == 200

    proxy.cut()
    cut = proxied_client.get("/healthz")
    proxy.restore()
    restored = proxied_client.get("/healthz")

    assert cut.status_code == 503
    assert cut.json() == {"status": "unavailable"}
    assert restored.status_code == 200


# Dead mail and retries


class RejectingTransport:
    """A transport whose relay rejects every message."""

    def __init__(self) -> None:
        self.attempts = 0

    async def send(self, message: EmailMessage) -> None:
        self.attempts += 1
        raise TransportError(RELAY_ERROR)

    def describe(self) -> str:
        return "rejecting relay"


class MemoryTransport:
    """A transport that keeps the messages it is given."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []

    async def send(self, message: EmailMessage) -> None:
        self.messages.append(message)

    def describe(self) -> str:
        return "memory"


def deliver_due(runtime: Runtime, transport: RejectingTransport | MemoryTransport) -> int:
    worker = Worker(
        runtime.outbox,
        transport,
        sender=SENDER,
        public_url=runtime.settings.public_url,
        before_delivery=runtime.service.process_recovery_requests,
    )
    return asyncio.run(worker.deliver_due())


def queue_recovery_mail(runtime: Runtime, email: str) -> str:
    """Add an account, request recovery for it and return the id of the queued mail."""
    known = {view.message_id for view in runtime.outbox.list_messages()}
    runtime.service.add_user(email)
    runtime.service.request_recovery(email)
    runtime.service.process_recovery_requests()
    [message_id] = {view.message_id for view in runtime.outbox.list_messages()} - known
    return message_id


def state_of(runtime: Runtime, message_id: str) -> str:
    [view] = [view for view in runtime.outbox.list_messages() if view.message_id == message_id]
    return view.state


def fail_until_dead(runtime: Runtime, clock: FakeClock, transport: RejectingTransport) -> None:
    """Deliver to a rejecting relay, moving the clock to each next attempt, until none is left."""
    for _ in range(RetryPolicy().max_attempts + 1):
        deliver_due(runtime, transport)
        views = [view for view in runtime.outbox.list_messages() if view.state == "retrying"]
        if not views:
            return
        clock.current = max(view.due_at for view in views)
    raise AssertionError("the message was still retrying after the last attempt")


@pytest.fixture
def dead_message(runtime: Runtime, clock: FakeClock) -> str:
    """Queue Alice's recovery mail, let every attempt fail and return the message id."""
    message_id = queue_recovery_mail(runtime, ALICE)
    fail_until_dead(runtime, clock, RejectingTransport())
    return message_id


def test_message_dies_after_last_attempt(runtime: Runtime, clock: FakeClock) -> None:
    message_id = queue_recovery_mail(runtime, ALICE)
    transport = RejectingTransport()

    fail_until_dead(runtime, clock, transport)

    assert transport.attempts == RetryPolicy().max_attempts
    assert state_of(runtime, message_id) == "dead"
    clock.advance(hours=24)
    assert deliver_due(runtime, transport) == 0
    assert transport.attempts == RetryPolicy().max_attempts


def test_dead_list_shows_last_error(runtime: Runtime, dead_message: str) -> None:
    pending = queue_recovery_mail(runtime, BOB)

    [dead] = runtime.outbox.list_messages(dead_only=True)
    every = {view.message_id for view in runtime.outbox.list_messages()}

    assert dead.message_id == dead_message
    assert dead.state == "dead"
    assert dead.attempt == RetryPolicy().max_attempts
    assert dead.last_error == RELAY_ERROR
    assert every == {dead_message, pending}


def test_requeue_restarts_message(runtime: Runtime, dead_message: str) -> None:
    runtime.outbox.requeue(dead_message)

    [view] = runtime.outbox.list_messages()
    assert view.state == "pending"
    assert view.attempt == 0
    assert runtime.outbox.list_messages(dead_only=True) == []


def test_requeued_message_delivered(runtime: Runtime, dead_message: str) -> None:
    runtime.outbox.requeue(dead_message)
    transport = MemoryTransport()

    assert deliver_due(runtime, transport) == 1
    assert transport.messages[0]["To"] == ALICE
    assert state_of(runtime, dead_message) == "sent"


def test_requeue_live_message_rejected(runtime: Runtime) -> None:
    message_id = queue_recovery_mail(runtime, ALICE)

    with pytest.raises(ValueError, match="is pending"):
        runtime.outbox.requeue(message_id)
    assert state_of(runtime, message_id) == "pending"


def test_requeue_unknown_id(runtime: Runtime) -> None:
    with pytest.raises(LookupError, match="no outbox message 0123456789abcdef"):
        runtime.outbox.requeue("0123456789abcdef")


def test_retry_waits_for_next_attempt(runtime: Runtime, clock: FakeClock) -> None:
    message_id = queue_recovery_mail(runtime, ALICE)
    mail = runtime.outbox.lease_next("worker-1")
    assert mail is not None
    failed_at = clock()
    assert runtime.outbox.failed(mail, RELAY_ERROR)
    [view] = runtime.outbox.list_messages()
    next_at = view.due_at

    clock.current = next_at - timedelta(microseconds=1)
    early = runtime.outbox.lease_next("worker-2")
    clock.current = next_at
    due = runtime.outbox.lease_next("worker-2")

    first_delay = RetryPolicy().first_delay
    assert first_delay / 2 <= next_at - failed_at <= first_delay
    assert early is None
    assert due is not None
    assert due.message_id == message_id
    assert due.attempt == 2


# The outbox commands


@pytest.fixture
def outbox_on_disk(tmp_path: Path, clock: FakeClock) -> Iterator[tuple[Runtime, str, str]]:
    """A SQLite database in tmp_path, where the CLI finds it, with one dead and one pending mail.

    Returns the runtime, the dead message's id and the pending message's id.
    """
    runtime = build(make_settings(tmp_path), clock=clock)
    migrate(runtime.service.engine)
    dead = queue_recovery_mail(runtime, ALICE)
    fail_until_dead(runtime, clock, RejectingTransport())
    pending = queue_recovery_mail(runtime, BOB)
    yield runtime, dead, pending
    runtime.service.engine.dispose()


def outbox_rows(data_dir: Path, *args: str) -> dict[str, list[str]]:
    """Run ``safereset outbox list`` and return its rows by message id."""
    result = run_cli(data_dir, "outbox", "list", *args)
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    return {row[0]: row[1:] for row in rows}


def test_cli_outbox_list(tmp_path: Path, outbox_on_disk: tuple[Runtime, str, str]) -> None:
    _, dead, pending = outbox_on_disk

    rows = outbox_rows(tmp_path)

    assert set(rows) == {dead, pending}
    kind, state, attempts, _, error = rows[dead]
    assert kind == "recovery_link"
    assert state == "dead"
    assert attempts == str(RetryPolicy().max_attempts)
    assert error == RELAY_ERROR
    assert rows[pending][1] == "pending"


def test_cli_outbox_list_dead(tmp_path: Path, outbox_on_disk: tuple[Runtime, str, str]) -> None:
    _, dead, _ = outbox_on_disk

    rows = outbox_rows(tmp_path, "--dead")

    assert set(rows) == {dead}


def test_cli_outbox_retry(tmp_path: Path, outbox_on_disk: tuple[Runtime, str, str]) -> None:
    runtime, dead, _ = outbox_on_disk

    result = run_cli(tmp_path, "outbox", "retry", dead)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "requeued\n"
    assert state_of(runtime, dead) == "pending"
    assert outbox_rows(tmp_path, "--dead") == {}


@pytest.mark.parametrize(
    ("target", "expected"),
    [("unknown", "no outbox message"), ("pending", "is pending")],
)
def test_cli_outbox_retry_error(
    tmp_path: Path, outbox_on_disk: tuple[Runtime, str, str], target: str, expected: str
) -> None:
    runtime, dead, pending = outbox_on_disk
    message_id = {"unknown": "0123456789abcdef", "pending": pending}[target]

    result = run_cli(tmp_path, "outbox", "retry", message_id)

    assert expected in error_line(result)
    assert state_of(runtime, dead) == "dead"
    assert state_of(runtime, pending) == "pending"


def test_worker_drains_backlog_without_polling(runtime: Runtime) -> None:
    # More requests than one round resolves, and a poll interval no test
    # would wait for: only rounds that start at once can deliver them all.
    backlog = REQUESTS_PER_ROUND * 2 + 5
    addresses = [f"backlog{index}@example.com" for index in range(backlog)]
    for address in addresses:
        runtime.service.add_user(address)
        runtime.service.request_recovery(address)
    stop = asyncio.Event()

    class StoppingTransport(MemoryTransport):
        async def send(self, message: EmailMessage) -> None:
            await super().send(message)
            if len(self.messages) == backlog:
                stop.set()

    transport = StoppingTransport()
    worker = Worker(
        runtime.outbox,
        transport,
        sender=SENDER,
        public_url=runtime.settings.public_url,
        poll_seconds=3600,
        before_delivery=runtime.service.process_recovery_requests,
    )

    asyncio.run(asyncio.wait_for(worker.run(stop), timeout=120))

    assert sorted(message["To"] for message in transport.messages) == sorted(addresses)
