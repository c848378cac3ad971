"""One reset through the service and worker, on a real SQLite file and SMTP server."""

from __future__ import annotations

import asyncio
import re

import pytest

from safereset.errors import InvalidCredentials, InvalidSession, InvalidToken
from safereset.mail.transports import SmtpTransport
from safereset.mail.worker import Worker
from safereset.runtime import Runtime
from tests.conftest import Mailbox, text_body


def deliver(runtime: Runtime, mailbox: Mailbox) -> int:
    worker = Worker(
        runtime.outbox,
        SmtpTransport(mailbox.url),
        sender="safereset <no-reply@example.test>",
        public_url=runtime.settings.public_url,
        before_delivery=runtime.service.process_recovery_requests,
    )
    return asyncio.run(worker.deliver_due())


@pytest.mark.threat("T02", "T22")
def test_reset_by_link(runtime: Runtime, smtp_server: Mailbox) -> None:
    service = runtime.service
    service.add_user("Alice@Example.com", "old password 1")
    old_session = service.log_in("alice@example.com", "old password 1")

    service.request_recovery("ALICE@example.COM")
    assert deliver(runtime, smtp_server) == 1
    [mail] = smtp_server.wait_for(1)
    assert mail["To"] == "Alice@example.com"
    match = re.search(
        r"https://reset\.example\.test/recover\?token=(srt_[\w-]{43})", text_body(mail)
    )
    assert match is not None
    token = match.group(1)

    service.check_ticket(token)
    service.check_ticket(token)  # opening the link twice does not use it
    service.complete_recovery(token, "new password 2")

    with pytest.raises(InvalidToken):
        service.complete_recovery(token, "new password 3")
    with pytest.raises(InvalidCredentials):
        service.log_in("alice@example.com", "old password 1")
    with pytest.raises(InvalidSession):
        service.authenticate(old_session)
    new_session = service.log_in("alice@example.com", "new password 2")
    assert service.authenticate(new_session).email == "Alice@example.com"

    assert deliver(runtime, smtp_server) == 1
    notice = smtp_server.wait_for(2)[1]
    assert notice["Subject"] == "Your password was changed"
    assert "srt_" not in text_body(notice)
