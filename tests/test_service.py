"""EmailService: the view-facing helper."""

from __future__ import annotations

import pytest
from django.core.mail import EmailMessage

from robust_mail import EmailService
from robust_mail.exceptions import DeliveryFailed
from robust_mail.results import DeliveryStatus
from tests.conftest import provider


def test_send_email_returns_true_and_sends_text_and_html(smtp_server, robust):
    server = smtp_server()
    robust([provider(server, "only")])

    assert EmailService.send_email(
        "Welcome",
        "plain body",
        ["a@example.com"],
        html_message="<p>html body</p>",
        cc=["c@example.com"],
    )

    (received,) = server.messages
    assert sorted(received.rcpt_tos) == ["a@example.com", "c@example.com"]
    assert received.message.get_body(("html",)).get_content().strip() == "<p>html body</p>"
    assert received.message["From"] == "robust@example.com"  # DEFAULT_FROM_EMAIL


def test_send_returns_the_delivery_result(smtp_server, robust):
    down = smtp_server("refuse")
    up = smtp_server()
    robust([provider(down, "down"), provider(up, "up")])

    result = EmailService.send(EmailMessage("s", "b", "f@example.com", ["t@example.com"]))

    assert result.ok
    assert (result.status, result.provider) == (DeliveryStatus.SENT, "up")
    assert result.message_id == up.messages[0].message_id


def test_send_reports_failure_in_the_result_instead_of_raising(smtp_server, robust):
    down = smtp_server("refuse")
    robust([provider(down, "down")])

    result = EmailService.send(EmailMessage("s", "b", "f@example.com", ["t@example.com"]))

    assert not result.ok
    assert result.status is DeliveryStatus.DEFERRED


def test_send_email_raises_delivery_failed_or_returns_false_when_silent(smtp_server, robust):
    down = smtp_server("refuse")
    robust([provider(down, "down")])

    with pytest.raises(DeliveryFailed):
        EmailService.send_email("s", "b", ["t@example.com"])
    assert EmailService.send_email("s", "b", ["t@example.com"], fail_silently=True) is False


def test_works_with_djangos_locmem_backend_in_users_tests(settings, mailoutbox):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"

    result = EmailService.send(EmailMessage("s", "b", "f@example.com", ["t@example.com"]))

    assert result.status is DeliveryStatus.SENT
    assert len(mailoutbox) == 1


def test_send_email_is_silent_with_djangos_smtp_backend_too(smtp_server, settings):
    # "Works with whatever backend": Django's SMTP backend raises OSError / SMTPException,
    # not robust_mail's errors, and fail_silently must cover those as well.
    down = smtp_server("refuse")
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = down.host, down.port

    assert EmailService.send_email("s", "b", ["t@example.com"], fail_silently=True) is False
    with pytest.raises(ConnectionRefusedError):
        EmailService.send_email("s", "b", ["t@example.com"])
