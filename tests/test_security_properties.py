"""Security properties of recovery, checked through the service and real mail delivery.

Each test that uses a database runs on a SQLite file and on a PostgreSQL
schema, with the fake clock. Mail goes through the outbox worker to a real
SMTP server on loopback.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import Callable, Iterator
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session as DbSession

from safereset import crypto
from safereset.errors import InvalidCredentials, InvalidSession, InvalidToken, UserExists
from safereset.logs import REDACTED, configure
from safereset.mail.transports import SmtpTransport
from safereset.mail.worker import Worker
from safereset.passwords import PasswordRejected
from safereset.runtime import Runtime
from safereset.store import models
from tests.conftest import FakeClock, Mailbox, text_body

SENDER = "safereset <no-reply@example.test>"
ALICE = "alice@example.com"
OLD_PASSWORD = "old correct horse 1"
NEW_PASSWORD = "new battery staple 2"

# The loggers that safereset.logs.configure changes. Tests restore them afterwards.
CONFIGURED_LOGGERS = ("safereset", "uvicorn", "uvicorn.error", "uvicorn.access")


# Helpers shared with test_http_input.py


def deliver(runtime: Runtime, mailbox: Mailbox) -> int:
    """Deliver every due outbox message to the SMTP server and return how many were sent."""
    worker = Worker(
        runtime.outbox,
        SmtpTransport(mailbox.url),
        sender=SENDER,
        public_url=runtime.settings.public_url,
        before_delivery=runtime.service.process_recovery_requests,
    )
    return asyncio.run(worker.deliver_due())


def link_token(runtime: Runtime, message: EmailMessage) -> str:
    """Return the token of the recovery link in a delivered mail."""
    prefix = f"{runtime.settings.public_url}/recover?token="
    match = re.search(re.escape(prefix) + r"(\S+)", text_body(message))
    assert match is not None, "the mail contains no recovery link"
    return match.group(1)


def deliver_link(runtime: Runtime, mailbox: Mailbox) -> str:
    """Deliver the one queued recovery mail and return the token of its link."""
    expected = len(mailbox.messages) + 1
    assert deliver(runtime, mailbox) == 1
    return link_token(runtime, mailbox.wait_for(expected)[-1])


def request_link(runtime: Runtime, mailbox: Mailbox, email: str = ALICE) -> str:
    """Request recovery through the service, deliver the mail, return the link's token."""
    runtime.service.request_recovery(email)
    return deliver_link(runtime, mailbox)


def ticket_states(runtime: Runtime, user_id: int | None = None) -> list[str]:
    """Return the states of all tickets, or of one user's tickets, sorted by name."""
    query = select(models.Ticket.state)
    if user_id is not None:
        query = query.where(models.Ticket.user_id == user_id)
    with DbSession(runtime.service.engine) as db:
        return sorted(db.scalars(query))


def outbox_messages(runtime: Runtime) -> list[models.OutboxMessage]:
    with DbSession(runtime.service.engine) as db:
        return list(db.scalars(select(models.OutboxMessage)))


def fullwidth(text: str) -> str:
    """Replace the ASCII letters of ``text`` with their fullwidth forms (U+FF21 to U+FF5A)."""
    return "".join(
        chr(ord(char) + 0xFEE0) if char.isascii() and char.isalpha() else char for char in text
    )


