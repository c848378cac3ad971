"""HTML pages: ask for a link, open the link, set the new password.

They work without JavaScript. Forms carry a CSRF token: an HMAC of a random
value kept in a SameSite cookie, checked on every POST.

The mail link ``/recover?token=...`` moves the token into a cookie scoped to
``/recover`` and redirects to the bare path, so the token leaves the address
bar and browser history and never appears in the page. Opening the link does
not use the ticket; only submitting the new password does.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Cookie, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from safereset.addresses import InvalidAddress
from safereset.crypto import is_well_formed
from safereset.errors import InvalidCode, InvalidToken
from safereset.passwords import HashingBusy, PasswordRejected
from safereset.throttle import RateLimited
from safereset.web.api import (
    CODE_MAX,
    EMAIL_MAX,
    FLOW_MAX,
    PASSWORD_MAX,
    ClientDep,
    ServiceDep,
)
from safereset.web.errors import to_response

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).with_name("templates"))

CSRF_COOKIE = "safereset_csrf"
RECOVERY_COOKIE = "safereset_recovery"
CSRF_PURPOSE = "csrf"


def _csrf_nonce(request: Request) -> tuple[str, bool]:
    """Return the browser's CSRF nonce, and whether it is new and must be set."""
    nonce = request.cookies.get(CSRF_COOKIE)
    if nonce and len(nonce) <= 64:
        return nonce, False
    return secrets.token_urlsafe(32), True


def _render(request: Request, name: str, status: int = 200, **values: object) -> HTMLResponse:
    nonce, fresh = _csrf_nonce(request)
    keyring = request.app.state.service.keyring
    values["csrf"] = keyring.digest(CSRF_PURPOSE, nonce)
    response = templates.TemplateResponse(request, name, values, status_code=status)
    if fresh:
        response.set_cookie(
            CSRF_COOKIE,
            nonce,
            httponly=True,
            samesite="strict",
            secure=request.app.state.https,
            path="/",
        )
    return response


def _csrf_valid(request: Request, submitted: str) -> bool:
    nonce = request.cookies.get(CSRF_COOKIE)
    if not nonce:
        return False
    keyring = request.app.state.service.keyring
    return bool(keyring.verify(CSRF_PURPOSE, nonce, submitted))


def _csrf_failed(request: Request) -> HTMLResponse:
    return _render(
        request,
        "message.html",
        403,
        title="Form expired",
        text="This form expired or did not come from this site. Reload the page and try again.",
    )


CsrfField = Annotated[str, Form(max_length=128)]


@router.get("/forgot", response_class=HTMLResponse)
def forgot_form(request: Request) -> HTMLResponse:
    return _render(request, "forgot.html")


@router.post("/forgot", response_class=HTMLResponse)
def forgot_submit(
    request: Request,
    svc: ServiceDep,
    client: ClientDep,
    csrf: CsrfField = "",
    email: Annotated[str, Form(max_length=EMAIL_MAX)] = "",
    method: Annotated[str, Form(max_length=8)] = "link",
) -> Response:
    if not _csrf_valid(request, csrf):
        return _csrf_failed(request)
    if method not in ("link", "code"):
        return _render(request, "forgot.html", 422, error="Choose a link or a code.", email=email)
    try:
        flow = svc.request_recovery(email, client, method)
    except InvalidAddress as error:
        return _render(request, "forgot.html", 422, error=str(error), email=email)
    except (RateLimited, HashingBusy) as error:
        return _too_busy(request, error)
    if flow is not None:
        return RedirectResponse(f"/recover/code?flow={flow}", status_code=303)
    return _render(
        request,
        "message.html",
        title="Check your mail",
        text=(
            "If an account exists for this address, we sent a link to the address "
            "stored for it. The link works once and expires soon."
        ),
    )


def _too_busy(request: Request, error: RateLimited | HashingBusy) -> HTMLResponse:
    """Render the rate-limit or busy page with the status and Retry-After of the API."""
    api = to_response(error)
    response = _render(
        request,
        "message.html",
        api.status_code,
        title="Too many attempts" if isinstance(error, RateLimited) else "Busy",
        text="Too many requests came from here or for this account. Wait a while and try again."
        if isinstance(error, RateLimited)
        else "The server is busy. Try again in a moment.",
    )
    response.headers["Retry-After"] = api.headers["Retry-After"]
    return response


