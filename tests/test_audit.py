"""The audit trail records each security event with ids and client, never a secret."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from safereset import audit
from safereset.mail.transports import SmtpTransport
from safereset.mail.worker import Worker
from safereset.runtime import Runtime
from safereset.throttle import Rate
from tests.conftest import SECRET_KEY, Mailbox, text_body

EMAIL = "alice@example.com"


def events(runtime: Runtime) -> list[audit.AuditEntry]:
    return list(reversed(audit.entries(runtime.service.engine)))


def deliver(runtime: Runtime, mailbox: Mailbox) -> None:
    worker = Worker(
        runtime.outbox,
        SmtpTransport(mailbox.url),
        sender="safereset <no-reply@example.test>",
        public_url=runtime.settings.public_url,
        before_delivery=runtime.service.process_recovery_requests,
    )
    asyncio.run(worker.deliver_due())


@pytest.mark.threat("T29")
def test_reset_by_link_is_audited(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox
) -> None:
    user_id = runtime.service.add_user(EMAIL, "old passphrase")
    session = runtime.service.log_in(EMAIL, "old passphrase")
    client.post("/api/recovery", json={"email": EMAIL})
    client.post("/api/recovery", json={"email": "nobody@example.com"})
    deliver(runtime, smtp_server)
    token = re.search(r"token=(srt_[\w-]{43})", text_body(smtp_server.wait_for(1)[0]))
    assert token is not None
    bad = client.post(
        "/api/recovery/complete", json={"token": "srt_" + "x" * 43, "password": "p" * 9}
    )
    good = client.post(
        "/api/recovery/complete", json={"token": token.group(1), "password": "new passphrase"}
    )

    assert bad.status_code == 400
    assert good.status_code == 200
    names = [entry.event for entry in events(runtime)]
    assert names == [
        "recovery_requested",
        "recovery_requested",
        "ticket_issued",
        "request_dropped",
        "reset_rejected",
        "sessions_revoked",
        "reset_completed",
    ]
    completed = events(runtime)[-1]
    assert completed.user_id == user_id
    assert completed.client == "testclient"
    dropped = events(runtime)[3]
    assert dropped.detail == "no_account"
    assert dropped.user_id is None
    for entry in events(runtime):
        text = repr(entry)
        assert token.group(1) not in text
        assert session not in text
        assert "passphrase" not in text
        assert "nobody@example.com" not in text


@pytest.mark.threat("T29")
def test_throttled_request_is_audited(runtime: Runtime, client: TestClient) -> None:
    runtime.service.limits = runtime.service.limits.__class__(recovery_per_client=Rate(1, 60))
    client.post("/api/recovery", json={"email": EMAIL})

    response = client.post("/api/recovery", json={"email": EMAIL})

    assert response.status_code == 429
    last = events(runtime)[-1]
    assert last.event == "throttled"
    assert last.subject == "recover_client"
    assert last.client == "testclient"
    assert last.detail is not None
    assert EMAIL not in last.detail


def test_disable_and_operator_link_are_audited(runtime: Runtime) -> None:
    user_id = runtime.service.add_user(EMAIL)
    runtime.service.issue_operator_link(EMAIL)
    runtime.service.disable_user(EMAIL)
    runtime.service.enable_user(EMAIL)

    names = [(entry.event, entry.user_id) for entry in events(runtime)]

    assert names == [
        ("operator_link_issued", user_id),
        ("user_disabled", user_id),
        ("user_enabled", user_id),
    ]


def test_unknown_event_rejected(runtime: Runtime) -> None:
    with runtime.service._transaction() as db, pytest.raises(ValueError, match="unknown audit"):
        audit.record(db, "made_up", runtime.service.clock())


def test_audit_command(tmp_path: Path) -> None:
    safereset = Path(sys.executable).with_name("safereset")
    environment = {
        **os.environ,
        "SAFERESET_DATA_DIR": str(tmp_path),
        "SAFERESET_SECRET_KEY": SECRET_KEY,
    }
    for arguments in (["migrate"], ["user", "add", EMAIL], ["user", "disable", EMAIL]):
        subprocess.run([str(safereset), *arguments], env=environment, check=True, timeout=60)

    result = subprocess.run(
        [str(safereset), "audit", "--user", EMAIL],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    [line] = result.stdout.splitlines()
    assert line.split("\t")[1:3] == ["user_disabled", "1"]


def test_rejected_code_shows_under_user(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox
) -> None:
    user_id = runtime.service.add_user(EMAIL)
    flow = client.post("/api/recovery", json={"email": EMAIL, "method": "code"}).json()["flow"]
    deliver(runtime, smtp_server)

    response = client.post(
        f"/api/recovery/flows/{flow}/complete", json={"code": "00000000", "password": "p" * 9}
    )

    assert response.status_code == 400
    rejected = audit.entries(runtime.service.engine, user_id=user_id)[0]
    assert rejected.event == "reset_rejected"
    assert rejected.subject == flow
    requested = [entry for entry in events(runtime) if entry.event == "recovery_requested"]
    assert requested[0].detail == f"code flow {flow}"
