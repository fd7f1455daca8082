"""Fixtures for the end-to-end tests: the whole demo as a child process, and Chromium.

The site runs exactly as ``make demo`` runs it (``python -m example_project.demo``: the
web server with its two SMTP servers, and the outbox worker), on free ports with its
data in a temporary directory, one fresh demo per test. Chromium is Debian's package,
driven by Playwright for Python (never Playwright's own browser download). Missing
Chromium or Playwright skips these tests, except with CI=true, where it fails them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from example_project import chromium
from example_project.demo_process import DemoProcess
from tests.conftest import require

DEMO_EMAIL = "demo@example.com"
CODE = re.compile(r"Your code is: (\w+)")
#: How long a page may take to show what a step expects (worker poll + page refresh).
WAIT_MS = 20_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "Playwright for Python is not installed: pip install -e '.[browser]'")
    require(
        chromium.executable() is not None, "Chromium is not installed: apt-get install chromium"
    )
    with sync_playwright() as playwright:
        instance = chromium.launch(playwright)
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[DemoProcess]:
    process = DemoProcess(tmp_path / "demo")
    process.start()
    try:
        yield process
    finally:
        code = process.stop()
        assert code == 0, process.log()


@pytest.fixture
def page(browser: Any, demo: DemoProcess) -> Iterator[Any]:
    context = browser.new_context(base_url=demo.url, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()


def read_code(page: Any, subject: str, to: str = DEMO_EMAIL) -> str:
    """Open the Mailboxes page in a new tab and wait for the newest code email."""
    tab = page.context.new_page()
    try:
        tab.goto("/mailbox/")
        mail = tab.locator(f'article.mail[data-subject="{subject}"][data-to="{to}"]').first
        mail.wait_for()
        match = CODE.search(mail.locator("pre.body").inner_text())
        assert match is not None, mail.inner_text()
        return match.group(1)
    finally:
        tab.close()


def sign_in_with_code(page: Any, email: str = DEMO_EMAIL) -> None:
    page.goto("/signin/")
    page.fill("#id_code-email", email)
    page.click("#code-request button[type=submit]")
    page.wait_for_url("**/signin/code/**")
    code = read_code(page, "Your sign-in code", email)
    page.fill("#id_code", code)
    page.click("#code-form button[type=submit]")
    page.locator("#signed-in-as").wait_for()
    assert page.inner_text("#signed-in-as") == email
