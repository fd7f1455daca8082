"""Take the README's screenshots of the demo: ``python -m example_project.screenshots``.

Starts the demo on free ports with a throw-away database, plays a short scenario in
headless Chromium (sign in by code, send, take the primary down, send again, queue
mail in the background) and saves the dashboard and the mailboxes to docs/screenshots/.
Needs Playwright for Python and the system's Chromium, like the browser tests.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from example_project import chromium
from example_project.demo_process import ROOT, DemoProcess

EMAIL = "demo@example.com"
CODE = re.compile(r"Your code is: (\w+)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m example_project.screenshots")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory() as tmp,
        DemoProcess(Path(tmp)) as demo,
        sync_playwright() as playwright,
    ):
        browser = chromium.launch(playwright)
        try:
            context = browser.new_context(
                base_url=demo.url, viewport={"width": 1280, "height": 860}
            )
            context.set_default_timeout(20_000)
            page = context.new_page()
            play(page)
            page.goto("/")
            page.locator('#provider-primary[data-breaker="open"]').wait_for()
            page.screenshot(path=str(args.out / "dashboard.png"), full_page=True)
            page.goto("/mailbox/")
            page.screenshot(path=str(args.out / "mailbox.png"))
        finally:
            browser.close()
    print(f"saved {args.out / 'dashboard.png'} and {args.out / 'mailbox.png'}")


def play(page: Any) -> None:
    """A few minutes of a visitor's clicking, in a few seconds."""
    page.goto("/signin/")
    page.fill("#id_code-email", EMAIL)
    page.click("#code-request button[type=submit]")
    page.wait_for_url("**/signin/code/**")
    page.fill("#id_code", code(page, "Your sign-in code"))
    page.click("#code-form button[type=submit]")
    page.locator("#signed-in-as").wait_for()

    send(page, "Welcome aboard")
    send(page, "Your invoice for March", "background")
    page.goto("/")
    page.locator('#outbox[data-pending="0"]').wait_for()  # the worker took it
    page.click("text=Take primary down")
    page.locator("#provider-primary .server-mode.refuse").wait_for()
    send(page, "Order #1042 shipped")
    send(page, "Order #1043 shipped")
    send(page, "Weekly digest", "background")
    page.goto("/")
    page.locator('#outbox[data-pending="0"]').wait_for()


def code(page: Any, subject: str) -> str:
    page.goto("/mailbox/")
    mail = page.locator(f'article.mail[data-subject="{subject}"]').first
    mail.wait_for()
    match = CODE.search(mail.locator("pre.body").inner_text())
    assert match is not None
    page.go_back()
    return match.group(1)


def send(page: Any, subject: str, delivery: str = "now") -> None:
    page.goto("/send/")
    page.fill("#id_to", "customer@example.com")
    page.fill("#id_subject", subject)
    page.check(f"input[name=delivery][value={delivery}]")
    page.click("#send-form button[type=submit]")
    page.locator(".messages li").first.wait_for()


if __name__ == "__main__":
    main()
