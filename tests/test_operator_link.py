"""`safereset recovery link`: an operator gets a one-time link to hand over."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from safereset.errors import AccountDisabled, InvalidToken, UserNotFound
from safereset.runtime import Runtime
from safereset.store import models
from tests.conftest import SECRET_KEY

LINK = re.compile(r"https://reset\.example\.test/recover\?token=(srt_[\w-]{43})")
SAFERESET = Path(sys.executable).with_name("safereset")


def test_operator_link_completes_reset(runtime: Runtime) -> None:
    service = runtime.service
    service.add_user("alice@example.com", "old passphrase")
    session = service.log_in("alice@example.com", "old passphrase")

    link = service.issue_operator_link("ALICE@example.com")

    match = LINK.fullmatch(link)
    assert match is not None
    service.complete_recovery(match.group(1), "new passphrase")
    assert service.log_in("alice@example.com", "new passphrase")
    with pytest.raises(InvalidToken):
        service.complete_recovery(match.group(1), "third passphrase")
    assert session not in link


def test_operator_link_mails_nothing(runtime: Runtime) -> None:
    runtime.service.add_user("alice@example.com")

    runtime.service.issue_operator_link("alice@example.com")

    with runtime.service._transaction() as db:
        assert db.query(models.OutboxMessage).count() == 0


def test_operator_link_supersedes_older(runtime: Runtime) -> None:
    runtime.service.add_user("alice@example.com")
    first = LINK.fullmatch(runtime.service.issue_operator_link("alice@example.com"))
    assert first is not None

    runtime.service.issue_operator_link("alice@example.com")

    with pytest.raises(InvalidToken):
        runtime.service.check_ticket(first.group(1))


def test_operator_link_refusals(runtime: Runtime) -> None:
    runtime.service.add_user("bob@example.com")
    runtime.service.disable_user("bob@example.com")

    with pytest.raises(UserNotFound):
        runtime.service.issue_operator_link("nobody@example.com")
    with pytest.raises(AccountDisabled):
        runtime.service.issue_operator_link("bob@example.com")


def test_operator_link_command(tmp_path: Path) -> None:
    environment = {
        **os.environ,
        "SAFERESET_DATA_DIR": str(tmp_path),
        "SAFERESET_SECRET_KEY": SECRET_KEY,
        "SAFERESET_PUBLIC_URL": "https://reset.example.test",
    }
    for arguments in (["migrate"], ["user", "add", "alice@example.com"]):
        subprocess.run([str(SAFERESET), *arguments], env=environment, check=True, timeout=60)

    result = subprocess.run(
        [str(SAFERESET), "recovery", "link", "alice@example.com"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    unknown = subprocess.run(
        [str(SAFERESET), "recovery", "link", "nobody@example.com"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0
    match = LINK.fullmatch(result.stdout.strip())
    assert match is not None
    assert match.group(1) not in result.stderr  # never in a log line
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "Error: no account for nobody@example.com"
