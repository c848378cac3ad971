"""Rotating the secret key keeps outstanding links, codes, sessions and queued mail working."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from safereset.errors import InvalidSession, InvalidToken
from safereset.mail.transports import SmtpTransport
from safereset.mail.worker import Worker
from safereset.passwords import Hasher
from safereset.runtime import Runtime, build
from safereset.settings import SettingsError, load_settings
from safereset.store.db import migrate
from tests.conftest import FakeClock, Mailbox, make_settings, text_body

OLD_KEY = "old-secret-key-0123456789abcdef0123456789"
NEW_KEY = "new-secret-key-0123456789abcdef0123456789"
EMAIL = "alice@example.com"


def runtime_with(keys: str, tmp_path: Path, url: str, clock: FakeClock, hasher: Hasher) -> Runtime:
    settings = make_settings(tmp_path, database_url=url, secret_key=None, secret_keys=keys)
    built = build(settings, hasher=hasher, clock=clock)
    migrate(built.service.engine)
    return built


def deliver(runtime: Runtime, mailbox: Mailbox) -> int:
    worker = Worker(
        runtime.outbox,
        SmtpTransport(mailbox.url),
        sender="safereset <no-reply@example.test>",
        public_url=runtime.settings.public_url,
        before_delivery=runtime.service.process_recovery_requests,
    )
    return asyncio.run(worker.deliver_due())


@pytest.mark.threat("T25")
def test_rotation_keeps_outstanding_secrets(
    tmp_path: Path,
    database_url: str,
    clock: FakeClock,
    cheap_hasher: Hasher,
    smtp_server: Mailbox,
) -> None:
    before = runtime_with(OLD_KEY, tmp_path, database_url, clock, cheap_hasher)
    before.service.add_user(EMAIL, "old passphrase")
    session = before.service.log_in(EMAIL, "old passphrase")
    before.service.request_recovery(EMAIL)
    before.service.process_recovery_requests()  # queued and sealed under the old key
    before.service.engine.dispose()

    after = runtime_with(f"{NEW_KEY},{OLD_KEY}", tmp_path, database_url, clock, cheap_hasher)
    assert deliver(after, smtp_server) == 1
    [mail] = smtp_server.wait_for(1)
    match = re.search(r"token=(srt_[\w-]{43})", text_body(mail))
    assert match is not None

    assert after.service.authenticate(session).email == EMAIL
    after.service.complete_recovery(match.group(1), "new passphrase")
    with pytest.raises(InvalidSession):
        after.service.authenticate(session)
    after.service.engine.dispose()


@pytest.mark.threat("T25")
def test_dropped_key_ends_its_secrets(
    tmp_path: Path, database_url: str, clock: FakeClock, cheap_hasher: Hasher
) -> None:
    before = runtime_with(OLD_KEY, tmp_path, database_url, clock, cheap_hasher)
    before.service.add_user(EMAIL, "old passphrase")
    session = before.service.log_in(EMAIL, "old passphrase")
    before.service.engine.dispose()

    after = runtime_with(NEW_KEY, tmp_path, database_url, clock, cheap_hasher)

    with pytest.raises(InvalidSession):
        after.service.authenticate(session)
    with pytest.raises(InvalidToken):
        after.service.check_ticket("srt_" + "A" * 43)
    after.service.engine.dispose()


def test_new_secrets_use_first_key(
    tmp_path: Path, database_url: str, clock: FakeClock, cheap_hasher: Hasher
) -> None:
    rotating = runtime_with(f"{NEW_KEY},{OLD_KEY}", tmp_path, database_url, clock, cheap_hasher)
    rotating.service.add_user(EMAIL, "old passphrase")
    session = rotating.service.log_in(EMAIL, "old passphrase")
    rotating.service.engine.dispose()

    only_new = runtime_with(NEW_KEY, tmp_path, database_url, clock, cheap_hasher)

    assert only_new.service.authenticate(session).email == EMAIL
    only_new.service.engine.dispose()


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"SAFERESET_SECRET_KEYS": f"{NEW_KEY},short"}, "key 2 must be at least 32 bytes"),
        ({"SAFERESET_SECRET_KEYS": f"{NEW_KEY},,{OLD_KEY}"}, "none empty"),
        ({"SAFERESET_SECRET_KEYS": NEW_KEY, "SAFERESET_SECRET_KEY": OLD_KEY}, "not both"),
    ],
)
def test_invalid_key_list(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], expected: str
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)

    with pytest.raises(SettingsError, match=expected) as raised:
        load_settings()

    assert "SAFERESET_SECRET_KEYS" in str(raised.value)
    assert NEW_KEY not in str(raised.value)
