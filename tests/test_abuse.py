"""Abuse resistance: uniform work on the request path, rate limits, client addresses, hashing.

Every test that uses the ``runtime`` fixture runs on SQLite and on
PostgreSQL. Requests go to the in-process test client, except one test that
starts a real server on 127.0.0.1 to send ``X-Forwarded-For`` over loopback.
Addresses in ``X-Forwarded-For`` and in test client peers come from the
documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24,
2001:db8::/32).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import event, select
from sqlalchemy.orm import Session as DbSession

from safereset import crypto
from safereset.logs import TextFormatter
from safereset.passwords import Hasher, HashGate, HashingBusy
from safereset.runtime import Runtime, build
from safereset.store import models
from safereset.store.db import migrate
from safereset.throttle import Rate, RateLimited
from safereset.usecases.base import WAITING_PER_SLOT, client_network
from safereset.web.app import create_app
from safereset.web.security import client_address
from tests.conftest import FakeClock, Mailbox, free_port, make_settings
from tests.e2e_support import Deployment, ServerLauncher, csrf_token
from tests.test_code_method import mailed_code, other_code
from tests.test_security_properties import (
    ALICE,
    NEW_PASSWORD,
    OLD_PASSWORD,
    deliver,
    outbox_messages,
    request_link,
)

BASE_URL = "https://reset.example.test"
UNKNOWN = "nobody@example.com"
# The body of every 429, whichever limit was reached.
LIMITED_BODY = {"error": "rate_limited", "message": "too many requests; try again later"}
SHORT = Rate(3, 60)  # three at once, then one every 20 seconds


def use_limits(runtime: Runtime, monkeypatch: pytest.MonkeyPatch, **rates: Rate) -> None:
    """Replace some of the service's limits for this test."""
    limits = dataclasses.replace(runtime.service.limits, **rates)
    monkeypatch.setattr(runtime.service, "limits", limits)


def assert_limited(response: Any) -> int:
    """Check a 429 response and return its Retry-After in seconds."""
    assert response.status_code == 429, response.text
    assert response.json() == LIMITED_BODY
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit(), retry_after
    assert int(retry_after) > 0
    return int(retry_after)


def recover(client: TestClient, email: str, method: str = "link") -> Any:
    return client.post("/api/recovery", json={"email": email, "method": method})


def log_in(client: TestClient, email: str, password: str) -> Any:
    return client.post("/api/sessions", json={"email": email, "password": password})


@pytest.fixture
def app(runtime: Runtime) -> FastAPI:
    return create_app(runtime, run_worker=False)


@pytest.fixture
def peers(app: FastAPI) -> Iterator[Callable[[str], TestClient]]:
    """Yield a function that returns a test client whose socket peer is the given address."""
    with ExitStack() as stack:

        def from_peer(address: str) -> TestClient:
            return stack.enter_context(TestClient(app, base_url=BASE_URL, client=(address, 50000)))

        yield from_peer


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def limit_log() -> Iterator[list[logging.LogRecord]]:
    """Collect the throttle logger's records, whatever other tests did to logging."""
    handler = ListHandler()
    logger = logging.getLogger("safereset.throttle")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(level)


def scopes(records: list[logging.LogRecord]) -> list[str]:
    """Return the scope of every "rate limit reached" record, in order."""
    return [
        record.ids["scope"]  # type: ignore[attr-defined]
        for record in records
        if record.getMessage() == "rate limit reached"
    ]


# The request path


@contextmanager
def recorded_statements(runtime: Runtime) -> Iterator[list[str]]:
    """Record the SQL text of every statement the service's engine runs."""
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    engine = runtime.service.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


USERS_TABLE = re.compile(r"\busers\b", re.IGNORECASE)


@pytest.mark.threat("T10")
@pytest.mark.parametrize("method", ["link", "code"])
def test_request_path_same_sql(runtime: Runtime, client: TestClient, method: str) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)

    with recorded_statements(runtime) as known:
        assert recover(client, ALICE, method).status_code == 202
    with recorded_statements(runtime) as unknown:
        assert recover(client, UNKNOWN, method).status_code == 202

    assert known != []
    assert unknown == known