def record_tokens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every token that ``crypto.new_token`` generates from now on, in order."""
    issued: list[str] = []
    original = crypto.new_token

    def recording() -> str:
        token = original()
        issued.append(token)
        return token

    monkeypatch.setattr(crypto, "new_token", recording)
    return issued


# Expiry


@pytest.mark.threat("T23")
@pytest.mark.parametrize("past_expiry", [timedelta(0), timedelta(seconds=1)], ids=["at", "after"])
def test_expiry_rejects_token(
    runtime: Runtime, smtp_server: Mailbox, clock: FakeClock, past_expiry: timedelta
) -> None:
    service = runtime.service
    service.add_user(ALICE, OLD_PASSWORD)
    token = request_link(runtime, smtp_server)

    clock.advance(seconds=(service.token_ttl + past_expiry).total_seconds())

    with pytest.raises(InvalidToken):
        service.complete_recovery(token, NEW_PASSWORD)
    assert ticket_states(runtime) == ["expired"]
    service.log_in(ALICE, OLD_PASSWORD)  # the password did not change


def test_expiry_accepts_just_before(
    runtime: Runtime, smtp_server: Mailbox, clock: FakeClock
) -> None:
    service = runtime.service
    service.add_user(ALICE, OLD_PASSWORD)
    token = request_link(runtime, smtp_server)

    clock.advance(seconds=(service.token_ttl - timedelta(seconds=1)).total_seconds())

    service.complete_recovery(token, NEW_PASSWORD)
    assert ticket_states(runtime) == ["redeemed"]
    service.log_in(ALICE, NEW_PASSWORD)


def test_expiry_api_status(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox, clock: FakeClock
) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    token = request_link(runtime, smtp_server)
    clock.advance(seconds=runtime.service.token_ttl.total_seconds())

    response = client.post(
        "/api/recovery/complete", json={"token": token, "password": NEW_PASSWORD}
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_or_expired_token"
    assert ticket_states(runtime) == ["expired"]


def test_expiry_link_page_status(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox, clock: FakeClock
) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    token = request_link(runtime, smtp_server)
    clock.advance(seconds=runtime.service.token_ttl.total_seconds())

    page = client.get("/recover", params={"token": token})

    assert page.status_code == 400
    assert ticket_states(runtime) == ["expired"]


# Superseding and single use


@pytest.mark.threat("T23")
def test_second_request_supersedes_first(runtime: Runtime, smtp_server: Mailbox) -> None:
    service = runtime.service
    service.add_user(ALICE, OLD_PASSWORD)
    first = request_link(runtime, smtp_server)
    second = request_link(runtime, smtp_server)

    with pytest.raises(InvalidToken):
        service.check_ticket(first)
    with pytest.raises(InvalidToken):
        service.complete_recovery(first, NEW_PASSWORD)
    service.complete_recovery(second, NEW_PASSWORD)
    assert ticket_states(runtime) == ["redeemed", "superseded"]


@pytest.mark.threat("T02")
def test_token_single_use(runtime: Runtime, smtp_server: Mailbox) -> None:
    service = runtime.service
    service.add_user(ALICE, OLD_PASSWORD)
    token = request_link(runtime, smtp_server)
    service.complete_recovery(token, NEW_PASSWORD)

    with pytest.raises(InvalidToken):
        service.complete_recovery(token, "third password 3")
    service.log_in(ALICE, NEW_PASSWORD)  # the second attempt changed nothing


REJECTED_PASSWORDS = [
    pytest.param("7 chars", "at least 8 characters", id="7-characters"),
    pytest.param("p" * 1025, "at most 1024 characters", id="1025-characters"),
    pytest.param(ALICE.upper(), "email address", id="email-upper-case"),
    pytest.param(fullwidth("a") + "lice@example.com", "email address", id="email-fullwidth"),
]


@pytest.mark.parametrize(("password", "reason"), REJECTED_PASSWORDS)
def test_rejected_password_keeps_ticket(
    runtime: Runtime, smtp_server: Mailbox, password: str, reason: str
) -> None:
    service = runtime.service
    service.add_user(ALICE, OLD_PASSWORD)
    token = request_link(runtime, smtp_server)

    with pytest.raises(PasswordRejected, match=reason):
        service.complete_recovery(token, password)

    assert ticket_states(runtime) == ["issued"]
    service.complete_recovery(token, NEW_PASSWORD)
    service.log_in(ALICE, NEW_PASSWORD)


# Addresses

OTHER_FORMS = [
    pytest.param("ALICE@EXAMPLE.COM", id="upper-case"),
    pytest.param(fullwidth("a") + "lice@example.com", id="fullwidth-letter"),
    pytest.param(fullwidth("ALICE@example.com"), id="fullwidth-upper-case"),
]


@pytest.mark.threat("T11", "T12")
@pytest.mark.parametrize("requested", OTHER_FORMS)
def test_mail_goes_to_stored_address(
    runtime: Runtime, smtp_server: Mailbox, requested: str
) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)

    token = request_link(runtime, smtp_server, requested)

    [(_, recipients)] = smtp_server.envelopes
    assert recipients == [ALICE]
    assert smtp_server.messages[0]["To"] == ALICE
    runtime.service.check_ticket(token)


@pytest.mark.threat("T11")
@pytest.mark.parametrize("second", OTHER_FORMS)
def test_folded_duplicate_user_rejected(runtime: Runtime, second: str) -> None:
    runtime.service.add_user(ALICE)

    with pytest.raises(UserExists):
        runtime.service.add_user(second)
    assert [user.email for user in runtime.service.list_users()] == [ALICE]


# Disabled accounts


@pytest.mark.threat("T24")
def test_disabled_account_gets_no_mail(runtime: Runtime, client: TestClient) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    runtime.service.disable_user(ALICE)

    response = client.post("/api/recovery", json={"email": ALICE})

    assert response.status_code == 202
    assert outbox_messages(runtime) == []
    assert ticket_states(runtime) == []


@pytest.mark.threat("T24")
def test_disabling_ends_link_and_sessions(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox
) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    login = client.post("/api/sessions", json={"email": ALICE, "password": OLD_PASSWORD})
    assert login.status_code == 201
    session = login.json()["token"]
    token = request_link(runtime, smtp_server)

    runtime.service.disable_user(ALICE)

    completion = client.post(
        "/api/recovery/complete", json={"token": token, "password": NEW_PASSWORD}
    )
    assert completion.status_code == 400
    assert ticket_states(runtime) == ["revoked"]
    relogin = client.post("/api/sessions", json={"email": ALICE, "password": OLD_PASSWORD})
    assert relogin.status_code == 401
    current = client.get("/api/sessions/current", headers={"Authorization": f"Bearer {session}"})
    assert current.status_code == 401


def test_enabled_account_recovers_again(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox
) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    old_token = request_link(runtime, smtp_server)
    runtime.service.disable_user(ALICE)
    runtime.service.enable_user(ALICE)

    assert client.post("/api/recovery", json={"email": ALICE}).status_code == 202
    new_token = deliver_link(runtime, smtp_server)

    stale = client.post(
        "/api/recovery/complete", json={"token": old_token, "password": NEW_PASSWORD}
    )
    assert stale.status_code == 400
    fresh = client.post(
        "/api/recovery/complete", json={"token": new_token, "password": NEW_PASSWORD}
    )
    assert fresh.status_code == 200
    login = client.post("/api/sessions", json={"email": ALICE, "password": NEW_PASSWORD})
    assert login.status_code == 201


# What a completed reset ends


@pytest.mark.threat("T22")
def test_reset_revokes_sessions_and_tickets(runtime: Runtime, smtp_server: Mailbox) -> None:
    service = runtime.service
    alice = service.add_user(ALICE, OLD_PASSWORD)
    bob = service.add_user("bob@example.com", OLD_PASSWORD)
    sessions = [service.log_in(ALICE, OLD_PASSWORD) for _ in range(2)]
    bob_session = service.log_in("bob@example.com", OLD_PASSWORD)
    token = request_link(runtime, smtp_server)
    bob_token = request_link(runtime, smtp_server, "bob@example.com")
    # Two usable tickets of one user exist only after a race between two
    # requests. The service's own helper creates the second one directly.
    extra_token = crypto.new_token()
    with DbSession(service.engine) as db, db.begin():
        user = db.get(models.User, alice)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(crypto, "new_token", lambda: extra_token)
            service._issue_link(db, user, service.clock())

    service.complete_recovery(token, NEW_PASSWORD)

    for session in sessions:
        with pytest.raises(InvalidSession):
            service.authenticate(session)
    with pytest.raises(InvalidToken):
        service.check_ticket(extra_token)
    assert ticket_states(runtime, alice) == ["redeemed", "revoked"]
    # Another user's session and ticket stay usable.
    assert service.authenticate(bob_session).email == "bob@example.com"
    service.check_ticket(bob_token)
    assert ticket_states(runtime, bob) == ["issued"]


def test_password_changed_notice_has_no_token(runtime: Runtime, smtp_server: Mailbox) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    token = request_link(runtime, smtp_server)

    runtime.service.complete_recovery(token, NEW_PASSWORD)

    [notice_row] = [row for row in outbox_messages(runtime) if row.kind == "password_changed"]
    assert notice_row.recipient == ALICE
    assert notice_row.sealed_secret is None
    assert deliver(runtime, smtp_server) == 1
    notice = smtp_server.wait_for(2)[1]
    assert notice["Subject"] == "Your password was changed"
    assert token not in notice.as_string()
    assert crypto.TOKEN_PATTERN.search(notice.as_string()) is None


def test_login_rejects_old_password_after_reset(runtime: Runtime, smtp_server: Mailbox) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    token = request_link(runtime, smtp_server)

    runtime.service.complete_recovery(token, NEW_PASSWORD)

    with pytest.raises(InvalidCredentials):
        runtime.service.log_in(ALICE, OLD_PASSWORD)


# Logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo what safereset.logs.configure changes on the global loggers."""
    saved = [
        (logger, list(logger.handlers), logger.level, logger.propagate, logger.disabled)
        for logger in map(logging.getLogger, CONFIGURED_LOGGERS)
    ]
    yield
    for logger, handlers, level, propagate, disabled in saved:
        logger.handlers = handlers
        logger.setLevel(level)
        logger.propagate = propagate
        logger.disabled = disabled


