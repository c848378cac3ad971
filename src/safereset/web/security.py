"""Pure ASGI middleware: request ids, the request log, security headers and body limits."""

from __future__ import annotations

import ipaddress
import logging
import re
import time
import uuid
from collections.abc import MutableMapping, Sequence
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from safereset.logs import request_id

log = logging.getLogger("safereset.http")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Recovery and login bodies are a few hundred bytes; the largest legal one
# (a 1,024-character password of 4-byte characters, JSON-escaped) stays well
# under this.
MAX_BODY_BYTES = 16 * 1024
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


def security_headers(https: bool) -> list[tuple[bytes, bytes]]:
    headers = [
        # Tokens and session secrets pass through these responses.
        (b"cache-control", b"no-store"),
        (b"pragma", b"no-cache"),
        # A token in the page URL must not leave in a Referer header.
        (b"referrer-policy", b"no-referrer"),
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
        (b"cross-origin-opener-policy", b"same-origin"),
    ]
    if https:
        headers.append((b"strict-transport-security", b"max-age=63072000; includeSubDomains"))
    return headers


class HttpMiddleware:
    """Wraps every HTTP request: id, body limit, headers, one log line.

    The log line names the path without the query string, because the
    recovery link carries its token there.
    """

    def __init__(
        self, app: ASGIApp, *, https: bool, trusted_proxies: Sequence[IPNetwork] = ()
    ) -> None:
        self.app = app
        self.headers = security_headers(https)
        self.trusted_proxies = tuple(trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        incoming = _header(scope, b"x-request-id")
        current = incoming if incoming and _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        reset = request_id.set(current)
        scope.setdefault("state", {})["client_address"] = client_address(
            scope, self.trusted_proxies
        )
        status = 500
        sent_start = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, sent_start
            if message["type"] == "http.response.start":
                status = message["status"]
                sent_start = True
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if name.lower() not in {name for name, _ in self.headers}
                ]
                headers += [*self.headers, (b"x-request-id", current.encode())]
                message["headers"] = headers
            await send(message)

        try:
            body = await _read_body(scope, receive)
            if body is None:
                await _reply_too_large(send_wrapper)
                return
            await self.app(scope, _replay(body, receive), send_wrapper)
        finally:
            log.info(
                "%s %s %s %.1fms",
                scope["method"],
                scope["path"],
                status if sent_start else "-",
                (time.perf_counter() - started) * 1000,
            )
            request_id.reset(reset)


def client_address(scope: Scope, trusted: Sequence[IPNetwork]) -> str:
    """Return the address to rate-limit: the socket peer, or the client a trusted proxy saw.

    ``X-Forwarded-For`` counts only when the peer is a trusted proxy. The list
    is read from the right, skipping trusted proxies; the first other entry is
    the client. Entries further left are the client's own claims and are
    ignored, so a client cannot choose its own address to dodge a limit.
    """
    peer = str((scope.get("client") or ("unknown", 0))[0])
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    forwarded = ",".join(
        value.decode("latin-1")
        for key, value in scope.get("headers", [])
        if key.lower() == b"x-forwarded-for"
    )
    for entry in reversed([part.strip() for part in forwarded.split(",") if part.strip()]):
        try:
            ipaddress.ip_address(entry)
        except ValueError:
            return peer  # a malformed hop: the chain cannot be believed past it
        if not _is_trusted(entry, trusted):
            return entry
    return peer


def _is_trusted(address: str, trusted: Sequence[IPNetwork]) -> bool:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(parsed in network for network in trusted)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


async def _read_body(scope: Scope, receive: Receive) -> bytes | None:
    """Read the whole body, or return None as soon as it passes the limit."""
    declared = _header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """Hand the buffered body to the app, then pass on the server's later messages."""
    sent = False

    async def replay() -> MutableMapping[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reply_too_large(send: Send) -> None:
    body = (
        b'{"error":"body_too_large","message":"request body exceeds '
        + str(MAX_BODY_BYTES).encode()
        + b' bytes"}'
    )
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