def _invalid_link(request: Request) -> HTMLResponse:
    response = _render(
        request,
        "message.html",
        400,
        title="Link invalid or expired",
        text="This link was used, replaced by a newer one, or has expired.",
        action=("/forgot", "Ask for a new link"),
    )
    response.delete_cookie(RECOVERY_COOKIE, path="/recover")
    return response


@router.get("/recover", response_class=HTMLResponse)
def recover_form(
    request: Request,
    svc: ServiceDep,
    token: str | None = None,
    recovery: Annotated[str | None, Cookie(alias=RECOVERY_COOKIE)] = None,
) -> Response:
    if token is not None:
        if not is_well_formed(token):
            return _invalid_link(request)
        redirect = RedirectResponse("/recover", status_code=303)
        redirect.set_cookie(
            RECOVERY_COOKIE,
            token,
            max_age=int(svc.token_ttl.total_seconds()),
            httponly=True,
            # Lax: the cookie must come along when the redirect follows a
            # click in a webmail page on another site.
            samesite="lax",
            secure=request.app.state.https,
            path="/recover",
        )
        return redirect
    try:
        svc.check_ticket(recovery or "")
    except InvalidToken:
        return _invalid_link(request)
    return _render(request, "recover.html")


@router.post("/recover", response_class=HTMLResponse)
def recover_submit(
    request: Request,
    svc: ServiceDep,
    client: ClientDep,
    csrf: CsrfField = "",
    password: Annotated[str, Form(max_length=PASSWORD_MAX)] = "",
    password_again: Annotated[str, Form(max_length=PASSWORD_MAX)] = "",
    recovery: Annotated[str | None, Cookie(alias=RECOVERY_COOKIE)] = None,
) -> Response:
    if not _csrf_valid(request, csrf):
        return _csrf_failed(request)
    if password != password_again:
        return _render(request, "recover.html", 422, error="The two passwords differ.")
    try:
        svc.complete_recovery(recovery or "", password, client)
    except InvalidToken:
        return _invalid_link(request)
    except (RateLimited, HashingBusy) as error:
        return _too_busy(request, error)
    except PasswordRejected as error:
        return _render(request, "recover.html", 422, error=f"{str(error).capitalize()}.")
    done = RedirectResponse("/recover/done", status_code=303)
    done.delete_cookie(RECOVERY_COOKIE, path="/recover")
    return done


@router.get("/recover/done", response_class=HTMLResponse)
def recover_done(request: Request) -> HTMLResponse:
    return _render(
        request,
        "message.html",
        title="Password changed",
        text=(
            "Your password was changed and every session of your account was signed "
            "out. Log in with the new password."
        ),
    )


FlowField = Annotated[str, Form(max_length=FLOW_MAX)]


def _render_code(
    request: Request, svc: ServiceDep, status: int = 200, **values: object
) -> HTMLResponse:
    minutes = int(svc.code_ttl.total_seconds() // 60)
    return _render(request, "code.html", status, ttl_minutes=minutes, **values)


@router.get("/recover/code", response_class=HTMLResponse)
def code_form(request: Request, svc: ServiceDep, flow: str = "") -> HTMLResponse:
    # Every flow id gets the form: whether a flow is real shows only in whether
    # a code works, the same as for a flow without an account.
    return _render_code(request, svc, flow=flow[:FLOW_MAX])


@router.post("/recover/code", response_class=HTMLResponse)
def code_submit(
    request: Request,
    svc: ServiceDep,
    client: ClientDep,
    csrf: CsrfField = "",
    flow: FlowField = "",
    code: Annotated[str, Form(max_length=CODE_MAX)] = "",
    password: Annotated[str, Form(max_length=PASSWORD_MAX)] = "",
    password_again: Annotated[str, Form(max_length=PASSWORD_MAX)] = "",
) -> Response:
    if not _csrf_valid(request, csrf):
        return _csrf_failed(request)
    if password != password_again:
        return _render_code(request, svc, 422, flow=flow, error="The two passwords differ.")
    try:
        svc.complete_code_recovery(flow, code.strip(), password, client)
    except InvalidCode:
        return _render_code(
            request,
            svc,
            400,
            flow=flow,
            error="That code is wrong, used or expired. After five wrong codes, ask for a new one.",
        )
    except PasswordRejected as error:
        return _render_code(request, svc, 422, flow=flow, error=f"{str(error).capitalize()}.")
    except (RateLimited, HashingBusy) as error:
        return _too_busy(request, error)
    return RedirectResponse("/recover/done", status_code=303)
