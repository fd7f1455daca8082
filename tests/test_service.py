"""EmailService: the view-facing helper."""

from __future__ import annotations

from typing import Any

import django
import pytest
from django.core.mail import EmailMessage

from robust_mail import EmailService
from robust_mail.exceptions import DeliveryFailed
from robust_mail.results import DeliveryStatus
from tests.conftest import needs_mailers, provider


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


@pytest.mark.parametrize("recipients", ["root", b"root"])
def test_a_string_recipient_list_is_a_type_error_like_django(smtp_server, robust, recipients):
    # list("root") would deliver to the mailboxes r, o, o and t.
    server = smtp_server()
    robust([provider(server, "only")])

    with pytest.raises(TypeError, match="must be a list or tuple"):
        EmailService.send_email("s", "b", recipients, fail_silently=True)
    assert server.connections_total == 0


def test_works_with_djangos_locmem_backend_in_users_tests(settings, mailoutbox):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"

    result = EmailService.send(EmailMessage("s", "b", "f@example.com", ["t@example.com"]))

    assert result.status is DeliveryStatus.SENT
    assert len(mailoutbox) == 1


@pytest.mark.django_db
def test_background_sends_go_through_djangos_locmem_backend_not_the_outbox(settings, mailoutbox):
    # The outbox would bypass the backend the project chose: a worker would later send the
    # message over SMTP, and a test reading mail.outbox would never see it.
    from robust_mail.models import OutboxMessage

    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"

    assert EmailService.send_email("s", "b", ["t@example.com"], background=True)
    result = EmailService.send(
        EmailMessage("s2", "b", "f@example.com", ["t@example.com"]), background=True
    )

    assert result.status is DeliveryStatus.SENT
    assert [m.subject for m in mailoutbox] == ["s", "s2"]
    assert not OutboxMessage.objects.exists()


@pytest.mark.django_db
def test_a_background_send_goes_through_the_message_s_own_non_robust_connection(
    smtp_server, robust
):
    from django.core import mail

    from robust_mail.models import OutboxMessage

    robust([provider(smtp_server(), "only")])
    connection = mail.get_connection("django.core.mail.backends.locmem.EmailBackend")
    mail.outbox = []
    message = EmailMessage("s", "b", "f@example.com", ["t@example.com"], connection=connection)

    assert EmailService.send(message, background=True).status is DeliveryStatus.SENT
    assert len(mail.outbox) == 1 and not OutboxMessage.objects.exists()


@pytest.mark.django_db
def test_background_sends_with_robust_mail_s_backend_are_still_queued(smtp_server, robust):
    from robust_mail.models import OutboxMessage

    server = smtp_server()
    robust([provider(server, "only")])

    result = EmailService.send(
        EmailMessage("s", "b", "f@example.com", ["t@example.com"]), background=True
    )

    assert result.status is DeliveryStatus.QUEUED
    assert OutboxMessage.objects.count() == 1 and server.messages == []


def test_send_email_is_silent_with_djangos_smtp_backend_too(smtp_server, settings):
    # "Works with whatever backend": Django's SMTP backend raises OSError / SMTPException,
    # not robust_mail's errors, and fail_silently must cover those as well.
    down = smtp_server("refuse")
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = down.host, down.port

    assert EmailService.send_email("s", "b", ["t@example.com"], fail_silently=True) is False
    with pytest.raises(ConnectionRefusedError):
        EmailService.send_email("s", "b", ["t@example.com"])


def test_send_goes_through_the_message_s_own_connection_like_message_send(smtp_server, robust):
    from django.core import mail

    server = smtp_server()
    robust([provider(server, "only")])
    connection = mail.get_connection("django.core.mail.backends.locmem.EmailBackend")
    mail.outbox = []
    message = EmailMessage("s", "b", "f@example.com", ["t@example.com"], connection=connection)

    result = EmailService.send(message)

    assert (result.status, result.provider) == (DeliveryStatus.SENT, "EmailBackend")
    assert len(mail.outbox) == 1 and server.messages == []


def _robust_aliases(**servers: Any) -> dict[str, Any]:
    """MAILERS with one robust_mail alias per test server, named as given."""
    return {
        name: {
            "BACKEND": "robust_mail.backends.RobustEmailBackend",
            "OPTIONS": {"providers": [{"name": name, "host": "127.0.0.1", "port": server.port}]},
        }
        for name, server in servers.items()
    }


@needs_mailers
def test_send_email_through_a_mailers_alias(smtp_server, settings):
    main, bulk = smtp_server(), smtp_server()
    settings.MAILERS = _robust_aliases(default=main, bulk=bulk)

    assert EmailService.send_email("s", "b", ["t@example.com"], using="bulk")

    assert len(bulk.messages) == 1 and main.messages == []


@pytest.mark.skipif(django.VERSION >= (6, 1), reason="Django 6.1 has MAILERS")
def test_using_before_django_6_1_is_a_configuration_error(robust, smtp_server):
    from robust_mail.conf import ConfigurationError

    robust([provider(smtp_server(), "only")])
    with pytest.raises(ConfigurationError, match=r"MAILERS arrived in Django 6\.1"):
        EmailService.send_email("s", "b", ["t@example.com"], using="bulk", fail_silently=True)


@needs_mailers
@pytest.mark.django_db
def test_a_background_send_checks_its_alias_before_queueing(settings):
    from robust_mail.conf import ConfigurationError
    from robust_mail.models import OutboxMessage

    settings.MAILERS = {
        "default": {
            "BACKEND": "robust_mail.backends.RobustEmailBackend",
            "OPTIONS": {"providers": ["smtp://127.0.0.1:1?name=a"]},
        },
        "console": {"BACKEND": "django.core.mail.backends.console.EmailBackend"},
    }
    for alias in ("bulkk", "console"):  # a typo; an alias that is not robust_mail's
        with pytest.raises(ConfigurationError, match="served by robust_mail"):
            EmailService.send_email("s", "b", ["t@example.com"], background=True, using=alias)
    assert not OutboxMessage.objects.exists()


@needs_mailers
@pytest.mark.django_db
def test_a_background_send_is_queued_for_the_alias_of_the_message_s_connection(
    smtp_server, settings
):
    from django.core import mail

    from robust_mail.models import OutboxMessage

    main, bulk = smtp_server(), smtp_server()
    settings.MAILERS = _robust_aliases(default=main, bulk=bulk)
    message = EmailMessage("s", "b", "f@example.com", ["t@example.com"])
    message.connection = mail.mailers["bulk"]  # type: ignore[attr-defined]

    EmailService.send(message, background=True)

    assert OutboxMessage.objects.get().mailer == "bulk"  # as a synchronous send would go
