"""The JSON API: parse the request, call one use case, return the response."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from safereset.errors import InvalidSession
from safereset.service import Service

router = APIRouter(prefix="/api")

# Field bounds keep bodies small before any work; the password policy gives
# the precise message for lengths between them and the policy's own bounds.
EMAIL_MAX = 320
PASSWORD_MAX = 4096
TOKEN_MAX = 128
CODE_MAX = 32
FLOW_MAX = 64

RECOVERY_ACCEPTED = (
    "If an account exists for this address, a recovery {what} is on its way to the "
    "address stored for it."
)


def service(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


ServiceDep = Annotated[Service, Depends(service)]


def client_address(request: Request) -> str:
    """Return the address that rate limits count against, set by the HTTP middleware."""
    address: str = request.state.client_address
    return address


ClientDep = Annotated[str, Depends(client_address)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RecoveryRequest(Strict):
    email: str = Field(min_length=1, max_length=EMAIL_MAX)
    method: Literal["link", "code"] = "link"


class RecoveryAccepted(BaseModel):
    status: str = "accepted"
    message: str = RECOVERY_ACCEPTED.format(what="link")
    flow: str | None = Field(
        default=None,
        description="With the code method: the flow to complete with the mailed code. "
        "Every address gets one, with or without an account.",
    )


class CodeCompletion(Strict):
    code: str = Field(min_length=1, max_length=CODE_MAX)
    password: str = Field(min_length=1, max_length=PASSWORD_MAX)


class RecoveryCompletion(Strict):
    token: str = Field(min_length=1, max_length=TOKEN_MAX)
    password: str = Field(min_length=1, max_length=PASSWORD_MAX)


class PasswordChanged(BaseModel):
    status: str = "password_changed"


class Credentials(Strict):
    email: str = Field(min_length=1, max_length=EMAIL_MAX)
    # No lower bound: an empty password is a wrong password, with the same 401.
    password: str = Field(max_length=PASSWORD_MAX)


class SessionCreated(BaseModel):
    token: str
    token_type: str = "Bearer"  # noqa: S105  # the scheme name, not a secret
    expires_in: int


class CurrentUser(BaseModel):
    user_id: int
    email: str


class ErrorBody(BaseModel):
    error: str
    message: str
    field: str | None = None


def _header(description: str, schema: dict[str, object]) -> dict[str, object]:
    return {"description": description, "required": True, "schema": schema}


RETRY_AFTER = {"Retry-After": _header("Seconds to wait before trying again.", {"type": "integer"})}
# Every 401 carries the WWW-Authenticate challenge, including the one for wrong credentials.
UNAUTHORIZED: dict[int | str, dict[str, object]] = {
    401: {
        "model": ErrorBody,
        "headers": {
            "WWW-Authenticate": _header("The authentication scheme: Bearer.", {"type": "string"})
        },
    }
}
# NOTE: errors.py maps StaleRecord to 409, which no operation declares. Only
# concurrent writes to one record raise it, and no test reaches it over HTTP.
ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorBody},
    413: {"model": ErrorBody},
    429: {"model": ErrorBody, "headers": RETRY_AFTER},
    422: {"model": ErrorBody},
    503: {"model": ErrorBody, "headers": RETRY_AFTER},
}
# Every 422 of this app has the error body. Without this entry, FastAPI
# documents its own validation body for the operations that take a header.
SESSION_RESPONSES: dict[int | str, dict[str, object]] = {
    **UNAUTHORIZED,
    422: {"model": ErrorBody},
}

# OpenAPI links: which response values feed which later operation.
RECOVERY_LINKS = {
    "CompleteWithCode": {
        "operationRef": "#/paths/~1api~1recovery~1flows~1%7Bflow%7D~1complete/post",
        "parameters": {"path.flow": "$response.body#/flow"},
        "description": "With the code method: complete the flow with the mailed code.",
    }
}
_SESSION_TOKEN = {"header.authorization": "Bearer {$response.body#/token}"}
SESSION_LINKS = {
    "CurrentSession": {
        "operationRef": "#/paths/~1api~1sessions~1current/get",
        "parameters": _SESSION_TOKEN,
        "description": "Read the account behind the new session.",
    },
    "LogOut": {
        "operationRef": "#/paths/~1api~1sessions~1current/delete",
        "parameters": _SESSION_TOKEN,
        "description": "Revoke the new session.",
    },
}


@router.post(
    "/recovery",
    status_code=202,
    responses={202: {"links": RECOVERY_LINKS}, **ERROR_RESPONSES},
    response_model_exclude_none=True,
)
def request_recovery(body: RecoveryRequest, svc: ServiceDep, client: ClientDep) -> RecoveryAccepted:
    """Mail a one-time link, or with ``method: code`` an 8-digit code.

    The response is the same for every valid address, known or not.
    """
    flow = svc.request_recovery(body.email, client, body.method)
    message = RECOVERY_ACCEPTED.format(what=body.method)
    return RecoveryAccepted(message=message, flow=flow)


@router.post("/recovery/complete", responses=ERROR_RESPONSES)
def complete_recovery(
    body: RecoveryCompletion, svc: ServiceDep, client: ClientDep
) -> PasswordChanged:
    """Set a new password with the token from a recovery link. Does not log in."""
    svc.complete_recovery(body.token, body.password, client)
    return PasswordChanged()


@router.post("/recovery/flows/{flow}/complete", responses=ERROR_RESPONSES)
def complete_code_recovery(
    flow: Annotated[str, Path(max_length=FLOW_MAX)],
    body: CodeCompletion,
    svc: ServiceDep,
    client: ClientDep,
) -> PasswordChanged:
    """Set a new password with the code mailed for a flow. Five wrong codes lock the flow."""
    svc.complete_code_recovery(flow, body.code, body.password, client)
    return PasswordChanged()


@router.post(
    "/sessions",
    status_code=201,
    responses={201: {"links": SESSION_LINKS}, **UNAUTHORIZED, **ERROR_RESPONSES},
)
def log_in(body: Credentials, svc: ServiceDep, client: ClientDep) -> SessionCreated:
    """Log in with email address and password; the token goes in ``Authorization: Bearer``."""
    token = svc.log_in(body.email, body.password, client)
    return SessionCreated(token=token, expires_in=int(svc.session_ttl.total_seconds()))


def bearer_token(authorization: Annotated[str | None, Header()] = None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidSession
    return token.strip()


BearerDep = Annotated[str, Depends(bearer_token)]


@router.get("/sessions/current", responses=SESSION_RESPONSES)
def current_session(token: BearerDep, svc: ServiceDep) -> CurrentUser:
    """Return the account behind the session token."""
    user = svc.authenticate(token)
    return CurrentUser(user_id=user.user_id, email=user.email)


@router.delete("/sessions/current", status_code=204, responses=SESSION_RESPONSES)
def log_out(token: BearerDep, svc: ServiceDep) -> Response:
    """Revoke the session token (log out)."""
    svc.log_out(token)
    return Response(status_code=204)