def capture_product_log(log_format: str) -> io.StringIO:
    """Configure safereset's logging and send its output to a buffer in place of stderr."""
    configure(log_format, "DEBUG")
    [handler] = logging.getLogger("safereset").handlers
    assert isinstance(handler, logging.StreamHandler)
    buffer = io.StringIO()
    handler.setStream(buffer)
    return buffer


def log_with_token_in_message(logger: logging.Logger, token: str) -> None:
    logger.warning(f"link {token} was opened")


def log_with_token_as_argument(logger: logging.Logger, token: str) -> None:
    logger.warning("link %s was opened", token)


def log_with_token_in_ids(logger: logging.Logger, token: str) -> None:
    logger.warning("link opened", extra={"ids": {"link": token}})


def log_with_token_in_exception(logger: logging.Logger, token: str) -> None:
    try:
        raise ValueError(f"cannot parse {token}")
    except ValueError:
        logger.exception("link failed")


TOKEN_PLACEMENTS = [
    pytest.param(log_with_token_in_message, id="message"),
    pytest.param(log_with_token_as_argument, id="argument"),
    pytest.param(log_with_token_in_ids, id="ids"),
    pytest.param(log_with_token_in_exception, id="exception"),
]


@pytest.mark.threat("T05")
@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("write", TOKEN_PLACEMENTS)
def test_log_filter_redacts_token(
    log_format: str, write: Callable[[logging.Logger, str], None]
) -> None:
    output = capture_product_log(log_format)
    token = crypto.new_token()

    write(logging.getLogger("safereset.test"), token)

    assert REDACTED in output.getvalue()
    assert token not in output.getvalue()


