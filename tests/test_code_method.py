"""Recovery by code: the API, the mail, the five-try budget, expiry and the HTML pages.

Every test runs on SQLite and on PostgreSQL. Mail goes through the outbox
worker, which resolves recovery requests first, to a real SMTP server on
loopback.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session as DbSession

from safereset.passwords import Hasher, HashGate
from safereset.runtime import Runtime
from safereset.store import models
from tests.conftest import FakeClock, Mailbox, text_body
from tests.e2e_support import csrf_token
from tests.test_security_properties import (
    ALICE,
    NEW_PASSWORD,
    OLD_PASSWORD,
    deliver,
    deliver_link,
    outbox_messages,
)

UNKNOWN = "nobody@example.com"
FLOW_ID = re.compile(r"[0-9a-f]{32}")
# Headers that differ between any two responses, whatever the request.
PER_RESPONSE_HEADERS = {"date", "x-request-id"}
WRONG_CODE = {"error": "invalid_or_expired_code", "message": "the code is wrong, used or expired"}


def request_code(client: TestClient, email: str = ALICE) -> Any:
    return client.post("/api/recovery", json={"email": email, "method": "code"})


def start_flow(client: TestClient, email: str = ALICE) -> str:
    """Request a code and return the flow id of the response."""
    response = request_code(client, email)
    assert response.status_code == 202, response.text
    flow: str = response.json()["flow"]
    return flow


def mailed_code(message: EmailMessage) -> str:
    """Return the 8-digit code on its own line in a code mail."""
    assert message["Subject"] == "Your password reset code"
    match = re.search(r"^[ \t]*(\d{8})[ \t\r]*$", text_body(message), re.MULTILINE)
    assert match is not None, f"the mail contains no code:\n{text_body(message)}"
    return match.group(1)


def deliver_code(runtime: Runtime, mailbox: Mailbox) -> str:
    """Deliver the one queued code mail and return its code."""
    expected = len(mailbox.messages) + 1
    assert deliver(runtime, mailbox) == 1
    return mailed_code(mailbox.wait_for(expected)[-1])


def other_code(code: str) -> str:
    """Return a well-formed code that differs from ``code``."""
    return f"{(int(code) + 1) % 10**8:08d}"


def complete(client: TestClient, flow: str, code: str, password: str = NEW_PASSWORD) -> Any:
    return client.post(
        f"/api/recovery/flows/{flow}/complete", json={"code": code, "password": password}
    )


def flow_row(runtime: Runtime, flow: str) -> models.Flow:
    with DbSession(runtime.service.engine) as db:
        row = db.get(models.Flow, flow)
        assert row is not None, f"no flow {flow}"
        return row


def log_in(client: TestClient, password: str, email: str = ALICE) -> Any:
    return client.post("/api/sessions", json={"email": email, "password": password})


def stable_headers(response: Any) -> list[tuple[str, str]]:
    items = response.headers.multi_items()
    return sorted((name, value) for name, value in items if name not in PER_RESPONSE_HEADERS)


def assert_alike(first: Any, second: Any) -> None:
    """Check that two responses have the same status, body and headers."""
    assert second.status_code == first.status_code
    assert second.content == first.content
    assert stable_headers(second) == stable_headers(first)


@pytest.fixture
def alice(runtime: Runtime) -> int:
    return runtime.service.add_user(ALICE, OLD_PASSWORD)


# Requesting a code


@pytest.mark.usefixtures("alice")
@pytest.mark.parametrize("email", [ALICE, UNKNOWN])
def test_request_returns_flow(client: TestClient, email: str) -> None:
    response = request_code(client, email)

    assert response.status_code == 202
    assert FLOW_ID.fullmatch(response.json()["flow"])


@pytest.mark.threat("T09")
@pytest.mark.usefixtures("alice")
def test_request_unknown_alike(client: TestClient) -> None:
    known = request_code(client, ALICE)
    unknown = request_code(client, UNKNOWN)

    assert unknown.status_code == known.status_code
    assert sorted(unknown.json()) == sorted(known.json())
    assert {**unknown.json(), "flow": ""} == {**known.json(), "flow": ""}
    # Flow ids have one length, so even Content-Length matches.
    assert stable_headers(unknown) == stable_headers(known)


@pytest.mark.usefixtures("alice")
def test_request_new_flow_each_time(client: TestClient) -> None:
    assert start_flow(client) != start_flow(client)


@pytest.mark.usefixtures("alice")
def test_code_mail(runtime: Runtime, client: TestClient, smtp_server: Mailbox) -> None:
    start_flow(client)

    code = deliver_code(runtime, smtp_server)

    [message] = smtp_server.messages
    assert message["To"] == ALICE
    assert re.fullmatch(r"\d{8}", code)
    html = message.get_body(preferencelist=("html",))
    assert html is not None
    assert code in html.get_content()


@pytest.mark.usefixtures("alice")
def test_unknown_address_no_mail(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox
) -> None:
    start_flow(client, UNKNOWN)

    assert deliver(runtime, smtp_server) == 0
    assert smtp_server.messages == []


# Completing with the code


def test_code_completes_reset(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox, alice: int
) -> None:
    session = log_in(client, OLD_PASSWORD).json()["token"]
    flow = start_flow(client)
    code = deliver_code(runtime, smtp_server)

    done = complete(client, flow, code)

    assert done.status_code == 200
    assert done.json() == {"status": "password_changed"}
    assert flow_row(runtime, flow).state == "completed"
    assert log_in(client, NEW_PASSWORD).status_code == 201
    assert log_in(client, OLD_PASSWORD).status_code == 401
    bearer = {"Authorization": f"Bearer {session}"}
    assert client.get("/api/sessions/current", headers=bearer).status_code == 401
    notices = [row for row in outbox_messages(runtime) if row.kind == "password_changed"]
    assert [(row.recipient, row.user_id) for row in notices] == [(ALICE, alice)]
    assert deliver(runtime, smtp_server) == 1
    assert smtp_server.wait_for(2)[1]["Subject"] == "Your password was changed"


@pytest.mark.usefixtures("alice")
def test_code_single_use(runtime: Runtime, client: TestClient, smtp_server: Mailbox) -> None:
    flow = start_flow(client)
    code = deliver_code(runtime, smtp_server)
    assert complete(client, flow, code).status_code == 200

    again = complete(client, flow, code, "third password 3")

    assert again.status_code == 400
    assert again.json() == WRONG_CODE
    assert log_in(client, NEW_PASSWORD).status_code == 201


@pytest.mark.usefixtures("alice")
def test_four_wrong_codes_allowed(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox
) -> None:
    flow = start_flow(client)
    code = deliver_code(runtime, smtp_server)
    for _ in range(4):
        assert complete(client, flow, other_code(code)).status_code == 400
    assert flow_row(runtime, flow).attempts_left == 1

    assert complete(client, flow, code).status_code == 200


@pytest.mark.threat("T14")
@pytest.mark.usefixtures("alice")
def test_five_wrong_codes_lock(runtime: Runtime, client: TestClient, smtp_server: Mailbox) -> None:
    flow = start_flow(client)
    code = deliver_code(runtime, smtp_server)
    wrong = [complete(client, flow, other_code(code)) for _ in range(5)]

    right = complete(client, flow, code)

    assert [response.status_code for response in wrong] == [400] * 5
    assert right.status_code == 400
    assert right.json() == WRONG_CODE
    assert flow_row(runtime, flow).state == "locked"
    assert log_in(client, OLD_PASSWORD).status_code == 201


@pytest.mark.threat("T14")
@pytest.mark.usefixtures("alice")
def test_last_try_responds_like_first(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox
) -> None:
    flow = start_flow(client)
    code = deliver_code(runtime, smtp_server)
    tries = [complete(client, flow, other_code(code)) for _ in range(6)]

    assert_alike(tries[0], tries[4])  # the try that locks the flow
    assert_alike(tries[0], tries[5])  # a try on the locked flow


@pytest.mark.threat("T14")
@pytest.mark.usefixtures("alice")
def test_code_expires(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox, clock: FakeClock
) -> None:
    flow = start_flow(client)
    code = deliver_code(runtime, smtp_server)

    clock.advance(minutes=10)

    assert complete(client, flow, code).status_code == 400
    assert flow_row(runtime, flow).state == "expired"
    assert log_in(client, OLD_PASSWORD).status_code == 201


@pytest.mark.usefixtures("alice")
def test_code_works_before_expiry(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox, clock: FakeClock
) -> None:
    flow = start_flow(client)
    code = deliver_code(runtime, smtp_server)

    clock.advance(minutes=10, seconds=-1)

    assert complete(client, flow, code).status_code == 200


@pytest.mark.threat("T14")
@pytest.mark.usefixtures("alice")
def test_code_bound_to_flow(runtime: Runtime, client: TestClient, smtp_server: Mailbox) -> None:
    first = start_flow(client)
    first_code = deliver_code(runtime, smtp_server)
    second = start_flow(client)
    second_code = deliver_code(runtime, smtp_server)
    assert first_code != second_code  # equal with a chance of 1 in 10**8

    crossed = complete(client, second, first_code)

    assert crossed.status_code == 400
    assert flow_row(runtime, first).state == "superseded"
    assert flow_row(runtime, second).attempts_left == 4
    assert complete(client, second, second_code).status_code == 200


@pytest.mark.usefixtures("alice")
@pytest.mark.parametrize("newer", ["link", "code"])
def test_newer_request_supersedes_flow(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox, newer: str
) -> None:
    flow = start_flow(client)
    code = deliver_code(runtime, smtp_server)

    response = client.post("/api/recovery", json={"email": ALICE, "method": newer})
    assert response.status_code == 202
    if newer == "link":
        deliver_link(runtime, smtp_server)
    else:
        deliver_code(runtime, smtp_server)

    assert flow_row(runtime, flow).state == "superseded"
    assert complete(client, flow, code).status_code == 400
    assert log_in(client, OLD_PASSWORD).status_code == 201


@pytest.mark.usefixtures("alice")
def test_disabling_revokes_flow(runtime: Runtime, client: TestClient, smtp_server: Mailbox) -> None:
    flow = start_flow(client)
    code = deliver_code(runtime, smtp_server)

    runtime.service.disable_user(ALICE)
    runtime.service.enable_user(ALICE)

    assert flow_row(runtime, flow).state == "revoked"
    assert complete(client, flow, code).status_code == 400


@pytest.mark.usefixtures("alice")
@pytest.mark.parametrize("password", ["short", ALICE.upper()], ids=["too-short", "email-address"])
def test_rejected_password_spends_no_try(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox, password: str
) -> None:
    flow = start_flow(client)
    code = deliver_code(runtime, smtp_server)

    rejected = complete(client, flow, code, password)

    assert rejected.status_code == 422
    assert rejected.json()["error"] == "password_rejected"
    row = flow_row(runtime, flow)
    assert row.state == "open"
    assert row.attempts_left == 5
    assert complete(client, flow, code).status_code == 200


@pytest.mark.threat("T15")
@pytest.mark.usefixtures("alice")
@pytest.mark.parametrize(
    ("flow", "code"),
    [
        pytest.param("0" * 32, "12345678", id="never-issued-flow"),
        pytest.param("ABCDEF" + "0" * 26, "12345678", id="upper-case-flow"),
        pytest.param("not-a-flow", "12345678", id="malformed-flow"),
    ],
)
def test_made_up_flow_like_wrong_code(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox, flow: str, code: str
) -> None:
    real = start_flow(client)
    real_code = deliver_code(runtime, smtp_server)
    reference = complete(client, real, other_code(real_code))

    assert_alike(reference, complete(client, flow, code))


# A flow for an address without an account


@pytest.mark.threat("T15")
@pytest.mark.usefixtures("alice")
def test_unknown_flow_responds_alike(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox
) -> None:
    real = start_flow(client, ALICE)
    fake = start_flow(client, UNKNOWN)
    code = deliver_code(runtime, smtp_server)  # the worker resolves both requests
    wrong = other_code(code)

    for number in range(6):
        real_response = complete(client, real, wrong)
        fake_response = complete(client, fake, wrong)
        assert real_response.status_code == 400, f"try {number + 1}"
        assert_alike(real_response, fake_response)

    assert flow_row(runtime, real).state == "locked"
    assert flow_row(runtime, fake).state == "locked"


@pytest.mark.usefixtures("alice")
def test_unknown_flow_takes_no_code(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox
) -> None:
    fake = start_flow(client, UNKNOWN)
    assert deliver(runtime, smtp_server) == 0

    # No code exists for the flow, so try one code in each of its five tries.
    statuses = [complete(client, fake, f"{digit}" * 8).status_code for digit in range(5)]

    assert statuses == [400] * 5
    row = flow_row(runtime, fake)
    assert row.user_id is None
    assert row.state == "locked"


@pytest.mark.usefixtures("alice")
@pytest.mark.parametrize("ended", ["locked", "expired"])
def test_ended_flow_gets_no_mail(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox, clock: FakeClock, ended: str
) -> None:
    # The flow ends before the worker resolves its request: five wrong codes
    # sent at once, or a worker that is more than ten minutes behind.
    flow = start_flow(client)
    if ended == "locked":
        for _ in range(5):
            assert complete(client, flow, "12345678").status_code == 400
    else:
        clock.advance(minutes=10)
        assert complete(client, flow, "12345678").status_code == 400
    assert flow_row(runtime, flow).state == ended

    # No code can complete this flow any more, so mailing one only misleads.
    sent = deliver(runtime, smtp_server)
    assert sent == 0, f"the worker mailed a code for a flow that is {ended}"


# Busy hashing


class HeldHasher(Hasher):
    """A cheap hasher whose ``hash`` waits for ``release`` while ``armed`` is set."""

    def __init__(self, inner: Hasher) -> None:
        self.inner = inner
        self.armed = threading.Event()
        self.entered = threading.Event()
        self.release = threading.Event()

    def hash(self, password: str) -> str:
        if self.armed.is_set():
            self.entered.set()
            assert self.release.wait(timeout=10), "the test never released the hash"
        return self.inner.hash(password)

    def verify(self, stored_hash: str | None, password: str) -> bool:
        return self.inner.verify(stored_hash, password)

    def needs_rehash(self, stored_hash: str) -> bool:
        return self.inner.needs_rehash(stored_hash)


@pytest.fixture
def held_hasher(
    runtime: Runtime, cheap_hasher: Hasher, monkeypatch: pytest.MonkeyPatch
) -> Iterator[HeldHasher]:
    hasher = HeldHasher(cheap_hasher)
    monkeypatch.setattr(runtime.service, "hasher", hasher)
    monkeypatch.setattr(runtime.service, "hash_gate", HashGate(1))
    yield hasher
    hasher.release.set()


def test_busy_hashing_keeps_flow_open(
    runtime: Runtime,
    client: TestClient,
    smtp_server: Mailbox,
    alice: int,
    held_hasher: HeldHasher,
) -> None:
    runtime.service.add_user("bob@example.com")
    first = start_flow(client)
    first_code = deliver_code(runtime, smtp_server)
    second = start_flow(client, "bob@example.com")
    second_code = deliver_code(runtime, smtp_server)
    held_responses: list[Any] = []

    held_hasher.armed.set()
    holder = threading.Thread(
        target=lambda: held_responses.append(complete(client, second, second_code)),
        daemon=True,
    )
    holder.start()
    assert held_hasher.entered.wait(timeout=10)
    held_hasher.armed.clear()
    busy = complete(client, first, first_code)
    held_hasher.release.set()
    holder.join(timeout=10)

    assert busy.status_code == 503
    assert busy.json()["error"] == "busy"
    assert busy.headers["retry-after"] == "1"
    assert [response.status_code for response in held_responses] == [200]
    row = flow_row(runtime, first)
    assert row.state == "open"
    assert row.attempts_left == 5
    assert complete(client, first, first_code).status_code == 200


# The HTML pages


def forgot(client: TestClient, email: str, method: str = "code") -> Any:
    csrf = csrf_token(client.get("/forgot").text)
    return client.post(
        "/forgot",
        data={"csrf": csrf, "email": email, "method": method},
        follow_redirects=False,
    )


def submit_code(client: TestClient, location: str, code: str, password: str = NEW_PASSWORD) -> Any:
    """Open the code page at ``location`` and submit its form."""
    page = client.get(location)
    assert page.status_code == 200
    flow = re.search(r'name="flow" value="([^"]*)"', page.text)
    assert flow is not None
    form = {
        "csrf": csrf_token(page.text),
        "flow": flow.group(1),
        "code": code,
        "password": password,
        "password_again": password,
    }
    return client.post("/recover/code", data=form, follow_redirects=False)


@pytest.mark.usefixtures("alice")
@pytest.mark.parametrize("email", [ALICE, UNKNOWN])
def test_forgot_page_redirects_to_code(client: TestClient, email: str) -> None:
    response = forgot(client, email)

    assert response.status_code == 303
    location = response.headers["location"]
    assert re.fullmatch(r"/recover/code\?flow=[0-9a-f]{32}", location)


@pytest.mark.usefixtures("alice")
def test_forgot_page_offers_code(client: TestClient) -> None:
    page = client.get("/forgot")

    assert 'name="method" value="link"' in page.text
    assert 'name="method" value="code"' in page.text


@pytest.mark.usefixtures("alice")
def test_code_page_completes_reset(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox
) -> None:
    location = forgot(client, ALICE).headers["location"]
    code = deliver_code(runtime, smtp_server)

    done = submit_code(client, location, code)

    assert done.status_code == 303
    assert done.headers["location"] == "/recover/done"
    assert log_in(client, NEW_PASSWORD).status_code == 201


@pytest.mark.usefixtures("alice")
def test_code_page_wrong_code(runtime: Runtime, client: TestClient, smtp_server: Mailbox) -> None:
    location = forgot(client, ALICE).headers["location"]
    code = deliver_code(runtime, smtp_server)

    page = submit_code(client, location, other_code(code))

    assert page.status_code == 400
    assert "That code is wrong, used or expired" in page.text
    assert flow_row(runtime, location.partition("flow=")[2]).attempts_left == 4


@pytest.mark.usefixtures("alice")
def test_code_page_unknown_alike(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox
) -> None:
    real = forgot(client, ALICE).headers["location"]
    fake = forgot(client, UNKNOWN).headers["location"]
    code = deliver_code(runtime, smtp_server)

    real_page = submit_code(client, real, other_code(code))
    fake_page = submit_code(client, fake, other_code(code))

    assert fake_page.status_code == real_page.status_code
    # The pages differ only in the flow id of the form.
    real_flow, fake_flow = real.partition("flow=")[2], fake.partition("flow=")[2]
    assert fake_page.text.replace(fake_flow, real_flow) == real_page.text


def test_flow_rows_for_every_request(runtime: Runtime, client: TestClient, alice: int) -> None:
    flows = {start_flow(client, ALICE), start_flow(client, UNKNOWN)}

    with DbSession(runtime.service.engine) as db:
        rows = list(db.scalars(select(models.Flow)))
    assert {row.id for row in rows} == flows
    assert {row.state for row in rows} == {"open"}
    assert {row.user_id for row in rows} == {None}  # until the worker resolves them
