"""Helpers for the browser tests of the reset pages: watching a page, mail, screenshots, framing.

Every server here listens on 127.0.0.1, and the browser opens nothing else.
"""

from __future__ import annotations

import os
import re
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tests.conftest import text_body
from tests.e2e_support import HOST

if TYPE_CHECKING:
    from playwright.sync_api import ConsoleMessage, Page, Request, Response

ROOT = Path(__file__).resolve().parent.parent
DOCS_SCREENSHOTS = ROOT / "docs" / "screenshots"
UPDATE_SCREENSHOTS_VARIABLE = "SAFERESET_UPDATE_SCREENSHOTS"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_CODE_LINE = re.compile(r"^[ \t]*(\d{8})[ \t\r]*$", re.MULTILINE)
# Chromium logs this console error for every response with an error status (400 or higher).
_STATUS_ERROR = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")


@dataclass(frozen=True)
class SeenResponse:
    """A response as the browser received it, with every header name in lower case."""

    url: str
    status: int
    resource_type: str
    headers: dict[str, str]


@dataclass
class PageWatch:
    """The responses, requests and console errors of one page while a test drives it."""

    public_url: str
    responses: list[SeenResponse] = field(default_factory=list)
    console_errors: list[tuple[str, str]] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    requested_urls: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("request", self._on_request)
        page.on("response", self._on_response)
        page.on("requestfailed", self._on_request_failed)
        page.on("console", self._on_console)

    def _on_request(self, request: Request) -> None:
        self.requested_urls.append(request.url)

    def _on_response(self, response: Response) -> None:
        # all_headers(), unlike headers, includes the security-related headers.
        seen = SeenResponse(
            url=response.url,
            status=response.status,
            resource_type=response.request.resource_type,
            headers=response.all_headers(),
        )
        self.responses.append(seen)

    def _on_request_failed(self, request: Request) -> None:
        self.failed_requests.append(f"{request.url}: {request.failure}")

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append((message.text, message.location.get("url", "")))

    @property
    def documents(self) -> list[SeenResponse]:
        """The main-document responses, redirects included."""
        return [seen for seen in self.responses if seen.resource_type == "document"]

    @property
    def subresources(self) -> list[SeenResponse]:
        return [seen for seen in self.responses if seen.resource_type != "document"]

    def unexpected_console_errors(self) -> list[str]:
        """Return the console errors other than Chromium's notices of an error status.

        Chromium logs "Failed to load resource" for a page that the server
        sends with status 400 (an invalid link, a wrong code). It logs the same
        for the 404 of /favicon.ico, which Chromium requests by itself because
        the pages name no icon. Any other error, such as a Content-Security-Policy
        violation, is unexpected.
        """
        expected = {(seen.url, seen.status) for seen in self.documents if seen.status >= 400}
        expected.add((f"{self.public_url}/favicon.ico", 404))
        unexpected = []
        for text, url in self.console_errors:
            match = _STATUS_ERROR.match(text)
            if match is None or (url, int(match.group(1))) not in expected:
                unexpected.append(f"{text} (at {url})")
        return unexpected

    def requests_off_loopback(self) -> list[str]:
        return [url for url in self.requested_urls if urlsplit(url).hostname != HOST]


def mailed_code(message: EmailMessage) -> str:
    """Return the 8-digit code that is on a line of its own in a code mail."""
    match = _CODE_LINE.search(text_body(message))
    if match is None:
        raise AssertionError(f"no 8-digit code in the mail:\n{text_body(message)}")
    return match.group(1)


def other_code(code: str) -> str:
    """Return a well-formed 8-digit code that differs from ``code``."""
    return f"{(int(code) + 1) % 10**8:08d}"


def submit_form(page: Page) -> Response:
    """Click the form's submit button and return the response of the page it leads to."""
    with page.expect_navigation() as navigation:
        page.click("button[type=submit]")
    response: Response | None = navigation.value
    if response is None:
        raise AssertionError(f"submitting the form on {page.url} loaded no new page")
    return response


def fill_forgot_form(page: Page, public_url: str, email: str, method: str) -> None:
    """Open /forgot, type the address and choose a link or a code."""
    page.goto(f"{public_url}/forgot")
    page.fill("#email", email)
    page.check(f"input[name=method][value={method}]")


def fill_new_password(page: Page, password: str) -> None:
    page.fill("#password", password)
    page.fill("#password_again", password)


def heading(page: Page) -> str:
    text: str = page.locator("h1").inner_text()
    return text


def screenshot_folder(tmp_path: Path) -> Path:
    """Return docs/screenshots when SAFERESET_UPDATE_SCREENSHOTS is 1, else a temporary folder.

    Normal test runs must not rewrite the committed screenshots.
    """
    if os.environ.get(UPDATE_SCREENSHOTS_VARIABLE) == "1":
        folder = DOCS_SCREENSHOTS
    else:
        folder = tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def png_size(path: Path) -> tuple[int, int]:
    """Return the width and height of a PNG file, or raise AssertionError if it is not a PNG."""
    header = path.read_bytes()[:24]
    if not header.startswith(PNG_SIGNATURE) or header[12:16] != b"IHDR":
        raise AssertionError(f"{path} is not a PNG file")
    width, height = struct.unpack(">II", header[16:24])
    return width, height


class _FramingHandler(BaseHTTPRequestHandler):
    """Handler for a page that frames the target page and a plain form of its own."""

    target_url = ""

    def do_GET(self) -> None:
        if self.path == "/":
            body = (
                "<!doctype html><title>Framing</title>"
                f'<iframe name="target" src="{self.target_url}"></iframe>'
                '<iframe name="control" src="/control"></iframe>'
            )
        elif self.path == "/control":
            body = '<!doctype html><title>Control</title><form><input name="q"></form>'
        else:
            self.send_error(404)
            return
        encoded = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(encoded)))
        self.end_headers()
        self.wfile.write(encoded)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def framing_server(target_url: str) -> Iterator[str]:
    """Serve a page that frames ``target_url`` on another loopback port, and yield its URL.

    The page also frames a form of its own, which has no framing protection,
    to show that a frame's form can be found when nothing blocks it.
    """
    handler = type("FramingHandler", (_FramingHandler,), {"target_url": target_url})
    server = ThreadingHTTPServer((HOST, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