@pytest.mark.threat("T05")
@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_logs_contain_no_secrets(
    runtime: Runtime,
    client: TestClient,
    smtp_server: Mailbox,
    caplog: pytest.LogCaptureFixture,
    log_format: str,
) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    output = capture_product_log(log_format)

    assert client.post("/api/recovery", json={"email": ALICE}).status_code == 202
    token = deliver_link(runtime, smtp_server)
    form = client.get("/recover", params={"token": token})
    assert form.status_code == 200
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert csrf is not None
    done = client.post(
        "/recover",
        data={"csrf": csrf.group(1), "password": NEW_PASSWORD, "password_again": NEW_PASSWORD},
    )
    assert done.status_code == 200
    assert deliver(runtime, smtp_server) == 1
    failed = client.post("/api/sessions", json={"email": ALICE, "password": OLD_PASSWORD})
    assert failed.status_code == 401
    login = client.post("/api/sessions", json={"email": ALICE, "password": NEW_PASSWORD})
    assert login.status_code == 201
    session = login.json()["token"]
    bearer = {"Authorization": f"Bearer {session}"}
    assert client.get("/api/sessions/current", headers=bearer).status_code == 200
    assert client.delete("/api/sessions/current", headers=bearer).status_code == 204

    logged = output.getvalue() + caplog.text
    # These lines show that the capture works in this format.
    assert "ticket redeemed" in logged
    assert "session revoked" in logged
    assert "GET /recover" in logged
    for secret in (token, session, OLD_PASSWORD, NEW_PASSWORD):
        assert secret not in logged


