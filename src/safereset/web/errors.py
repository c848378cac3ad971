"""The one table that maps errors to HTTP responses, and the handlers that apply it.

Every error response is a short JSON object ``{"error": code, "message": text}``,
with ``field`` where one input is at fault. Nothing from a stack trace, a
token or a password reaches a response.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from safereset.addresses import InvalidAddress
from safereset.errors import InvalidCode, InvalidCredentials, InvalidSession, InvalidToken
from safereset.passwords import HashingBusy, PasswordRejected
from safereset.store.records import StaleRecord
from safereset.throttle import RateLimited

log = logging.getLogger("safereset.http")

# exception type -> (status, error code, message or None to use str(error), field)
ERRORS: dict[type[Exception], tuple[int, str, str | None, str | None]] = {
    InvalidToken: (400, "invalid_or_expired_token", "the link is invalid, used or expired", None),
    InvalidCode: (400, "invalid_or_expired_code", "the code is wrong, used or expired", None),
    InvalidCredentials: (401, "invalid_credentials", "email address or password is wrong", None),
    InvalidSession: (401, "invalid_session", "session token is missing, expired or revoked", None),
    InvalidAddress: (422, "invalid_email", None, "email"),
    PasswordRejected: (422, "password_rejected", None, "password"),
    StaleRecord: (409, "conflict", "another request changed the same record; try again", None),
    # One body for every scope, so a caller cannot tell which limit it hit.
    RateLimited: (429, "rate_limited", "too many requests; try again later", None),
    HashingBusy: (503, "busy", "the server is busy; try again shortly", None),
    # A lost or refused connection, or a pool with no free connection.
    OperationalError: (503, "unavailable", "the database is unavailable; try again later", None),
    InterfaceError: (503, "unavailable", "the database is unavailable; try again later", None),
    PoolTimeout: (503, "unavailable", "the database is busy; try again later", None),
}


def error_body(code: str, message: str, field: str | None = None) -> dict[str, str]:
    body = {"error": code, "message": message}
    if field is not None:
        body["field"] = field
    return body


def _headers(error: Exception, status: int) -> dict[str, str] | None:
    if isinstance(error, RateLimited):
        return {"Retry-After": str(error.retry_after)}
    if isinstance(error, HashingBusy):
        return {"Retry-After": "1"}
    if status == 503:
        return {"Retry-After": "5"}
    if status == 401:
        return {"WWW-Authenticate": "Bearer"}
    return None


def to_response(error: Exception) -> JSONResponse:
    """Map a known exception to its JSON response."""
    for kind, (status, code, message, field) in ERRORS.items():
        if isinstance(error, kind):
            body = error_body(code, message or str(error), field)
            return JSONResponse(body, status, headers=_headers(error, status))
    raise error


def _validation(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    first: dict[str, Any] = error.errors()[0] if error.errors() else {}
    if first.get("type") == "json_invalid":
        return JSONResponse(error_body("malformed_json", "request body is not valid JSON"), 400)
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "header")]
    field = ".".join(location) or "body"
    kind = first.get("type", "")
    if field == "body" and kind in ("model_attributes_type", "dict_type"):
        message = "request body must be a JSON object sent as application/json"
    elif kind == "extra_forbidden":
        message = "unknown field"
    elif kind == "missing":
        message = "field is required"
    else:
        message = str(first.get("msg", "invalid value"))
    return JSONResponse(error_body("invalid_request", message, field), 422)


def _http(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    code = {400: "malformed_body", 404: "not_found", 405: "method_not_allowed"}.get(
        error.status_code, "http_error"
    )
    headers = dict(error.headers or {})
    if error.status_code == 405:
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return JSONResponse(error_body(code, str(error.detail)), error.status_code, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    """Return every method some route offers for the request's path.

    Starlette names only the methods of the first route that matched the
    path, and GET and DELETE of one path are two routes here. Asking every
    route about every method also covers routers included in the app.
    """
    allowed = []
    for method in METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _known(request: Request, error: Exception) -> JSONResponse:
    response = to_response(error)
    if response.status_code >= 409:
        log.warning("request failed: %s %s", response.status_code, type(error).__name__)
    return response


def _unexpected(request: Request, error: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=error)
    return JSONResponse(error_body("internal_error", "internal error"), 500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    for kind in ERRORS:
        app.add_exception_handler(kind, _known)
    app.add_exception_handler(Exception, _unexpected)
