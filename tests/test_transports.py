"""Mail transports (folder and SMTP) and composing the MIME message."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from safereset.mail.compose import compose
from safereset.mail.transports import (
    FolderTransport,
    SmtpTransport,
    TransportError,
    transport_from_url,
)
from tests.conftest import Mailbox, free_port, text_body

SENDER = "safereset <no-reply@example.test>"
RECIPIENT = "alice@example.com"
TOKEN = "srt_" + "A" * 43
LINK = f"https://reset.example.test/recover?token={TOKEN}"


def recovery_mail(
    message_id: str = "<0123abcd@reset.example.test>", link: str = LINK
) -> EmailMessage:
    return compose(
        "recovery_link",
        sender=SENDER,
        recipient=RECIPIENT,
        message_id=message_id,
        date=datetime(2026, 1, 15, 12, 0, tzinfo=UTC),
        values={"link": link, "ttl_minutes": 30},
    )


def html_body(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("html",))
    assert part is not None
    content: str = part.get_content()
    return content


def read_eml(path: Path) -> EmailMessage:
    message = message_from_bytes(path.read_bytes(), policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


# Folder transport


def test_folder_writes_eml(tmp_path: Path) -> None:
    folder = tmp_path / "outbox"
    message = recovery_mail()

    asyncio.run(FolderTransport(folder).send(message))

    written = read_eml(folder / "0123abcd@reset.example.test.eml")
    assert written["Message-ID"] == "<0123abcd@reset.example.test>"
    assert written["To"] == RECIPIENT
    assert written["Subject"] == "Reset your password"
    assert text_body(written) == text_body(message)
    assert html_body(written) == html_body(message)


def test_folder_leaves_no_temporary_file(tmp_path: Path) -> None:
    asyncio.run(FolderTransport(tmp_path).send(recovery_mail()))

    assert [path.name for path in tmp_path.iterdir()] == ["0123abcd@reset.example.test.eml"]


def test_folder_second_send_overwrites(tmp_path: Path) -> None:
    transport = FolderTransport(tmp_path)
    first = recovery_mail(link="https://reset.example.test/recover?token=first")
    second = recovery_mail(link="https://reset.example.test/recover?token=second")

    asyncio.run(transport.send(first))
    asyncio.run(transport.send(second))

    files = list(tmp_path.iterdir())
    assert len(files) == 1
    assert "token=second" in text_body(read_eml(files[0]))


def test_folder_slash_in_message_id(tmp_path: Path) -> None:
    folder = tmp_path / "outbox"

    asyncio.run(FolderTransport(folder).send(recovery_mail("<a/../../b@example.test>")))

    assert [path.name for path in folder.iterdir()] == ["a_.._.._b@example.test.eml"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["outbox"]


@pytest.mark.parametrize(
    "folder_below_file",
    [
        "",  # the folder path is itself a regular file
        "outbox",  # the folder's parent is a regular file
    ],
)
def test_folder_unwritable(tmp_path: Path, folder_below_file: str) -> None:
    regular_file = tmp_path / "not-a-folder"
    regular_file.write_text("")
    transport = FolderTransport(regular_file / folder_below_file)

    with pytest.raises(TransportError):
        asyncio.run(transport.send(recovery_mail()))


def test_file_url_gives_folder_transport(tmp_path: Path) -> None:
    folder = tmp_path / "mail folder"

    transport = transport_from_url(folder.as_uri())

    assert isinstance(transport, FolderTransport)
    assert transport.folder == folder


# SMTP transport


@pytest.mark.parametrize(
    ("url", "port", "implicit_tls", "require_starttls"),
    [
        ("smtp://127.0.0.1", 587, False, False),
        ("smtp://127.0.0.1:2525", 2525, False, False),
        ("smtp+starttls://127.0.0.1", 587, False, True),
        ("smtps://127.0.0.1", 465, True, False),
        ("smtps://127.0.0.1:2465", 2465, True, False),
    ],
)
def test_smtp_url_parsed(url: str, port: int, implicit_tls: bool, require_starttls: bool) -> None:
    transport = transport_from_url(url)

    assert isinstance(transport, SmtpTransport)
    assert transport.host == "127.0.0.1"
    assert transport.port == port
    assert transport.implicit_tls is implicit_tls
    assert transport.require_starttls is require_starttls


def test_smtp_describe_hides_credentials() -> None:
    transport = SmtpTransport("smtp://mailer:hunter2hunter2@127.0.0.1:2525")

    description = transport.describe()

    assert "hunter2hunter2" not in description
    assert "mailer" not in description


def test_smtp_delivers(smtp_server: Mailbox) -> None:
    message = recovery_mail()

    asyncio.run(SmtpTransport(smtp_server.url).send(message))

    [received] = smtp_server.wait_for(1)
    assert smtp_server.envelopes == [("no-reply@example.test", [RECIPIENT])]
    assert received["Message-ID"] == "<0123abcd@reset.example.test>"
    assert text_body(received).splitlines() == text_body(message).splitlines()


def test_smtp_closed_port() -> None:
    transport = SmtpTransport(f"smtp://127.0.0.1:{free_port()}")

    with pytest.raises(TransportError):
        asyncio.run(transport.send(recovery_mail()))


@dataclass
class AuthMailbox(Mailbox):
    """A mailbox that accepts one login and records each login attempt."""

    login: bytes = b""
    password: bytes = b""
    attempts: list[tuple[bytes, bytes]] = field(default_factory=list)
    authenticated: list[bool] = field(default_factory=list)

    def check_login(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        self.attempts.append((auth_data.login, auth_data.password))
        accepted = (auth_data.login, auth_data.password) == (self.login, self.password)
        # With handled=False, aiosmtpd itself replies 535 to a rejected login.
        return AuthResult(success=accepted, handled=False)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.authenticated.append(session.authenticated)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def auth_smtp_server() -> Iterator[AuthMailbox]:
    """An aiosmtpd server that offers AUTH without TLS, for loopback tests only."""
    mailbox = AuthMailbox(
        "127.0.0.1", free_port(), login=b"mail user@example.test", password=b"p@ss:w/rd%"
    )
    controller = Controller(
        mailbox,
        hostname=mailbox.host,
        port=mailbox.port,
        authenticator=mailbox.check_login,
        auth_require_tls=False,
    )
    controller.start()
    yield mailbox
    controller.stop()


def test_smtp_login_decodes_url(auth_smtp_server: AuthMailbox) -> None:
    server = auth_smtp_server
    url = f"smtp://mail%20user%40example.test:p%40ss%3Aw%2Frd%25@{server.host}:{server.port}"

    asyncio.run(SmtpTransport(url).send(recovery_mail()))

    server.wait_for(1)
    assert server.attempts == [(b"mail user@example.test", b"p@ss:w/rd%")]
    assert server.authenticated == [True]


def test_smtp_login_rejected(auth_smtp_server: AuthMailbox) -> None:
    server = auth_smtp_server
    url = f"smtp://mail%20user%40example.test:wrong@{server.host}:{server.port}"

    with pytest.raises(TransportError):
        asyncio.run(SmtpTransport(url).send(recovery_mail()))

    assert server.messages == []


# Composing


def test_compose_headers() -> None:
    message = recovery_mail()

    assert message["From"] == SENDER
    assert message["To"] == RECIPIENT
    assert message["Subject"] == "Reset your password"
    assert message["Message-ID"] == "<0123abcd@reset.example.test>"
    assert message["Date"] == "Thu, 15 Jan 2026 12:00:00 +0000"
    assert message["Auto-Submitted"] == "auto-generated"


def test_compose_text_and_html_parts() -> None:
    message = recovery_mail()

    assert message.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in message.iter_parts()] == [
        "text/plain",
        "text/html",
    ]


@pytest.mark.parametrize(
    "link",
    [
        LINK,
        "https://reset.example.test/" + "long-path/" * 12 + f"recover?token={TOKEN}",
    ],
)
def test_compose_link_on_one_line(link: str) -> None:
    message = recovery_mail(link=link)

    assert link in text_body(message).splitlines()


def test_compose_link_survives_transfer(tmp_path: Path) -> None:
    asyncio.run(FolderTransport(tmp_path).send(recovery_mail()))

    written = read_eml(tmp_path / "0123abcd@reset.example.test.eml")

    assert LINK in text_body(written).splitlines()


def test_compose_html_escapes_values() -> None:
    link = 'https://reset.example.test/recover?token=a&b="<script>'

    message = recovery_mail(link=link)

    html = html_body(message)
    assert "<script>" not in html
    assert "&lt;script&gt;" in html
    assert "token=a&amp;b=" in html


def test_compose_html_escapes_recipient() -> None:
    message = compose(
        "password_changed",
        sender=SENDER,
        recipient=RECIPIENT,
        message_id="<0123abcd@reset.example.test>",
        date=datetime(2026, 1, 15, 12, 0, tzinfo=UTC),
        values={
            "recipient": "<b>alice</b>@example.com",
            "changed_at": "2026-01-15 12:00",
            "forgot_url": "https://reset.example.test/forgot?a=1&b=2",
        },
    )

    html = html_body(message)
    assert "<b>alice</b>" not in html
    assert "&lt;b&gt;alice&lt;/b&gt;@example.com" in html
    assert "forgot?a=1&amp;b=2" in html


def test_compose_text_keeps_values_raw() -> None:
    link = "https://reset.example.test/recover?token=a&b=c"

    message = recovery_mail(link=link)

    assert link in text_body(message).splitlines()


def test_compose_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown mail kind"):
        compose(
            "welcome",
            sender=SENDER,
            recipient=RECIPIENT,
            message_id="<0123abcd@reset.example.test>",
            date=datetime(2026, 1, 15, 12, 0, tzinfo=UTC),
            values={},
        )


def test_eml_file_has_link_in_raw_text(tmp_path: Path) -> None:
    """The README greps the token out of the raw .eml file; that must work."""
    asyncio.run(FolderTransport(tmp_path).send(recovery_mail()))

    raw = (tmp_path / "0123abcd@reset.example.test.eml").read_text(encoding="ascii")

    assert f"token={TOKEN}" in raw
