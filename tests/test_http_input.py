"""The HTTP layer under hostile or malformed input, through the in-process test client.

No request leaves the process. "evil.example" appears only as a Host header
value sent to the test client.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import EmailMessage

import pytest
from fastapi.testclient import TestClient

from safereset.errors import InvalidCredentials
from safereset.runtime import Runtime
from tests.conftest import Mailbox
from tests.test_security_properties import (
    ALICE,
    NEW_PASSWORD,
    OLD_PASSWORD,
    deliver,
    deliver_link,
    outbox_messages,
    request_link,
    ticket_states,
)

# Headers that differ between any two responses, whatever the request.
PER_RESPONSE_HEADERS = {"date", "x-request-id"}


def csrf_of(page_html: str) -> str:
    """Return the CSRF value of the form in a page."""
    match = re.search(r'name="csrf" value="([^"]+)"', page_html)
    assert match is not None, "the page has no CSRF field"
    return match.group(1)


def open_link(client: TestClient, token: str) -> str:
    """Open a recovery link like a browser and return the CSRF value of its form."""
    page = client.get("/recover", params={"token": token})
    assert page.status_code == 200
    return csrf_of(page.text)


def mail_links(message: EmailMessage) -> list[str]:
    """Return every URL in the plain text and HTML parts of a mail."""
    links: list[str] = []
    for subtype in ("plain", "html"):
        part = message.get_body(preferencelist=(subtype,))
        assert part is not None, f"the mail has no {subtype} part"
        links += re.findall(r"https?://[^\s\"'<>]+", part.get_content())
    return links


def stable_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return sorted((name, value) for name, value in headers if name not in PER_RESPONSE_HEADERS)


# Unknown addresses


@pytest.mark.threat("T09")
def test_unknown_address_same_response(runtime: Runtime, client: TestClient) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)

    known = client.post("/api/recovery", json={"email": ALICE})
    unknown = client.post("/api/recovery", json={"email": "nobody@example.com"})

    assert unknown.status_code == known.status_code
    assert unknown.content == known.content
    assert stable_headers(unknown.headers.multi_items()) == stable_headers(
        known.headers.multi_items()
    )


@pytest.mark.threat("T09")
def test_unknown_address_same_page(runtime: Runtime, client: TestClient) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    csrf = csrf_of(client.get("/forgot").text)

    known = client.post("/forgot", data={"csrf": csrf, "email": ALICE})
    unknown = client.post("/forgot", data={"csrf": csrf, "email": "nobody@example.com"})

    assert unknown.status_code == known.status_code
    assert unknown.content == known.content
    assert stable_headers(unknown.headers.multi_items()) == stable_headers(
        known.headers.multi_items()
    )


@pytest.mark.threat("T12")
def test_unknown_address_gets_no_mail(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox
) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)

    client.post("/api/recovery", json={"email": "nobody@example.com"})

    assert outbox_messages(runtime) == []
    assert deliver(runtime, smtp_server) == 0
    assert smtp_server.envelopes == []


# The Host header


@pytest.mark.threat("T08")
def test_api_link_ignores_host_header(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox
) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)

    response = client.post("/api/recovery", json={"email": ALICE}, headers={"Host": "evil.example"})

    assert response.status_code == 202
    deliver_link(runtime, smtp_server)
    links = mail_links(smtp_server.messages[0])
    assert links != []
    for link in links:
        assert link.startswith(f"{runtime.settings.public_url}/")


@pytest.mark.threat("T08")
def test_page_link_ignores_host_header(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox
) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    csrf = csrf_of(client.get("/forgot").text)

    response = client.post(
        "/forgot", data={"csrf": csrf, "email": ALICE}, headers={"Host": "evil.example"}
    )

    assert response.status_code == 200
    deliver_link(runtime, smtp_server)
    links = mail_links(smtp_server.messages[0])
    assert links != []
    for link in links:
        assert link.startswith(f"{runtime.settings.public_url}/")


# Pages


@pytest.mark.threat("T04", "T06")
@pytest.mark.parametrize(
    "path", ["/forgot", "/recover", "/recover?token=not-a-token", "/recover/done"]
)
def test_page_privacy_headers(client: TestClient, path: str) -> None:
    response = client.get(path, follow_redirects=False)

    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.threat("T04", "T27")
def test_opening_link_keeps_ticket(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox
) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    token = request_link(runtime, smtp_server)

    redirect = client.get("/recover", params={"token": token}, follow_redirects=False)

    assert redirect.status_code == 303
    assert redirect.headers["location"] == "/recover"
    assert redirect.headers["referrer-policy"] == "no-referrer"
    assert "safereset_recovery" in redirect.cookies
    for _ in range(2):
        form = client.get("/recover")
        assert form.status_code == 200
        assert 'name="password"' in form.text
        assert token not in form.text
        assert form.headers["cache-control"] == "no-store"
    assert ticket_states(runtime) == ["issued"]
    runtime.service.check_ticket(token)


@pytest.mark.threat("T01")
@pytest.mark.parametrize(
    "token",
    [
        pytest.param("", id="empty"),
        pytest.param("abc", id="short"),
        pytest.param("t" * 300, id="long"),
        pytest.param("a;b=c", id="cookie-syntax"),
        pytest.param("é", id="latin-1-letter"),
        pytest.param("€", id="non-latin-1-letter"),
    ],
)
def test_link_with_malformed_token(client: TestClient, token: str) -> None:
    page = client.get("/recover", params={"token": token}, follow_redirects=False)

    assert page.status_code == 400
    assert "Link invalid or expired" in page.text
    assert "safereset_recovery" not in page.cookies


@pytest.mark.threat("T01")
def test_link_with_unknown_token(client: TestClient) -> None:
    redirect = client.get("/recover", params={"token": "srt_" + "A" * 43}, follow_redirects=False)
    assert redirect.status_code == 303

    page = client.get("/recover")

    assert page.status_code == 400
    assert "Link invalid or expired" in page.text


# Cross-site request forgery

# Placeholders in the table for values that exist only once the test runs.
OWN_VALUE = "<the CSRF value of this browser's form>"
FOREIGN_VALUE = "<the CSRF value of another browser's form>"


@dataclass(frozen=True)
class CsrfCase:
    csrf: str | None  # the submitted form value, or None to leave the field out
    keep_cookie: bool = True


CSRF_CASES = [
    pytest.param(CsrfCase(None), id="missing-field"),
    pytest.param(CsrfCase(""), id="empty-field"),
    pytest.param(CsrfCase("0" * 64), id="wrong-value"),
    pytest.param(CsrfCase("é" * 8), id="non-ascii-value"),
    pytest.param(CsrfCase(OWN_VALUE, keep_cookie=False), id="no-cookie"),
    pytest.param(CsrfCase(FOREIGN_VALUE), id="value-from-another-browser"),
]


def forged_form(client: TestClient, case: CsrfCase, own: str, **fields: str) -> dict[str, str]:
    """Build the form fields to submit, and drop the CSRF cookie unless the case keeps it."""
    form = dict(fields)
    if case.csrf == OWN_VALUE:
        form["csrf"] = own
    elif case.csrf == FOREIGN_VALUE:
        other_browser = TestClient(client.app, base_url=str(client.base_url))
        form["csrf"] = csrf_of(other_browser.get("/forgot").text)
    elif case.csrf is not None:
        form["csrf"] = case.csrf
    if not case.keep_cookie:
        client.cookies.delete("safereset_csrf")
    return form


@pytest.mark.threat("T19")
@pytest.mark.parametrize("case", CSRF_CASES)
def test_forgot_post_needs_csrf(runtime: Runtime, client: TestClient, case: CsrfCase) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    own = csrf_of(client.get("/forgot").text)

    response = client.post("/forgot", data=forged_form(client, case, own, email=ALICE))

    assert response.status_code == 403
    assert outbox_messages(runtime) == []


def test_forgot_post_with_csrf(runtime: Runtime, client: TestClient) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    own = csrf_of(client.get("/forgot").text)

    response = client.post("/forgot", data={"csrf": own, "email": ALICE})
    runtime.service.process_recovery_requests()

    assert response.status_code == 200
    assert len(outbox_messages(runtime)) == 1


@pytest.mark.threat("T19")
@pytest.mark.parametrize("case", CSRF_CASES)
def test_recover_post_needs_csrf(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox, case: CsrfCase
) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    token = request_link(runtime, smtp_server)
    own = open_link(client, token)
    passwords = {"password": NEW_PASSWORD, "password_again": NEW_PASSWORD}

    response = client.post("/recover", data=forged_form(client, case, own, **passwords))

    assert response.status_code == 403
    assert ticket_states(runtime) == ["issued"]
    runtime.service.log_in(ALICE, OLD_PASSWORD)  # the password did not change


def test_recover_post_with_csrf(runtime: Runtime, client: TestClient, smtp_server: Mailbox) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    token = request_link(runtime, smtp_server)
    own = open_link(client, token)

    response = client.post(
        "/recover",
        data={"csrf": own, "password": NEW_PASSWORD, "password_again": NEW_PASSWORD},
        follow_redirects=False,
    )

    assert response.status_code == 303
    assert response.headers["location"] == "/recover/done"
    assert ticket_states(runtime) == ["redeemed"]
    with pytest.raises(InvalidCredentials):
        runtime.service.log_in(ALICE, OLD_PASSWORD)


# Passwords that fail the policy

EMOJI = "\N{GRINNING FACE}"  # 4 bytes in UTF-8


@pytest.mark.parametrize(
    ("password", "reason"),
    [
        pytest.param("7 chars", "at least 8 characters", id="7-characters"),
        pytest.param("p" * 1025, "at most 1024 characters", id="1025-characters"),
        pytest.param(ALICE.upper(), "email address", id="email-upper-case"),
        # 1025 characters outside the Basic Multilingual Plane: 12 bytes each
        # once JSON-escaped, so the body stays under the 16 KiB limit.
        pytest.param(EMOJI * 1025, "at most 1024 characters", id="1025-emoji"),
    ],
)
def test_rejected_password_api_status(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox, password: str, reason: str
) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    token = request_link(runtime, smtp_server)

    rejected = client.post("/api/recovery/complete", json={"token": token, "password": password})

    assert rejected.status_code == 422
    assert rejected.json()["error"] == "password_rejected"
    assert rejected.json()["field"] == "password"
    assert reason in rejected.json()["message"]
    accepted = client.post(
        "/api/recovery/complete", json={"token": token, "password": NEW_PASSWORD}
    )
    assert accepted.status_code == 200


def test_longest_password_accepted(
    runtime: Runtime, client: TestClient, smtp_server: Mailbox
) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    token = request_link(runtime, smtp_server)

    response = client.post(
        "/api/recovery/complete", json={"token": token, "password": EMOJI * 1024}
    )

    assert response.status_code == 200
    runtime.service.log_in(ALICE, EMOJI * 1024)


# Malformed JSON input

WELL_FORMED_TOKEN = "srt_" + "A" * 43  # the shape of a real token, but never issued


@dataclass(frozen=True)
class BadInput:
    path: str
    body: bytes
    status: int
    error: str | None  # None accepts any error code
    field: str | None  # None when the response names no field


def as_json(value: object) -> bytes:
    return json.dumps(value).encode()


def recovery_body(**fields: object) -> bytes:
    return as_json({"email": ALICE, **fields})


def completion_body(**fields: object) -> bytes:
    return as_json({"token": WELL_FORMED_TOKEN, "password": NEW_PASSWORD, **fields})


def login_body(**fields: object) -> bytes:
    return as_json({"email": ALICE, "password": NEW_PASSWORD, **fields})


RECOVERY = "/api/recovery"
COMPLETION = "/api/recovery/complete"
LOGIN = "/api/sessions"
INVALID = "invalid_request"
UNUSABLE_TOKEN = "invalid_or_expired_token"
OVERSIZED = as_json({"email": "a" * (16 * 1024)})
LONG_ADDRESS = "a" * 309 + "@example.com"  # 321 characters, one over the limit
# JSON text with a lone UTF-16 surrogate, which no UTF-8 string can contain.
SURROGATE = b'"\\ud800 and eight more"'


def bad_input(
    case_id: str, path: str, body: bytes, status: int, error: str | None, field: str | None = None
) -> object:
    return pytest.param(BadInput(path, body, status, error, field), id=case_id)


BAD_INPUTS = [
    # POST /api/recovery
    bad_input("r-malformed", RECOVERY, b'{"email": ', 400, "malformed_json"),
    bad_input("r-not-utf8", RECOVERY, b"\xff\xfe", 400, None),
    bad_input("r-array", RECOVERY, b"[]", 422, INVALID, "body"),
    bad_input("r-empty-body", RECOVERY, b"", 422, INVALID, "body"),
    bad_input("r-email-number", RECOVERY, as_json({"email": 42}), 422, INVALID, "email"),
    bad_input("r-email-list", RECOVERY, as_json({"email": [ALICE]}), 422, INVALID, "email"),
    bad_input(
        "r-email-surrogate", RECOVERY, b'{"email": ' + SURROGATE + b"}", 422, INVALID, "email"
    ),
    bad_input("r-extra-field", RECOVERY, recovery_body(admin=True), 422, INVALID, "admin"),
    bad_input("r-missing-email", RECOVERY, as_json({}), 422, INVALID, "email"),
    bad_input("r-empty-email", RECOVERY, as_json({"email": ""}), 422, INVALID, "email"),
    bad_input("r-email-no-dot", RECOVERY, as_json({"email": "a@b"}), 422, "invalid_email", "email"),
    bad_input(
        "r-email-no-at", RECOVERY, as_json({"email": "no-at-sign"}), 422, "invalid_email", "email"
    ),
    bad_input(
        "r-email-too-long", RECOVERY, recovery_body(email=LONG_ADDRESS), 422, INVALID, "email"
    ),
    bad_input("r-oversized", RECOVERY, OVERSIZED, 413, "body_too_large"),
    # POST /api/recovery/complete
    bad_input("c-malformed", COMPLETION, b"{", 400, "malformed_json"),
    bad_input("c-token-number", COMPLETION, completion_body(token=7), 422, INVALID, "token"),
    bad_input(
        "c-password-list", COMPLETION, completion_body(password=["x"]), 422, INVALID, "password"
    ),
    bad_input(
        "c-password-surrogate",
        COMPLETION,
        b'{"token": "' + WELL_FORMED_TOKEN.encode() + b'", "password": ' + SURROGATE + b"}",
        422,
        INVALID,
        "password",
    ),
    bad_input("c-extra-field", COMPLETION, completion_body(email=ALICE), 422, INVALID, "email"),
    bad_input(
        "c-missing-token", COMPLETION, as_json({"password": NEW_PASSWORD}), 422, INVALID, "token"
    ),
    bad_input(
        "c-missing-password",
        COMPLETION,
        as_json({"token": WELL_FORMED_TOKEN}),
        422,
        INVALID,
        "password",
    ),
    bad_input(
        "c-token-too-long", COMPLETION, completion_body(token="t" * 129), 422, INVALID, "token"
    ),
    bad_input(
        "c-password-too-long",
        COMPLETION,
        completion_body(password="p" * 4097),
        422,
        INVALID,
        "password",
    ),
    # Every unusable token gets one response that names no field, so a caller
    # cannot tell a malformed token from an expired one.
    bad_input("c-token-short", COMPLETION, completion_body(token="abc"), 400, UNUSABLE_TOKEN),
    bad_input(
        "c-token-one-too-long",
        COMPLETION,
        completion_body(token=WELL_FORMED_TOKEN + "A"),
        400,
        UNUSABLE_TOKEN,
    ),
    bad_input(
        "c-token-wrong-prefix",
        COMPLETION,
        completion_body(token="xyz_" + "A" * 43),
        400,
        UNUSABLE_TOKEN,
    ),
    bad_input("c-token-never-issued", COMPLETION, completion_body(), 400, UNUSABLE_TOKEN),
    bad_input("c-oversized", COMPLETION, OVERSIZED, 413, "body_too_large"),
    # POST /api/sessions
    bad_input("l-malformed", LOGIN, b"nul", 400, "malformed_json"),
    bad_input("l-email-number", LOGIN, login_body(email=1.5), 422, INVALID, "email"),
    bad_input(
        "l-password-list", LOGIN, login_body(password=[NEW_PASSWORD]), 422, INVALID, "password"
    ),
    bad_input(
        "l-password-surrogate",
        LOGIN,
        b'{"email": "' + ALICE.encode() + b'", "password": ' + SURROGATE + b"}",
        422,
        INVALID,
        "password",
    ),
    bad_input("l-extra-field", LOGIN, login_body(remember=True), 422, INVALID, "remember"),
    bad_input("l-missing-email", LOGIN, as_json({"password": NEW_PASSWORD}), 422, INVALID, "email"),
    bad_input("l-email-too-long", LOGIN, login_body(email=LONG_ADDRESS), 422, INVALID, "email"),
    bad_input("l-oversized", LOGIN, OVERSIZED, 413, "body_too_large"),
]


@pytest.mark.threat("T28")
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_json_bad_input(runtime: Runtime, client: TestClient, case: BadInput) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)

    response = client.post(
        case.path, content=case.body, headers={"Content-Type": "application/json"}
    )

    assert response.status_code == case.status
    assert response.headers["content-type"] == "application/json"
    assert "Traceback" not in response.text
    assert "error" in response.json()
    if case.error is not None:
        assert response.json()["error"] == case.error
    assert response.json().get("field") == case.field
    assert outbox_messages(runtime) == []


# Authorization headers

BAD_AUTHORIZATION = [
    pytest.param(None, id="missing"),
    pytest.param("", id="empty"),
    pytest.param("Bearer", id="scheme-only"),
    pytest.param("Bearer    ", id="blank-token"),
    pytest.param("Basic YWxpY2U6c2VjcmV0", id="basic-scheme"),
    pytest.param(f"Token {WELL_FORMED_TOKEN}", id="unknown-scheme"),
    pytest.param("Bearer not-a-token", id="wrong-shape"),
    pytest.param(f"Bearer {WELL_FORMED_TOKEN}", id="never-issued"),
    pytest.param(b"Bearer \xe9\xe9", id="latin-1-bytes"),
]


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize("authorization", BAD_AUTHORIZATION)
def test_bad_authorization(
    client: TestClient, method: str, authorization: str | bytes | None
) -> None:
    headers: Mapping[str, str] | Mapping[bytes, bytes] = {}
    if isinstance(authorization, bytes):
        headers = {b"Authorization": authorization}
    elif authorization is not None:
        headers = {"Authorization": authorization}

    response = client.request(method, "/api/sessions/current", headers=headers)

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"] == "invalid_session"
    assert "Traceback" not in response.text


# Login failures


@pytest.mark.threat("T09", "T16")
@pytest.mark.parametrize(
    "email",
    [
        pytest.param("nobody@example.com", id="unknown-address"),
        pytest.param("carol@example.com", id="disabled-account"),
        pytest.param("dave@example.com", id="no-password-set"),
        pytest.param("a@b", id="invalid-address"),
    ],
)
def test_login_failures_alike(runtime: Runtime, client: TestClient, email: str) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    runtime.service.add_user("carol@example.com", OLD_PASSWORD)
    runtime.service.disable_user("carol@example.com")
    runtime.service.add_user("dave@example.com")
    wrong_password = client.post("/api/sessions", json={"email": ALICE, "password": NEW_PASSWORD})

    # Carol's password is right, so only the disabled account fails her login.
    response = client.post("/api/sessions", json={"email": email, "password": OLD_PASSWORD})

    assert wrong_password.status_code == 401
    assert response.status_code == 401
    assert response.content == wrong_password.content
    assert response.headers["www-authenticate"] == wrong_password.headers["www-authenticate"]


def test_login_empty_password_alike(runtime: Runtime, client: TestClient) -> None:
    runtime.service.add_user(ALICE, OLD_PASSWORD)
    wrong_password = client.post("/api/sessions", json={"email": ALICE, "password": NEW_PASSWORD})

    response = client.post("/api/sessions", json={"email": ALICE, "password": ""})

    assert response.status_code == 401
    assert response.content == wrong_password.content


def test_form_body_on_json_route(client: TestClient) -> None:
    response = client.post("/api/recovery", data={"email": ALICE})

    assert response.status_code == 422
    assert response.json()["field"] == "body"
    assert "application/json" in response.json()["message"]
