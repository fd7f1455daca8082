"""End to end in headless Chromium: what a person does with ``make demo``."""

from __future__ import annotations

from typing import Any

import pytest

from tests.browser.conftest import DEMO_EMAIL, read_code, sign_in_with_code

pytestmark = pytest.mark.browser


def send(page: Any, subject: str, delivery: str = "now") -> str:
    page.goto("/send/")
    page.fill("#id_subject", subject)
    page.check(f"input[name=delivery][value={delivery}]")
    page.click("#send-form button[type=submit]")
    page.locator(".messages li").first.wait_for()
    return str(page.inner_text(".messages"))


def test_sign_in_with_the_code_read_from_the_mailbox(page: Any) -> None:
    page.goto("/send/")
    page.wait_for_url("**/signin/?next=/send/")

    sign_in_with_code(page)

    page.goto("/send/")
    assert page.locator("#send-form").is_visible()


def test_primary_down_mail_arrives_at_backup_and_breaker_opens(page: Any) -> None:
    sign_in_with_code(page)
    page.goto("/")
    page.click("text=Take primary down")
    page.locator("#provider-primary .server-mode.refuse").wait_for()

    # Unreachable with a backup there: one refused connection, then the backup.
    assert "sent via backup after 2 attempt(s)" in send(page, "Failover one")
    assert "sent via backup" in send(page, "Failover two")

    page.goto("/")
    page.locator('#provider-primary[data-breaker="open"]').wait_for()
    assert page.locator('#provider-backup[data-breaker="closed"]').is_visible()
    assert "a trial in" in page.inner_text("#provider-primary")
    delivery = page.locator("#deliveries tr.delivery").first
    assert delivery.get_attribute("data-provider") == "backup"

    page.goto("/mailbox/")
    backup = page.locator("#mailbox-backup")
    assert backup.locator('article.mail[data-subject="Failover one"]').count() == 1
    assert backup.locator('article.mail[data-subject="Failover two"]').count() == 1
    assert page.locator('#mailbox-primary article.mail[data-subject^="Failover"]').count() == 0

    page.goto("/")
    page.click("text=Bring primary up")
    page.locator("#provider-primary .server-mode.accept").wait_for()


def test_reset_the_password_by_code_then_sign_in_with_it(page: Any) -> None:
    page.goto("/signin/")
    page.click("text=set one with a reset code")
    page.fill("#id_email", DEMO_EMAIL)
    page.click("#reset-request button[type=submit]")
    page.wait_for_url("**/reset/code/**")

    page.fill("#id_code", read_code(page, "Your password reset code"))
    page.click("#reset-code-form button[type=submit]")
    page.wait_for_url("**/reset/new/")
    page.fill("#id_password1", "correct horse battery staple")
    page.fill("#id_password2", "correct horse battery staple")
    page.click("#new-password-form button[type=submit]")
    page.wait_for_url("**/signin/")
    assert "Password changed" in page.inner_text(".messages")

    page.fill("#id_username", DEMO_EMAIL)
    page.fill("#id_password", "correct horse battery staple")
    page.click("#password-sign-in button[type=submit]")
    page.locator("#signed-in-as").wait_for()


def test_background_mail_waits_in_the_outbox_and_the_worker_drains_it(page: Any) -> None:
    sign_in_with_code(page)
    page.goto("/")
    page.click("text=Take primary down")
    page.locator("#provider-primary .server-mode.refuse").wait_for()

    for number in (1, 2, 3):
        report = send(page, f"Background {number}", delivery="background")
        assert "the worker delivers it" in report

    # The dashboard refreshes itself while the worker (another process) sends them.
    page.goto("/")
    page.locator('#outbox[data-pending="0"]').wait_for()
    rows = page.locator('#outbox tr.outbox-row:has-text("Background")')
    assert rows.count() == 3
    for index in range(3):
        assert rows.nth(index).get_attribute("data-status") == "sent"
        assert "backup" in rows.nth(index).inner_text()

    page.goto("/mailbox/")
    for number in (1, 2, 3):
        page.locator(f'#mailbox-backup article.mail[data-subject="Background {number}"]').wait_for()


def test_staff_sign_in_to_the_admin_with_a_code(page: Any) -> None:
    page.goto("/admin/")
    page.wait_for_url("**/admin/login/**")
    page.click("text=ask for a code")
    page.fill("#id_email", DEMO_EMAIL)
    page.click("#admin-code-request input[type=submit]")
    page.wait_for_url("**/admin/login/")

    page.fill("#id_username", DEMO_EMAIL)
    page.fill("#id_password", read_code(page, "Your sign-in code"))
    page.click("input[type=submit]")
    page.wait_for_url("**/admin/")
    page.click("text=Outbox messages")
    assert "Your sign-in code" in page.inner_text("#result_list")