# What the database stores


def database_bytes(runtime: Runtime) -> dict[str, bytes]:
    """Return the raw bytes of the SQLite file and of its write-ahead log, by file name."""
    main = Path(runtime.settings.data_dir) / "safereset.db"
    assert main.exists()
    files = {main.name: main.read_bytes()}
    wal = main.with_name(main.name + "-wal")
    if wal.exists():
        files[wal.name] = wal.read_bytes()
    return files


def table_rows_as_text(engine: Engine) -> dict[str, bytes]:
    """Return every row of every table in the connection's PostgreSQL schema, by table name.

    Each row is cast to its text form, one row per line. That form doubles
    quotes and backslashes inside values, so only secrets without them can be
    searched for as they are.
    """
    quote = engine.dialect.identifier_preparer.quote
    with engine.connect() as connection:
        tables = connection.scalars(
            text(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' "
                "ORDER BY table_name"
            )
        ).all()
        assert tables, "the schema has no tables"
        return {
            table: "\n".join(
                connection.scalars(text(f"SELECT t::text FROM {quote(table)} t"))
            ).encode()
            for table in tables
        }


def stored_content(runtime: Runtime) -> dict[str, bytes]:
    """Return what the database holds: SQLite's files, or PostgreSQL's rows by table."""
    engine = runtime.service.engine
    if engine.dialect.name == "sqlite":
        return database_bytes(runtime)
    assert engine.dialect.name == "postgresql"
    return {f"table {name}": rows for name, rows in table_rows_as_text(engine).items()}


def assert_not_stored(runtime: Runtime, secrets: dict[str, str]) -> None:
    for place, content in stored_content(runtime).items():
        for label, secret in secrets.items():
            assert secret.encode() not in content, f"{label} found in {place}"


@pytest.mark.threat("T07")
def test_database_contains_no_secrets(
    runtime: Runtime, smtp_server: Mailbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = runtime.service
    issued = record_tokens(monkeypatch)
    service.add_user(ALICE, OLD_PASSWORD)
    service.request_recovery(ALICE)
    service.process_recovery_requests()
    [queued_token] = issued

    # The stored address shows that the content read is the real data.
    assert any(ALICE.encode() in content for content in stored_content(runtime).values())
    assert_not_stored(runtime, {"queued recovery token": queued_token, "password": OLD_PASSWORD})

    token = deliver_link(runtime, smtp_server)
    assert token == queued_token
    service.complete_recovery(token, NEW_PASSWORD)
    assert deliver(runtime, smtp_server) == 1
    session = service.log_in(ALICE, NEW_PASSWORD)
    service.authenticate(session)
    service.log_out(session)

    assert_not_stored(
        runtime,
        {
            "recovery token": token,
            "session token": session,
            "old password": OLD_PASSWORD,
            "new password": NEW_PASSWORD,
        },
    )


@pytest.mark.threat("T07")
def test_outbox_secret_erased_after_delivery(runtime: Runtime, smtp_server: Mailbox) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    runtime.service.request_recovery(ALICE)
    runtime.service.process_recovery_requests()

    [queued] = outbox_messages(runtime)
    assert queued.sealed_secret is not None

    deliver_link(runtime, smtp_server)

    [sent] = outbox_messages(runtime)
    assert sent.state == "sent"
    assert sent.sealed_secret is None
