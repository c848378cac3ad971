"""The reset pages in a real browser: Debian's Chromium, headless, driven by Playwright.

Each test starts `safereset serve` on loopback with mail going to the
`smtp_server` fixture, and adds the user with the CLI. The browser resets the
password by link and by code, with and without JavaScript, and the tests check
the headers it received, its console, framing and the screenshots in docs/.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx2
import pytest

from tests.browser_flows_support import (
    DOCS_SCREENSHOTS,
    ROOT,
    PageWatch,
    fill_forgot_form,
    fill_new_password,
    framing_server,
    heading,
    mailed_code,
    other_code,
    png_size,
    screenshot_folder,
    submit_form,
)
from tests.conftest import Mailbox, free_port
from tests.e2e_support import Deployment, ServerLauncher, recovery_link

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.e2e

EMAIL = "alice@example.com"
OLD_PASSWORD = "old correct horse 1"
NEW_PASSWORD = "new battery staple 2"
STYLESHEET_PATH = "/static/safereset.css"
VIEWPORT = {"width": 640, "height": 400}
# In the order of a reset: by link, then the pages only the code path shows.
SCREENSHOTS = ("forgot", "check-mail", "recover", "done", "recover-code", "wrong-code")

OpenPage = Callable[..., tuple["Page", PageWatch]]


@pytest.fixture
def server(tmp_path: Path, smtp_server: Mailbox) -> Iterator[Deployment]:
    """A running `safereset serve` that mails to ``smtp_server``, with one user."""
    deployment = Deployment(data_dir=tmp_path / "data", mail_url=smtp_server.url, port=free_port())
    launcher = ServerLauncher(deployment, log_folder=tmp_path)
    try:
        launcher.start()
        deployment.add_user(EMAIL, OLD_PASSWORD)
        yield deployment
    finally:
        launcher.stop_all()


@pytest.fixture
def open_page(chromium: Any, server: Deployment) -> Iterator[OpenPage]:
    """Open a page in a new browser context, with or without JavaScript, and watch it."""
    contexts: list[Any] = []

    def open_watched_page(javascript: bool = True) -> tuple[Page, PageWatch]:
        context = chromium.new_context(java_script_enabled=javascript, viewport=VIEWPORT)
        contexts.append(context)
        page = context.new_page()
        watch = PageWatch(server.public_url)
        watch.attach(page)
        return page, watch

    yield open_watched_page
    for context in contexts:
        context.close()


def log_in(deployment: Deployment, password: str) -> int:
    """Log in over the JSON API and return the status code."""
    with httpx2.Client(base_url=deployment.public_url, trust_env=False, timeout=10.0) as api:
        response = api.post("/api/sessions", json={"email": EMAIL, "password": password})
    return response.status_code


def policy_directives(policy: str) -> set[str]:
    """Return the directives of a Content-Security-Policy, each with single spaces."""
    return {" ".join(part.split()) for part in policy.split(";") if part.strip()}


def check_security_headers(watch: PageWatch) -> None:
    """Check the headers of every main-document response that the browser received."""
    assert watch.documents, "the browser received no page"
    for seen in watch.documents:
        where = f"{seen.status} {seen.url}"
        headers = seen.headers
        directives = policy_directives(headers.get("content-security-policy", ""))
        assert "frame-ancestors 'none'" in directives, f"CSP of {where}: {directives}"
        assert "default-src 'none'" in directives, f"CSP of {where}: {directives}"
        assert headers.get("x-frame-options") == "DENY", f"X-Frame-Options of {where}"
        assert headers.get("x-content-type-options") == "nosniff", f"nosniff of {where}"
        assert headers.get("referrer-policy") == "no-referrer", f"Referrer-Policy of {where}"
        assert headers.get("cache-control") == "no-store", f"Cache-Control of {where}"


def check_page_loads(watch: PageWatch) -> None:
    """Check that pages loaded only the stylesheet, and nothing was blocked or left loopback.

    A resource that the CSP blocks shows as a console error.
    """
    stylesheet = f"{watch.public_url}{STYLESHEET_PATH}"
    loaded = {seen.url for seen in watch.subresources}
    assert loaded == {stylesheet}
    assert all(seen.status == 200 for seen in watch.subresources), watch.subresources
    assert watch.failed_requests == []
    assert watch.unexpected_console_errors() == []
    assert watch.requests_off_loopback() == []


@pytest.mark.parametrize("javascript", [True, False], ids=["javascript", "no-javascript"])
def test_link_reset(
    open_page: OpenPage, server: Deployment, smtp_server: Mailbox, javascript: bool
) -> None:
    page, watch = open_page(javascript)
    public_url = server.public_url

    fill_forgot_form(page, public_url, EMAIL, "link")
    sent = submit_form(page)
    assert sent.status == 200
    assert heading(page) == "Check your mail"

    link = recovery_link(smtp_server.wait_for(1)[0])
    assert link.startswith(f"{public_url}/recover?token=")
    form = page.goto(link)
    assert form is not None
    assert form.status == 200
    assert page.url == f"{public_url}/recover"
    assert heading(page) == "Choose a new password"

    fill_new_password(page, NEW_PASSWORD)
    done = submit_form(page)
    assert done.status == 200
    assert page.url == f"{public_url}/recover/done"
    assert heading(page) == "Password changed"

    assert log_in(server, NEW_PASSWORD) == 201
    assert log_in(server, OLD_PASSWORD) == 401

    reused = page.goto(link)
    assert reused is not None
    assert reused.status == 400
    assert heading(page) == "Link invalid or expired"

    check_security_headers(watch)
    check_page_loads(watch)


@pytest.mark.parametrize("javascript", [True, False], ids=["javascript", "no-javascript"])
def test_code_reset(
    open_page: OpenPage, server: Deployment, smtp_server: Mailbox, javascript: bool
) -> None:
    page, watch = open_page(javascript)
    public_url = server.public_url

    fill_forgot_form(page, public_url, EMAIL, "code")
    form = submit_form(page)
    assert form.status == 200
    assert re.fullmatch(rf"{re.escape(public_url)}/recover/code\?flow=[\w-]+", page.url)
    assert heading(page) == "Enter your code"

    code = mailed_code(smtp_server.wait_for(1)[0])
    page.fill("#code", code)
    fill_new_password(page, NEW_PASSWORD)
    done = submit_form(page)
    assert done.status == 200
    assert page.url == f"{public_url}/recover/done"
    assert heading(page) == "Password changed"

    assert log_in(server, NEW_PASSWORD) == 201
    assert log_in(server, OLD_PASSWORD) == 401

    check_security_headers(watch)
    check_page_loads(watch)


def test_forgot_page_refuses_framing(open_page: OpenPage, server: Deployment) -> None:
    page, watch = open_page()

    with framing_server(f"{server.public_url}/forgot") as framing_url:
        page.goto(framing_url)
        target = page.frame(name="target")
        control = page.frame(name="control")
        assert target is not None
        assert control is not None

        # The control frame, which nothing protects, shows that a framed form can be found.
        assert control.query_selector("form") is not None
        assert target.query_selector("form") is None
        assert target.url.startswith("chrome-error://")

    console = [text for text, _ in watch.console_errors]
    assert any("frame-ancestors 'none'" in text for text in console), console
    assert watch.requests_off_loopback() == []


def test_screenshots_of_each_page(
    open_page: OpenPage, server: Deployment, smtp_server: Mailbox, tmp_path: Path
) -> None:
    """Save a PNG of each page, to docs/screenshots/ when SAFERESET_UPDATE_SCREENSHOTS=1."""
    folder = screenshot_folder(tmp_path)
    page, watch = open_page()
    public_url = server.public_url

    def save(name: str) -> None:
        page.screenshot(path=folder / f"{name}.png", full_page=True)

    fill_forgot_form(page, public_url, EMAIL, "code")
    submit_form(page)
    assert heading(page) == "Enter your code"
    save("recover-code")

    code = mailed_code(smtp_server.wait_for(1)[0])
    page.fill("#code", other_code(code))
    fill_new_password(page, NEW_PASSWORD)
    wrong = submit_form(page)
    assert wrong.status == 400
    assert page.locator(".error").inner_text().startswith("That code is wrong")
    save("wrong-code")

    fill_forgot_form(page, public_url, EMAIL, "link")
    save("forgot")
    submit_form(page)
    assert heading(page) == "Check your mail"
    save("check-mail")

    page.goto(recovery_link(smtp_server.wait_for(2)[1]))
    assert heading(page) == "Choose a new password"
    save("recover")

    fill_new_password(page, NEW_PASSWORD)
    submit_form(page)
    assert heading(page) == "Password changed"
    save("done")

    for name in SCREENSHOTS:
        width, height = png_size(folder / f"{name}.png")
        assert width == VIEWPORT["width"], name
        assert height >= VIEWPORT["height"], name
    assert watch.unexpected_console_errors() == []


def test_pages_doc_shows_screenshots() -> None:
    """docs/pages.md embeds every committed screenshot."""
    text = (ROOT / "docs" / "pages.md").read_text(encoding="utf-8")

    for name in SCREENSHOTS:
        assert f"](screenshots/{name}.png)" in text, name
        assert (DOCS_SCREENSHOTS / f"{name}.png").is_file(), name
