"""End-to-end tests: a real Uvicorn server, a real SMTP server and the CLI, all on loopback.

The server runs as `safereset serve` in a subprocess, as an operator would
start it, with the real Argon2 parameters. Mail goes over SMTP to an aiosmtpd
server in this process (the `smtp_server` fixture).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import httpx2
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session as DbSession

from safereset.mail.outbox import LeasedMail
from safereset.mail.transports import SmtpTransport
from safereset.mail.worker import Worker
from safereset.runtime import Runtime
from safereset.store import models
from tests.conftest import FakeClock, Mailbox, free_port
from tests.e2e_support import Deployment, ServerLauncher, csrf_token, recovery_link, token_of

pytestmark = pytest.mark.e2e

EMAIL = "Alice.Example@example.com"
OLD_PASSWORD = "old correct horse 1"
NEW_PASSWORD = "new battery staple 2"
OTHER_PASSWORD = "third password 3"


@pytest.fixture
def deployment(tmp_path: Path, smtp_server: Mailbox) -> Deployment:
    return Deployment(data_dir=tmp_path / "data", mail_url=smtp_server.url, port=free_port())


@pytest.fixture
def launcher(deployment: Deployment, tmp_path: Path) -> Iterator[ServerLauncher]:
    servers = ServerLauncher(deployment, log_folder=tmp_path)
    yield servers
    servers.stop_all()


def new_browser(public_url: str) -> httpx2.Client:
    """Create an HTTP client that keeps cookies like a browser and ignores proxy variables."""
    return httpx2.Client(base_url=public_url, trust_env=False, timeout=10.0)


@pytest.fixture
def browser(deployment: Deployment) -> Iterator[httpx2.Client]:
    with new_browser(deployment.public_url) as client:
        yield client


def html_body(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("html",))
    assert part is not None
    content: str = part.get_content()
    return content


def log_in(client: httpx2.Client, email: str, password: str) -> httpx2.Response:
    return client.post("/api/sessions", json={"email": email, "password": password})


def current_user(client: httpx2.Client, session_token: str) -> httpx2.Response:
    return client.get("/api/sessions/current", headers={"Authorization": f"Bearer {session_token}"})


def open_session(client: httpx2.Client, email: str, password: str) -> str:
    response = log_in(client, email, password)
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


def request_link_through_pages(client: httpx2.Client, email: str) -> None:
    form = client.get("/forgot")
    assert form.status_code == 200

    sent = client.post("/forgot", data={"csrf": csrf_token(form.text), "email": email})
    assert sent.status_code == 200, sent.text
    assert "Check your mail" in sent.text


def open_link(client: httpx2.Client, link: str) -> httpx2.Response:
    """Open a recovery link as a browser does and return the page it leads to."""
    opened = client.get(link)
    assert opened.status_code == 303
    assert opened.headers["Location"] == "/recover"
    assert "safereset_recovery" in client.cookies
    return client.get("/recover")


def set_password_through_pages(client: httpx2.Client, form_page: str, password: str) -> None:
    submitted = client.post(
        "/recover",
        data={"csrf": csrf_token(form_page), "password": password, "password_again": password},
    )
    assert submitted.status_code == 303, submitted.text
    assert submitted.headers["Location"] == "/recover/done"

    done = client.get("/recover/done")
    assert done.status_code == 200
    assert "Password changed" in done.text


@dataclass(frozen=True)
class PageReset:
    """Secrets from a finished reset through the pages, for later checks."""

    link: str
    token: str
    old_session: str


def reset_through_pages(client: httpx2.Client, mailbox: Mailbox, public_url: str) -> PageReset:
    """Log in, reset the password with the forgot and recover pages, and return the secrets."""
    old_session = open_session(client, EMAIL, OLD_PASSWORD)

    request_link_through_pages(client, EMAIL)
    [mail] = mailbox.wait_for(1)
    assert mail["Subject"] == "Reset your password"
    link = recovery_link(mail)
    assert link.startswith(f"{public_url}/recover?token=srt_")

    form = open_link(client, link)
    assert form.status_code == 200, form.text
    assert 'name="password_again"' in form.text
    set_password_through_pages(client, form.text, NEW_PASSWORD)
    return PageReset(link=link, token=token_of(link), old_session=old_session)


def test_page_reset_full_flow(
    launcher: ServerLauncher, deployment: Deployment, smtp_server: Mailbox, browser: httpx2.Client
) -> None:
    launcher.start()
    deployment.add_user(EMAIL, OLD_PASSWORD)
    old_session = open_session(browser, EMAIL, OLD_PASSWORD)
    assert current_user(browser, old_session).status_code == 200

    request_link_through_pages(browser, EMAIL)
    [mail] = smtp_server.wait_for(1)
    link = recovery_link(mail)
    assert link.startswith(f"{deployment.public_url}/recover?token=srt_")
    assert f'href="{link}"' in html_body(mail)
    token = token_of(link)

    form = open_link(browser, link)
    assert form.status_code == 200, form.text
    assert "Choose a new password" in form.text
    assert form.headers["Referrer-Policy"] == "no-referrer"
    assert form.headers["Cache-Control"] == "no-store"
    assert token not in form.text
    set_password_through_pages(browser, form.text, NEW_PASSWORD)

    assert log_in(browser, EMAIL, NEW_PASSWORD).status_code == 201
    assert log_in(browser, EMAIL, OLD_PASSWORD).status_code == 401
    assert current_user(browser, old_session).status_code == 401

    reopened = open_link(browser, link)
    assert reopened.status_code == 400
    assert "Link invalid or expired" in reopened.text

    reused = browser.post(
        "/api/recovery/complete", json={"token": token, "password": OTHER_PASSWORD}
    )
    assert reused.status_code == 400
    assert reused.json()["error"] == "invalid_or_expired_token"
    assert log_in(browser, EMAIL, OTHER_PASSWORD).status_code == 401

    notice = smtp_server.wait_for(2)[1]
    assert notice["Subject"] == "Your password was changed"
    assert notice["To"] == EMAIL
    assert "srt_" not in notice.as_string()


STORED_EMAIL = "Bob.Smith@example.com"


def fullwidth(text: str) -> str:
    """Replace each ASCII letter of ``text`` with its fullwidth form (U+FF21 to U+FF5A)."""
    return "".join(
        chr(ord(char) + 0xFEE0) if char.isascii() and char.isalpha() else char for char in text
    )


@pytest.mark.parametrize(
    "requested_email",
    ["BOB.SMITH@EXAMPLE.COM", fullwidth("BOB.SMITH") + "@example.com"],
    ids=["upper-case", "fullwidth"],
)
def test_api_reset_mails_stored_address(
    launcher: ServerLauncher,
    deployment: Deployment,
    smtp_server: Mailbox,
    browser: httpx2.Client,
    requested_email: str,
) -> None:
    launcher.start()
    deployment.add_user(STORED_EMAIL, OLD_PASSWORD)
    old_session = open_session(browser, STORED_EMAIL, OLD_PASSWORD)
    assert current_user(browser, old_session).status_code == 200

    requested = browser.post(
        "/api/recovery", json={"email": requested_email}, headers={"Host": "evil.example"}
    )
    assert requested.status_code == 202, requested.text
    assert requested.json()["status"] == "accepted"

    [mail] = smtp_server.wait_for(1)
    [(_, envelope_recipients)] = smtp_server.envelopes
    assert envelope_recipients == [STORED_EMAIL]
    assert mail["To"] == STORED_EMAIL
    assert "evil.example" not in mail.as_string()
    link = recovery_link(mail)
    assert link.startswith(f"{deployment.public_url}/recover?token=srt_")

    token = token_of(link)
    completed = browser.post(
        "/api/recovery/complete", json={"token": token, "password": NEW_PASSWORD}
    )
    assert completed.status_code == 200, completed.text
    assert completed.json() == {"status": "password_changed"}

    assert log_in(browser, requested_email, NEW_PASSWORD).status_code == 201
    assert log_in(browser, STORED_EMAIL, OLD_PASSWORD).status_code == 401
    assert current_user(browser, old_session).status_code == 401

    reused = browser.post(
        "/api/recovery/complete", json={"token": token, "password": OTHER_PASSWORD}
    )
    assert reused.status_code == 400
    assert reused.json()["error"] == "invalid_or_expired_token"

    notice = smtp_server.wait_for(2)[1]
    assert smtp_server.envelopes[1][1] == [STORED_EMAIL]
    assert notice["Subject"] == "Your password was changed"
    assert "srt_" not in notice.as_string()


@pytest.mark.threat("T26")
def test_killed_server_mail_sent_by_worker(
    launcher: ServerLauncher, deployment: Deployment, smtp_server: Mailbox, browser: httpx2.Client
) -> None:
    server = launcher.start("--no-worker")
    deployment.add_user(EMAIL, OLD_PASSWORD)
    requested = browser.post("/api/recovery", json={"email": EMAIL})
    assert requested.status_code == 202, requested.text

    # The request committed the ticket and its mail. The process now dies before any delivery.
    server.kill()
    assert smtp_server.messages == []

    first_run = deployment.run_command("worker", "--once")
    assert first_run.stdout.strip() == "delivered 1 message(s)"
    [mail] = smtp_server.wait_for(1)

    second_run = deployment.run_command("worker", "--once")
    assert second_run.stdout.strip() == "delivered 0 message(s)"
    assert len(smtp_server.messages) == 1

    # A new server on the same address and data folder accepts the link.
    launcher.start("--no-worker")
    with new_browser(deployment.public_url) as later_browser:
        form = open_link(later_browser, recovery_link(mail))
        assert form.status_code == 200, form.text
        set_password_through_pages(later_browser, form.text, NEW_PASSWORD)
        assert log_in(later_browser, EMAIL, NEW_PASSWORD).status_code == 201


def outbox_rows(runtime: Runtime) -> list[models.OutboxMessage]:
    with DbSession(runtime.service.engine) as db:
        return list(db.scalars(select(models.OutboxMessage)).all())


def smtp_worker(runtime: Runtime, mailbox: Mailbox) -> Worker:
    return Worker(
        runtime.outbox,
        SmtpTransport(mailbox.url),
        sender=runtime.settings.mail_from,
        public_url=runtime.settings.public_url,
        name="restarted-worker",
        before_delivery=runtime.service.process_recovery_requests,
    )


def abandon_lease(runtime: Runtime) -> LeasedMail:
    """Queue a recovery mail and lease it to a worker that never reports back."""
    runtime.service.add_user(EMAIL, OLD_PASSWORD)
    runtime.service.request_recovery(EMAIL)
    runtime.service.process_recovery_requests()
    leased = runtime.outbox.lease_next("dead-worker")
    assert leased is not None
    return leased


def test_abandoned_lease_taken_over(
    runtime: Runtime, clock: FakeClock, smtp_server: Mailbox
) -> None:
    abandon_lease(runtime)
    worker = smtp_worker(runtime, smtp_server)
    assert asyncio.run(worker.deliver_due()) == 0  # the dead worker's lease still runs

    clock.advance(seconds=runtime.settings.mail_lease_seconds + 1)
    assert asyncio.run(worker.deliver_due()) == 1
    [mail] = smtp_server.wait_for(1)
    assert asyncio.run(worker.deliver_due()) == 0
    assert len(smtp_server.messages) == 1

    [row] = outbox_rows(runtime)
    assert row.state == "sent"
    assert row.attempt == 2  # the lost lease counts as the first attempt
    assert row.sealed_secret is None

    runtime.service.complete_recovery(token_of(recovery_link(mail)), NEW_PASSWORD)


def test_late_report_after_takeover_ignored(
    runtime: Runtime, clock: FakeClock, smtp_server: Mailbox
) -> None:
    abandoned = abandon_lease(runtime)
    clock.advance(seconds=runtime.settings.mail_lease_seconds + 1)
    assert asyncio.run(smtp_worker(runtime, smtp_server).deliver_due()) == 1

    assert runtime.outbox.delivered(abandoned) is False
    [row] = outbox_rows(runtime)
    assert row.state == "sent"
    assert row.worker is None


@pytest.mark.threat("T05")
def test_server_log_hides_secrets(
    launcher: ServerLauncher, deployment: Deployment, smtp_server: Mailbox, browser: httpx2.Client
) -> None:
    server = launcher.start()
    deployment.add_user(EMAIL, OLD_PASSWORD)
    reset = reset_through_pages(browser, smtp_server, deployment.public_url)

    # Failed requests are logged too: a used link, the old password and the old session.
    assert open_link(browser, reset.link).status_code == 400
    assert log_in(browser, EMAIL, OLD_PASSWORD).status_code == 401
    assert current_user(browser, reset.old_session).status_code == 401
    smtp_server.wait_for(2)
    server.stop()
    log = server.log()

    assert reset.token not in log
    assert reset.old_session not in log
    assert OLD_PASSWORD not in log
    assert NEW_PASSWORD not in log
    assert "srt_" not in log
    assert "?token=" not in log
    assert re.search(r"GET /recover 303 [\d.]+ms", log), log
    assert re.search(r"GET /recover 200 [\d.]+ms", log), log
    assert re.search(r"POST /recover 303 [\d.]+ms", log), log
    assert re.search(r"GET /recover 400 [\d.]+ms", log), log