@pytest.mark.threat("T10")
@pytest.mark.parametrize("method", ["link", "code"])
def test_request_path_reads_no_users(runtime: Runtime, client: TestClient, method: str) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)

    with recorded_statements(runtime) as request_path:
        assert recover(client, ALICE, method).status_code == 202
    with recorded_statements(runtime) as worker:
        assert runtime.service.process_recovery_requests() == 1

    assert [s for s in request_path if USERS_TABLE.search(s)] == []
    # The worker does look the account up, so the recording does see such statements.
    assert [s for s in worker if USERS_TABLE.search(s)] != []


# Each limit


def test_recovery_limit_per_client(
    runtime: Runtime,
    client: TestClient,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    limit_log: list[logging.LogRecord],
) -> None:
    use_limits(runtime, monkeypatch, recovery_per_client=SHORT)
    for number in range(3):
        assert recover(client, f"user{number}@example.com").status_code == 202

    retry_after = assert_limited(recover(client, "user3@example.com"))

    assert scopes(limit_log) == ["recover_client"]
    clock.advance(seconds=retry_after - 1)
    assert_limited(recover(client, "user3@example.com"))
    clock.advance(seconds=1)
    assert recover(client, "user3@example.com").status_code == 202


@pytest.mark.threat("T13")
def test_recovery_limit_per_address(
    runtime: Runtime,
    peers: Callable[[str], TestClient],
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    limit_log: list[logging.LogRecord],
) -> None:
    use_limits(runtime, monkeypatch, recovery_per_address=SHORT)
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    # Each request comes from another client, in another spelling of the address.
    spellings = [ALICE, "ALICE@EXAMPLE.COM", "Alice@Example.com", "\uff41lice@example.com"]
    for number, spelling in enumerate(spellings[:3]):
        assert recover(peers(f"198.51.100.{number + 1}"), spelling).status_code == 202

    assert_limited(recover(peers("198.51.100.4"), spellings[3]))

    assert scopes(limit_log) == ["recover_address"]
    assert recover(peers("198.51.100.5"), UNKNOWN).status_code == 202
    clock.advance(seconds=60)
    assert recover(peers("198.51.100.6"), ALICE).status_code == 202


