"""Chromium for browser tests: Debian's build, driven by Playwright, never a downloaded one.

A missing browser or Mermaid bundle skips the test with the reason on a
developer's machine, and fails it in CI (``CI=true``), where both must be there.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.availability import unavailable

BROWSER_DIR = Path(__file__).with_name("browser")
MERMAID_JS = BROWSER_DIR / "node_modules" / "mermaid" / "dist" / "mermaid.min.js"
# Headless Chromium as root needs --no-sandbox; the other two flags stop it from
# reaching for Google's servers, which this network does not allow.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update"]


def chromium_path() -> str:
    path = os.environ.get("SAFERESET_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        unavailable("Chromium not found: install Debian's chromium or set SAFERESET_CHROMIUM")
    return path


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """A headless Chromium browser, shared by one module's browser tests.

    Module scope, not session: Playwright's sync API runs an event loop on
    the main thread until it stops, and ``asyncio.run`` in later tests would
    fail while that loop is running.
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("Playwright is not installed: pip install -e '.[test]'")
    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def mermaid_js() -> Path:
    if not MERMAID_JS.exists():
        unavailable("Mermaid is not installed: run npm ci --prefix tests/browser")
    return MERMAID_JS
