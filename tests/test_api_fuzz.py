"""Schemathesis against the app's own OpenAPI document, in process.

Every operation in ``/openapi.json`` gets generated requests: the examples,
coverage and fuzzing phases of Schemathesis. Every response must pass
``CHECKS``: no 5xx, a documented status, a body that matches the documented
schema, the documented content type and the documented headers.

- The stateless run uses limits that no test reaches, so a 429 hides
  nothing. A second run keeps the default limits, and a short test per
  throttled operation makes sure that a 429 is among the checked responses.
- Schemathesis' state machine follows the document's OpenAPI links: a login
  token into the session operations, a flow id into code completion.
- An explicit Hypothesis state machine chains a code request to its
  completion with the mailed code, and checks each response the same way.

Every request goes to an app that ``create_app`` built over the ``runtime``
fixture, so each test has a database of its own, on SQLite and on
PostgreSQL. No request leaves the process.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from safereset.mail.worker import Worker
from safereset.runtime import Runtime, build
from safereset.throttle import Limits, Rate
from safereset.web.app import create_app
from tests.conftest import make_settings
from tests.test_code_method import mailed_code, other_code
from tests.test_security_properties import link_token

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
# A fixed seed and derandomized Hypothesis: CI sends the same requests every run.
CONFIG = {"seed": 20260115, "generation": {"deterministic": True, "database": "none"}}
# The database lives as long as the test, not one example: on purpose, so
# later requests meet the rows that earlier ones left.
FUZZ_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
UNLIMITED = Limits(**{rate.name: Rate(10**9, 1) for rate in fields(Limits)})

ALICE = "alice@example.com"
UNKNOWN = "nobody@example.com"
FIRST_PASSWORD = "first passphrase 1"
PASSWORDS = (FIRST_PASSWORD, "second passphrase 2", "third passphrase 3")
SHORT_PASSWORD = "short"  # fails the length rule of the password policy
CODE_SUBJECT = "Your password reset code"


def load_schema(app: FastAPI) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_asgi(
        "/openapi.json", app, config=schemathesis.Config.from_dict(CONFIG)
    )


def app_over(runtime: Runtime, limits: Limits) -> Iterator[FastAPI]:
    runtime.service.limits = limits
    yield create_app(runtime, run_worker=False)
    # Schemathesis keeps each app's lifespan open until shutdown_lifespans() ends it.
    shutdown_lifespans()


@dataclass
class MailCatcher:
    """A mail transport that keeps each message in a list."""

    messages: list[EmailMessage] = field(default_factory=list)

    async def send(self, message: EmailMessage) -> None:
        self.messages.append(message)

    def describe(self) -> str:
        return "a list in the test"

    def worker(self, runtime: Runtime) -> Worker:
        return Worker(
            runtime.outbox,
            self,
            sender="safereset <no-reply@example.test>",
            public_url=runtime.settings.public_url,
            before_delivery=runtime.service.process_recovery_requests,
        )


# Stateless runs

# Generated tests need the document when pytest collects them, before any
# fixture exists. The document does not depend on the database, so this app
# has one that is never opened. (``schemathesis.pytest.from_fixture`` would
# load it from a fixture, but it fails on pytest 9.2: it reads
# ``Function._nodeid``, which pytest 9.2 no longer has.)
SCHEMA = load_schema(
    create_app(
        build(make_settings(Path("/nonexistent"), database_url="sqlite://")), run_worker=False
    )
)


@pytest.fixture
def unlimited_app(runtime: Runtime) -> Iterator[FastAPI]:
    yield from app_over(runtime, UNLIMITED)


@pytest.fixture
def limited_app(runtime: Runtime) -> Iterator[FastAPI]:
    yield from app_over(runtime, Limits())


def test_document_is_served(client: TestClient) -> None:
    assert client.get("/openapi.json").json() == SCHEMA.raw_schema


@SCHEMA.parametrize()
@FUZZ_SETTINGS
def test_api_conforms(case: schemathesis.Case, unlimited_app: FastAPI) -> None:
    case.call_and_validate(checks=CHECKS, app=unlimited_app)


@SCHEMA.parametrize()
@FUZZ_SETTINGS
def test_api_conforms_limited(case: schemathesis.Case, limited_app: FastAPI) -> None:
    case.call_and_validate(checks=CHECKS, app=limited_app)


# Schemathesis' check allow_header_conformance found this. Its other default
# checks fail only where the product validates more than the schema declares
# (a valid address, the password policy) or responds to an oversized body with 413.
def test_allow_lists_every_method(client: TestClient) -> None:
    response = client.put("/api/sessions/current")

    assert response.status_code == 405
    assert set(response.headers["allow"].split(", ")) == {"GET", "DELETE"}


# A valid request per throttled operation; repeated, it must reach a 429.
THROTTLED = {
    "recovery": ("/api/recovery", {}, {"email": ALICE}),
    "link": ("/api/recovery/complete", {}, {"token": "x" * 43, "password": FIRST_PASSWORD}),
    "code": (
        "/api/recovery/flows/{flow}/complete",
        {"flow": "0" * 32},
        {"code": "12345678", "password": FIRST_PASSWORD},
    ),
    "login": ("/api/sessions", {}, {"email": ALICE, "password": FIRST_PASSWORD}),
}


@pytest.mark.parametrize("name", THROTTLED)
def test_rate_limited_conforms(name: str, limited_app: FastAPI) -> None:
    path, path_parameters, body = THROTTLED[name]
    operation = load_schema(limited_app)[path]["POST"]
    statuses = []
    for _ in range(30):
        case = operation.Case(path_parameters=path_parameters, body=body)
        statuses.append(case.call_and_validate(checks=CHECKS).status_code)
        if statuses[-1] == 429:
            break
    assert statuses[-1] == 429, statuses


def test_link_reset_conforms(runtime: Runtime, unlimited_app: FastAPI) -> None:
    """Walk the link reset with a real token, which the fuzzer cannot guess."""
    runtime.service.add_user(ALICE, FIRST_PASSWORD)
    schema = load_schema(unlimited_app)
    mail = MailCatcher()
    schema["/api/recovery"]["POST"].Case(body={"email": ALICE}).call_and_validate(checks=CHECKS)
    asyncio.run(mail.worker(runtime).deliver_due())
    body = {"token": link_token(runtime, mail.messages[-1]), "password": PASSWORDS[1]}
    complete = schema["/api/recovery/complete"]["POST"]

    first = complete.Case(body=body).call_and_validate(checks=CHECKS)
    second = complete.Case(body=body).call_and_validate(checks=CHECKS)

    assert first.status_code == 200
    assert second.status_code == 400


# Schemathesis' state machine over the OpenAPI links


@pytest.fixture
def linked_schema(runtime: Runtime, unlimited_app: FastAPI) -> schemathesis.BaseSchema:
    """The document, with generated bodies that now and then carry real data.

    Random addresses and passwords never log in or open a flow, so the links
    would never be followed.
    """
    runtime.service.add_user(ALICE, FIRST_PASSWORD)
    schema = load_schema(unlimited_app)

    @schema.hook
    def flatmap_body(context: Any, body: Any) -> st.SearchStrategy[Any]:
        label = context.operation.label
        if not isinstance(body, dict):
            return st.just(body)
        if label == "POST /api/sessions":
            return st.sampled_from([body, {"email": ALICE, "password": FIRST_PASSWORD}])
        if label == "POST /api/recovery":
            addresses = st.sampled_from([body.get("email"), ALICE, UNKNOWN])
            return addresses.map(lambda email: {**body, "email": email, "method": "code"})
        return st.just(body)

    return schema


def test_links_conform(linked_schema: schemathesis.BaseSchema) -> None:
    seen: Counter[tuple[str, int]] = Counter()

    class Workflow(linked_schema.as_state_machine()):
        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            seen[case.operation.label, response.status_code] += 1
            case.validate_response(response, checks=CHECKS)

    Workflow.run(
        settings=settings(
            max_examples=50,
            stateful_step_count=6,
            deadline=None,
            derandomize=True,
            database=None,
        )
    )
    # The state machine reaches each of these only by following a link.
    for followed in (
        ("GET /api/sessions/current", 200),
        ("DELETE /api/sessions/current", 204),
        ("POST /api/recovery/flows/{flow}/complete", 400),
    ):
        assert seen[followed] > 0, seen


# An explicit state machine: code recovery chained by flow id, then sessions


@dataclass
class FlowModel:
    email: str
    code: str | None = None  # the mailed code, once the worker armed the flow
    wrong_left: int = 5
    open: bool = True


class CodeRecoveryJourney(RuleBasedStateMachine):
    """Requests, deliveries, completions, logins and session calls in any order.

    Each response must pass ``CHECKS`` and have the status that a small model
    of the account expects.
    """

    flows = Bundle("flows")
    tokens = Bundle("tokens")

    def __init__(
        self, runtime: Runtime, schema: schemathesis.BaseSchema, resets: list[str]
    ) -> None:
        super().__init__()
        self.schema = schema
        self.resets = resets  # flows that reset the password, over all examples
        self.mail = MailCatcher()
        self.worker = self.mail.worker(runtime)
        # Examples share the database: resolve what earlier ones left, reset
        # the password (which ends every flow and session), mail the notice.
        asyncio.run(self.worker.deliver_due())
        token = runtime.service.issue_operator_link(ALICE).partition("token=")[2]
        runtime.service.complete_recovery(token, FIRST_PASSWORD)
        asyncio.run(self.worker.deliver_due())
        self.password = FIRST_PASSWORD
        self.model: dict[str, FlowModel] = {}
        self.pending: list[str] = []  # code requests the worker has not resolved
        self.live: set[str] = set()  # session tokens that should work

    def call(self, path: str, method: str, **parts: Any) -> Any:
        case = self.schema[path][method].Case(**parts)
        return case.call_and_validate(checks=CHECKS)

    def end_armed_flows(self) -> None:
        """End the flows bound to the account.

        A flow whose request the worker has not resolved yet is bound to no
        account, so neither a newer request nor a reset ends it: the worker
        later mails it a code that works.
        """
        for state in self.model.values():
            if state.code is not None:
                state.open = False

    def armed(self) -> str | None:
        """Return the flow whose mailed code would reset the password now, if any."""
        for flow, state in self.model.items():
            if state.open and state.code is not None:
                return flow
        return None

    @initialize(target=flows)
    def start(self) -> str:
        """Begin with a code on its way, so that a reset is one step away."""
        flow = self.request_code(ALICE)
        self.deliver()
        return flow

    @rule(target=flows, email=st.sampled_from([ALICE, UNKNOWN]))
    def request_code(self, email: str) -> str:
        response = self.call("/api/recovery", "POST", body={"email": email, "method": "code"})
        assert response.status_code == 202
        flow: str = response.json()["flow"]
        self.model[flow] = FlowModel(email)
        self.pending.append(flow)
        return flow

    @rule()
    def deliver(self) -> None:
        before = len(self.mail.messages)
        asyncio.run(self.worker.deliver_due())
        new = self.mail.messages[before:]
        codes = [mailed_code(message) for message in new if message["Subject"] == CODE_SUBJECT]
        # The worker resolves requests oldest first; each one whose flow is
        # still open supersedes the account's armed flows and gets a code.
        armed = []
        for flow in self.pending:
            state = self.model[flow]
            if state.email == ALICE and state.open:
                self.end_armed_flows()
                armed.append(flow)
        self.pending.clear()
        assert len(codes) == len(armed)
        for flow, code in zip(armed, codes, strict=True):
            self.model[flow].code = code

    @precondition(lambda self: self.armed() is not None)
    @rule(password=st.sampled_from(PASSWORDS))
    def complete_armed(self, password: str) -> None:
        flow = self.armed()
        assert flow is not None
        self.complete(flow, True, password)

    @rule(flow=flows, right=st.booleans(), password=st.sampled_from([*PASSWORDS, SHORT_PASSWORD]))
    def complete(self, flow: str, right: bool, password: str) -> None:
        state = self.model[flow]
        code = state.code or "12345678"
        response = self.call(
            "/api/recovery/flows/{flow}/complete",
            "POST",
            path_parameters={"flow": flow},
            body={"code": code if right else other_code(code), "password": password},
        )
        if password == SHORT_PASSWORD:
            assert response.status_code == 422
        elif state.open and state.code is not None and right:
            assert response.status_code == 200
            self.resets.append(flow)
            self.password = password
            self.live.clear()
            self.end_armed_flows()
        else:
            assert response.status_code == 400
            if state.open:
                state.wrong_left -= 1
                state.open = state.wrong_left > 0

    @rule(target=tokens, password=st.sampled_from(PASSWORDS))
    def log_in(self, password: str) -> Any:
        response = self.call("/api/sessions", "POST", body={"email": ALICE, "password": password})
        if password != self.password:
            assert response.status_code == 401
            return multiple()
        assert response.status_code == 201
        token: str = response.json()["token"]
        self.live.add(token)
        return token

    @rule(token=tokens)
    def read_session(self, token: str) -> None:
        response = self.call(
            "/api/sessions/current", "GET", headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == (200 if token in self.live else 401)

    @rule(token=tokens)
    def log_out(self, token: str) -> None:
        response = self.call(
            "/api/sessions/current", "DELETE", headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == (204 if token in self.live else 401)
        self.live.discard(token)


def test_code_journey_conforms(runtime: Runtime, unlimited_app: FastAPI) -> None:
    runtime.service.add_user(ALICE, FIRST_PASSWORD)
    schema = load_schema(unlimited_app)
    resets: list[str] = []
    run_state_machine_as_test(
        lambda: CodeRecoveryJourney(runtime, schema, resets),
        settings=settings(
            max_examples=40, stateful_step_count=12, deadline=None, derandomize=True, database=None
        ),
    )
    assert resets, "no example reset the password with a mailed code"