def test_recovery_limit_unknown_address(
    runtime: Runtime,
    peers: Callable[[str], TestClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_limits(runtime, monkeypatch, recovery_per_address=SHORT)
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    statuses = {}
    for email in (ALICE, UNKNOWN):
        clients = [peers(f"198.51.100.{n}") for n in range(1, 5)]
        statuses[email] = [recover(peer, email).status_code for peer in clients]

    assert statuses[ALICE] == [202, 202, 202, 429]
    assert statuses[UNKNOWN] == statuses[ALICE]


def completion(client: TestClient, endpoint: str) -> Any:
    """Send a completion with a made-up token or code to the link or the code endpoint."""
    if endpoint == "link":
        body = {"token": crypto.new_token(), "password": NEW_PASSWORD}
        return client.post("/api/recovery/complete", json=body)
    body = {"code": "12345678", "password": NEW_PASSWORD}
    return client.post(f"/api/recovery/flows/{'0' * 32}/complete", json=body)


@pytest.mark.threat("T14")
@pytest.mark.parametrize(
    "endpoints",
    [("link", "link", "link"), ("code", "code", "code"), ("link", "code", "link")],
    ids=["link", "code", "both"],
)
def test_completion_limit_per_client(
    runtime: Runtime,
    client: TestClient,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    limit_log: list[logging.LogRecord],
    endpoints: tuple[str, str, str],
) -> None:
    use_limits(runtime, monkeypatch, completion_per_client=Rate(2, 60))
    first, second, third = endpoints
    assert completion(client, first).status_code == 400
    assert completion(client, second).status_code == 400

    retry_after = assert_limited(completion(client, third))

    assert scopes(limit_log) == ["complete_client"]
    clock.advance(seconds=retry_after)
    assert completion(client, third).status_code == 400


def test_completion_limit_spends_no_attempt(
    runtime: Runtime,
    client: TestClient,
    smtp_server: Mailbox,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_limits(runtime, monkeypatch, completion_per_client=Rate(2, 60))
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    flow = recover(client, ALICE, "code").json()["flow"]
    assert deliver(runtime, smtp_server) == 1
    code = mailed_code(smtp_server.wait_for(1)[0])
    wrong = other_code(code)
    url = f"/api/recovery/flows/{flow}/complete"
    for _ in range(2):
        assert client.post(url, json={"code": wrong, "password": NEW_PASSWORD}).status_code == 400

    assert_limited(client.post(url, json={"code": code, "password": NEW_PASSWORD}))

    with DbSession(runtime.service.engine) as db:
        row = db.get(models.Flow, flow)
        assert row is not None
        assert row.attempts_left == 3
    clock.advance(seconds=60)
    done = client.post(url, json={"code": code, "password": NEW_PASSWORD})
    assert done.status_code == 200


@pytest.mark.threat("T16")
def test_login_limit_per_account(
    runtime: Runtime,
    peers: Callable[[str], TestClient],
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    limit_log: list[logging.LogRecord],
) -> None:
    use_limits(runtime, monkeypatch, login_per_account=SHORT)
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    for number in range(3):
        rejected = log_in(peers(f"203.0.113.{number + 1}"), ALICE, f"guess number {number}")
        assert rejected.status_code == 401

    # Over the limit even the right password gets no session.
    retry_after = assert_limited(log_in(peers("203.0.113.4"), ALICE, OLD_PASSWORD))

    assert scopes(limit_log) == ["login_account"]
    clock.advance(seconds=retry_after)
    assert log_in(peers("203.0.113.5"), ALICE, OLD_PASSWORD).status_code == 201


def test_login_limit_unknown_account(
    runtime: Runtime,
    peers: Callable[[str], TestClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_limits(runtime, monkeypatch, login_per_account=SHORT)
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    statuses = {}
    for email in (ALICE, UNKNOWN):
        clients = [peers(f"203.0.113.{n}") for n in range(1, 5)]
        statuses[email] = [log_in(peer, email, "wrong password").status_code for peer in clients]

    assert statuses[ALICE] == [401, 401, 401, 429]
    assert statuses[UNKNOWN] == statuses[ALICE]


@pytest.mark.threat("T16")
def test_login_limit_per_client(
    runtime: Runtime,
    client: TestClient,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    limit_log: list[logging.LogRecord],
) -> None:
    use_limits(runtime, monkeypatch, login_per_client=SHORT)
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    for number in range(3):
        assert log_in(client, f"user{number}@example.com", "wrong password").status_code == 401

    retry_after = assert_limited(log_in(client, ALICE, OLD_PASSWORD))

    assert scopes(limit_log) == ["login_client"]
    clock.advance(seconds=retry_after)
    assert log_in(client, ALICE, OLD_PASSWORD).status_code == 201


def request_rows(runtime: Runtime) -> list[models.RecoveryRequest]:
    with DbSession(runtime.service.engine) as db:
        query = select(models.RecoveryRequest).order_by(models.RecoveryRequest.requested_at)
        return list(db.scalars(query))


@pytest.mark.threat("T13")
def test_mail_limit_per_account(
    runtime: Runtime,
    peers: Callable[[str], TestClient],
    smtp_server: Mailbox,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    limit_log: list[logging.LogRecord],
) -> None:
    use_limits(runtime, monkeypatch, mail_per_account=Rate(2, 86400))
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    for number in range(3):
        clock.advance(seconds=1)  # keeps the worker's order of the requests fixed
        assert recover(peers(f"192.0.2.{number + 1}"), ALICE).status_code == 202

    assert deliver(runtime, smtp_server) == 2

    rows = request_rows(runtime)
    assert [row.state for row in rows] == ["issued", "issued", "dropped"]
    assert rows[2].reason == "mail_limit"
    assert scopes(limit_log) == ["mail_account"]
    assert len(outbox_messages(runtime)) == 2
    clock.advance(days=1)
    assert recover(peers("192.0.2.4"), ALICE).status_code == 202
    assert deliver(runtime, smtp_server) == 1


# What a 429 looks like


def test_limited_response_same_for_every_scope(
    runtime: Runtime,
    peers: Callable[[str], TestClient],
    monkeypatch: pytest.MonkeyPatch,
    limit_log: list[logging.LogRecord],
) -> None:
    once = Rate(1, 3600)
    use_limits(
        runtime,
        monkeypatch,
        recovery_per_client=once,
        recovery_per_address=once,
        completion_per_client=once,
        login_per_account=once,
        login_per_client=once,
    )
    first, second = peers("192.0.2.10"), peers("192.0.2.20")
    limited = {}

    recover(first, ALICE)
    limited["recover_client"] = recover(first, "other@example.com")
    limited["recover_address"] = recover(second, ALICE)
    completion(first, "link")
    limited["complete_client"] = completion(first, "code")
    log_in(first, "carol@example.com", "wrong password")
    limited["login_client"] = log_in(first, "dave@example.com", "wrong password")
    limited["login_account"] = log_in(second, "carol@example.com", "wrong password")

    assert scopes(limit_log) == list(limited)
    for response in limited.values():
        assert_limited(response)
    expected = limited["recover_client"]
    for response in limited.values():
        assert response.content == expected.content
        assert sorted(response.headers.keys()) == sorted(expected.headers.keys())


def test_limit_log_line_has_no_raw_key(
    runtime: Runtime,
    peers: Callable[[str], TestClient],
    monkeypatch: pytest.MonkeyPatch,
    limit_log: list[logging.LogRecord],
) -> None:
    use_limits(runtime, monkeypatch, recovery_per_client=Rate(1, 60))
    client = peers("198.51.100.77")
    recover(client, ALICE)
    assert_limited(recover(client, ALICE))
    use_limits(runtime, monkeypatch, recovery_per_address=Rate(1, 60))
    assert_limited(recover(peers("198.51.100.78"), ALICE))

    assert len(limit_log) == 2
    for record in limit_log:
        ids: dict[str, str] = record.ids  # type: ignore[attr-defined]
        line = TextFormatter("%(message)s").format(record)
        assert record.getMessage() == "rate limit reached"
        assert set(ids) == {"scope", "key_digest"}
        assert re.fullmatch(r"[0-9a-f]{16}", ids["key_digest"])
        assert f"key_digest={ids['key_digest']}" in line
        for raw in ("198.51.100.77", "198.51.100.78", "alice", "example.com"):
            assert raw not in line


def test_forgot_page_limited(
    runtime: Runtime, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_limits(runtime, monkeypatch, recovery_per_client=Rate(1, 60))
    csrf = csrf_token(client.get("/forgot").text)
    form = {"csrf": csrf, "email": ALICE, "method": "link"}
    assert client.post("/forgot", data=form).status_code == 200

    page = client.post("/forgot", data=form)

    assert page.status_code == 429
    assert int(page.headers["retry-after"]) > 0
    assert "Too many attempts" in page.text


# Two instances over one database


@pytest.fixture
def two_instances(
    database_url: str, tmp_path: Path, clock: FakeClock, cheap_hasher: Hasher
) -> Iterator[tuple[Runtime, Runtime]]:
    """Two runtimes with their own engines over one database, limited to 4 requests a client."""
    runtimes = []
    for name in ("first", "second"):
        settings = make_settings(
            tmp_path / name, database_url=database_url, limit_recovery_per_client="4/1m"
        )
        runtimes.append(build(settings, hasher=cheap_hasher, clock=clock))
    migrate(runtimes[0].service.engine)
    yield runtimes[0], runtimes[1]
    for instance in runtimes:
        instance.service.engine.dispose()


@pytest.mark.threat("T18")
def test_two_instances_share_limit(
    two_instances: tuple[Runtime, Runtime], clock: FakeClock
) -> None:
    first, second = two_instances
    assert first.service.engine is not second.service.engine
    with (
        TestClient(create_app(first, run_worker=False), base_url=BASE_URL) as one,
        TestClient(create_app(second, run_worker=False), base_url=BASE_URL) as two,
    ):
        statuses = [
            recover(instance, f"user{number}@example.com").status_code
            for number, instance in enumerate([one, two, one, two, one, two])
        ]
        assert statuses == [202, 202, 202, 202, 429, 429]
        clock.advance(seconds=15)
        assert recover(two, "late@example.com").status_code == 202
        assert_limited(recover(one, "later@example.com"))


def test_two_instances_race_for_limit(two_instances: tuple[Runtime, Runtime]) -> None:
    apps = [create_app(instance, run_worker=False) for instance in two_instances]
    clients = [TestClient(apps[number % 2], base_url=BASE_URL) for number in range(16)]

    def send(number: int) -> int:
        status: int = recover(clients[number], f"user{number}@example.com").status_code
        return status

    with ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(pool.map(send, range(16)))

    assert sorted(statuses) == [202] * 4 + [429] * 12
    for client in clients:
        client.close()


# Client addresses


TRUSTED = [ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8:ff::/48")]


def scope_of(peer: str | None, *forwarded: str) -> dict[str, Any]:
    """Build an ASGI scope with the peer address and one header line per forwarded value."""
    headers = [(b"x-forwarded-for", value.encode("latin-1")) for value in forwarded]
    return {"type": "http", "client": (peer, 443) if peer else None, "headers": headers}


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        pytest.param("203.0.113.9", (), "203.0.113.9", id="peer-without-header"),
        pytest.param("203.0.113.9", ("198.51.100.1",), "203.0.113.9", id="untrusted-peer"),
        pytest.param("192.0.2.1", ("198.51.100.1",), "198.51.100.1", id="trusted-peer"),
        pytest.param(
            "192.0.2.1", ("198.51.100.66, 203.0.113.7",), "203.0.113.7", id="rightmost-untrusted"
        ),
        pytest.param(
            "192.0.2.1", ("203.0.113.7, 192.0.2.5, 192.0.2.6",), "203.0.113.7", id="trusted-hops"
        ),
        pytest.param(
            "192.0.2.1", ("198.51.100.66", "203.0.113.7"), "203.0.113.7", id="two-header-lines"
        ),
        pytest.param("192.0.2.1", ("192.0.2.5, 192.0.2.6",), "192.0.2.1", id="only-trusted"),
        pytest.param("192.0.2.1", ("",), "192.0.2.1", id="empty-header"),
        pytest.param("192.0.2.1", (" 203.0.113.7 ,, ",), "203.0.113.7", id="blank-entries"),
        pytest.param("192.0.2.1", ("not-an-address",), "192.0.2.1", id="malformed"),
        pytest.param(
            "192.0.2.1", ("203.0.113.7, unknown",), "192.0.2.1", id="malformed-after-client"
        ),
        pytest.param(
            "192.0.2.1", ("garbage, 203.0.113.7",), "203.0.113.7", id="malformed-before-client"
        ),
        pytest.param("192.0.2.1", ("203.0.113.7:4711",), "192.0.2.1", id="with-port"),
        pytest.param("2001:db8:ff::1", ("2001:db8:1::5",), "2001:db8:1::5", id="ipv6-trusted"),
        pytest.param("2001:db8:1::9", ("2001:db8:1::5",), "2001:db8:1::9", id="ipv6-untrusted"),
        pytest.param("2001:db8:ff::1", ("[2001:db8:1::5]",), "2001:db8:ff::1", id="ipv6-brackets"),
        pytest.param("192.0.2.1", ("2001:db8:1::5",), "2001:db8:1::5", id="ipv6-behind-ipv4"),
        pytest.param(None, ("198.51.100.1",), "unknown", id="no-peer"),
    ],
)
def test_client_address(peer: str | None, forwarded: tuple[str, ...], expected: str) -> None:
    assert client_address(scope_of(peer, *forwarded), TRUSTED) == expected


def test_client_address_without_trusted_proxies() -> None:
    scope = scope_of("192.0.2.1", "198.51.100.1")

    assert client_address(scope, []) == "192.0.2.1"


@pytest.mark.threat("T17")
def test_spoofed_forwarded_for_counts_peer(
    runtime: Runtime,
    client: TestClient,
    monkeypatch: pytest.MonkeyPatch,
    limit_log: list[logging.LogRecord],
) -> None:
    use_limits(runtime, monkeypatch, recovery_per_client=SHORT)
    statuses = []
    for number in range(4):
        headers = {"X-Forwarded-For": f"203.0.113.{number + 1}"}
        email = f"user{number}@example.com"
        response = client.post("/api/recovery", json={"email": email}, headers=headers)
        statuses.append(response.status_code)

    assert statuses == [202, 202, 202, 429]
    assert scopes(limit_log) == ["recover_client"]


@pytest.mark.threat("T17")
def test_untrusted_peer_forwarded_for_ignored(
    database_url: str,
    tmp_path: Path,
    clock: FakeClock,
    cheap_hasher: Hasher,
) -> None:
    settings = make_settings(
        tmp_path,
        database_url=database_url,
        trusted_proxies="192.0.2.1",
        limit_recovery_per_client="3/1m",
    )
    runtime = build(settings, hasher=cheap_hasher, clock=clock)
    migrate(runtime.service.engine)
    statuses = []
    # The test client's peer is "testclient", which no trusted network contains.
    with TestClient(create_app(runtime, run_worker=False), base_url=BASE_URL) as client:
        for number in range(4):
            headers = {"X-Forwarded-For": f"198.51.100.{number + 1}, 192.0.2.1"}
            email = f"user{number}@example.com"
            response = client.post("/api/recovery", json={"email": email}, headers=headers)
            statuses.append(response.status_code)
    runtime.service.engine.dispose()

    assert statuses == [202, 202, 202, 429]


@dataclass
class ProxiedDeployment(Deployment):
    """A deployment with extra ``SAFERESET_`` settings for the server."""

    extra: dict[str, str] = field(default_factory=dict)

    def environment(self) -> dict[str, str]:
        return {**super().environment(), **self.extra}


@pytest.mark.e2e
def test_trusted_proxy_forwarded_for(tmp_path: Path) -> None:
    deployment = ProxiedDeployment(
        data_dir=tmp_path / "data",
        mail_url=(tmp_path / "mail").as_uri(),
        port=free_port(),
        extra={
            "SAFERESET_TRUSTED_PROXIES": "127.0.0.1",
            "SAFERESET_LIMIT_RECOVERY_PER_CLIENT": "2/1h",
        },
    )
    launcher = ServerLauncher(deployment, log_folder=tmp_path)
    try:
        server = launcher.start("--no-worker")
        with httpx2.Client(base_url=deployment.public_url, trust_env=False) as http:

            def send(number: int, forwarded: str) -> int:
                response = http.post(
                    "/api/recovery",
                    json={"email": f"user{number}@example.com"},
                    headers={"X-Forwarded-For": forwarded},
                )
                status: int = response.status_code
                return status

            first = [send(number, "203.0.113.1") for number in range(2)]
            # A client behind the proxy that adds a made-up address of its own.
            spoofed = send(2, "198.51.100.99, 203.0.113.1")
            other = send(3, "203.0.113.2")
    finally:
        launcher.stop_all()

    assert first == [202, 202]
    assert spoofed == 429
    assert other == 202
    log = server.log()
    assert "rate limit reached" in log
    assert "scope=recover_client" in log
    for address in ("203.0.113.1", "203.0.113.2", "198.51.100.99"):
        assert address not in log


# Bounded hashing


class BlockingHasher(Hasher):
    """A cheap hasher whose hash and verify wait for ``release`` while ``armed`` is set."""

    def __init__(self, inner: Hasher) -> None:
        self.inner = inner
        self.armed = threading.Event()
        self.entered = threading.Event()
        self.release = threading.Event()

    def _wait(self) -> None:
        if self.armed.is_set():
            self.entered.set()
            assert self.release.wait(timeout=10), "the test never released the hash"

    def hash(self, password: str) -> str:
        self._wait()
        return self.inner.hash(password)

    def verify(self, stored_hash: str | None, password: str) -> bool:
        self._wait()
        return self.inner.verify(stored_hash, password)

    def needs_rehash(self, stored_hash: str) -> bool:
        return self.inner.needs_rehash(stored_hash)


@pytest.fixture
def blocking_hasher(
    runtime: Runtime, cheap_hasher: Hasher, monkeypatch: pytest.MonkeyPatch
) -> BlockingHasher:
    """Give the service one hashing slot and a hasher that the test can hold in it."""
    hasher = BlockingHasher(cheap_hasher)
    monkeypatch.setattr(runtime.service, "hasher", hasher)
    monkeypatch.setattr(runtime.service, "hash_gate", HashGate(1))
    return hasher


@contextmanager
def slot_held(client: TestClient, hasher: BlockingHasher) -> Iterator[list[Any]]:
    """Hold the one hashing slot with a login in another thread; yield its response list."""
    responses: list[Any] = []
    hasher.armed.set()
    holder = threading.Thread(
        target=lambda: responses.append(log_in(client, ALICE, OLD_PASSWORD)), daemon=True
    )
    holder.start()
    try:
        assert hasher.entered.wait(timeout=10), "the login never started hashing"
        hasher.armed.clear()
        yield responses
    finally:
        hasher.release.set()
        holder.join(timeout=10)


def assert_busy(response: Any) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "busy"
    assert response.headers["retry-after"] == "1"


@pytest.mark.threat("T21")
def test_busy_hashing_login(
    runtime: Runtime, client: TestClient, blocking_hasher: BlockingHasher
) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)

    with slot_held(client, blocking_hasher) as holder_responses:
        busy = log_in(client, ALICE, OLD_PASSWORD)
        # The request path hashes nothing, so it still works.
        requested = recover(client, ALICE)
        health = client.get("/healthz")

    assert_busy(busy)
    assert requested.status_code == 202
    assert health.status_code == 200
    assert [response.status_code for response in holder_responses] == [201]
    assert log_in(client, ALICE, OLD_PASSWORD).status_code == 201


def test_busy_hashing_keeps_ticket(
    runtime: Runtime,
    client: TestClient,
    smtp_server: Mailbox,
    blocking_hasher: BlockingHasher,
) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    token = request_link(runtime, smtp_server)
    body = {"token": token, "password": NEW_PASSWORD}

    with slot_held(client, blocking_hasher):
        busy = client.post("/api/recovery/complete", json=body)

    assert_busy(busy)
    assert client.post("/api/recovery/complete", json=body).status_code == 200
    assert log_in(client, ALICE, NEW_PASSWORD).status_code == 201


@pytest.mark.threat("T21")
def test_busy_answer_runs_no_queries(
    runtime: Runtime,
    client: TestClient,
    smtp_server: Mailbox,
    blocking_hasher: BlockingHasher,
) -> None:
    # A flood of password requests that find the gate full must not load the
    # database either: each is turned away before its first query.
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    token = request_link(runtime, smtp_server)
    statements: list[str] = []

    def remember(connection: Any, cursor: Any, statement: str, *rest: Any) -> None:
        statements.append(statement)

    with slot_held(client, blocking_hasher):
        event.listen(runtime.service.engine, "before_cursor_execute", remember)
        try:
            busy_login = log_in(client, ALICE, OLD_PASSWORD)
            busy_complete = client.post(
                "/api/recovery/complete", json={"token": token, "password": NEW_PASSWORD}
            )
        finally:
            event.remove(runtime.service.engine, "before_cursor_execute", remember)

    assert_busy(busy_login)
    assert_busy(busy_complete)
    assert statements == []


@pytest.mark.threat("T21")
def test_hash_gate_bounds_slots() -> None:
    gate = HashGate(2)

    with gate.slot(), gate.slot(), pytest.raises(HashingBusy), gate.slot():
        pass
    with gate.slot(), gate.slot():
        pass  # both slots are free again


def test_hash_gate_frees_slot_on_error() -> None:
    gate = HashGate(1)

    with pytest.raises(RuntimeError), gate.slot():
        raise RuntimeError("hash failed")

    with gate.slot():
        pass


@pytest.mark.parametrize("slots", [0, -1])
def test_hash_gate_rejects_slots(slots: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        HashGate(slots)


def test_hash_gate_from_settings(tmp_path: Path, cheap_hasher: Hasher) -> None:
    settings = make_settings(
        tmp_path, max_concurrent_hashes=1, hash_queue_size=1, hash_wait_seconds=0.05
    )
    runtime = build(settings, hasher=cheap_hasher)

    gate = runtime.service.hash_gate
    assert gate.wait_seconds == 0.05
    with gate.slot(), pytest.raises(HashingBusy), gate.slot():
        pass  # the one place to wait was free, but no slot came in 0.05 s
    runtime.service.engine.dispose()


def test_hash_gate_default_queue(tmp_path: Path, cheap_hasher: Hasher) -> None:
    settings = make_settings(tmp_path, max_concurrent_hashes=2)
    runtime = build(settings, hasher=cheap_hasher)
    gate = runtime.service.hash_gate
    holders = [gate.slot() for _ in range(2)]
    for holder in holders:
        holder.__enter__()
    try:
        waiters = [WaitingHash(gate) for _ in range(WAITING_PER_SLOT * 2)]
        wait_until_busy(gate)

        with pytest.raises(HashingBusy):
            gate.check_free()
    finally:
        for holder in holders:
            holder.__exit__(None, None, None)
    for waiter in waiters:
        waiter.join()
    assert [waiter.outcome for waiter in waiters] == ["hashed"] * len(waiters)
    runtime.service.engine.dispose()


class WaitingHash:
    """A thread that takes a slot of ``gate``, waiting for one if it must."""

    def __init__(self, gate: HashGate) -> None:
        self.outcome = "not done"
        self.thread = threading.Thread(target=self._run, args=(gate,), daemon=True)
        self.thread.start()

    def _run(self, gate: HashGate) -> None:
        try:
            with gate.slot():
                self.outcome = "hashed"
        except HashingBusy:
            self.outcome = "busy"

    def join(self) -> None:
        self.thread.join(timeout=30)


def wait_until_busy(gate: HashGate) -> None:
    """Wait until every slot and every place to wait of ``gate`` is taken."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            gate.check_free()
        except HashingBusy:
            return
        time.sleep(0.01)
    raise AssertionError("the waiting threads never filled the queue")


@pytest.mark.threat("T21")
def test_hash_gate_queue_waits() -> None:
    gate = HashGate(1, waiting=1, wait_seconds=30)

    with gate.slot():
        waiter = WaitingHash(gate)
        wait_until_busy(gate)
        # The queue is full: a third request is turned away at once.
        with pytest.raises(HashingBusy), gate.slot():
            pass
    waiter.join()

    assert waiter.outcome == "hashed"


def test_hash_gate_wait_runs_out() -> None:
    gate = HashGate(1, waiting=1, wait_seconds=0.05)

    with gate.slot():
        waiter = WaitingHash(gate)
        waiter.join()

    assert waiter.outcome == "busy"
    with gate.slot():
        pass  # the waiting place and the slot are free again


@pytest.mark.parametrize(
    ("waiting", "wait_seconds", "message"),
    [(-1, 1.0, "at least 0"), (1, 0.0, "must be positive")],
)
def test_hash_gate_rejects_queue(waiting: int, wait_seconds: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HashGate(1, waiting, wait_seconds)


def test_queued_login_succeeds(
    runtime: Runtime,
    client: TestClient,
    blocking_hasher: BlockingHasher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A login that finds the one slot taken waits in the queue instead of
    # getting 503, and logs in once the slot is free.
    monkeypatch.setattr(runtime.service, "hash_gate", HashGate(1, waiting=1, wait_seconds=30))
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    queued: list[Any] = []

    with slot_held(client, blocking_hasher):
        waiting = threading.Thread(
            target=lambda: queued.append(log_in(client, ALICE, OLD_PASSWORD)), daemon=True
        )
        waiting.start()
        wait_until_busy(runtime.service.hash_gate)
    waiting.join(timeout=30)

    assert [response.status_code for response in queued] == [201]


@pytest.mark.parametrize(
    ("client", "key"),
    [
        (None, None),
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("testclient", "testclient"),
    ],
)
def test_client_network_key(client: str | None, key: str | None) -> None:
    assert client_network(client) == key


@pytest.mark.threat("T17")
def test_ipv6_neighbours_share_limit(runtime: Runtime) -> None:
    limits = dataclasses.replace(runtime.service.limits, recovery_per_client=Rate(2, 60))
    runtime.service.limits = limits
    for host in ("1", "2"):
        runtime.service.request_recovery(f"user{host}@example.com", f"2001:db8:5::{host}")

    with pytest.raises(RateLimited):
        runtime.service.request_recovery("user3@example.com", "2001:db8:5::ffff:3")
    runtime.service.request_recovery("user4@example.com", "2001:db8:6::1")
