"""Django 6.1 ``MAILERS``: robust_mail configured as a mailer alias, OPTIONS in lower case."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import django
import pytest
from django.core import mail
from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage, send_mail
from django.test import override_settings

from robust_mail import EmailService
from robust_mail.backends import RobustEmailBackend
from robust_mail.conf import ConfigurationError
from robust_mail.exceptions import Classification
from robust_mail.results import DeliveryStatus

pytestmark = [
    pytest.mark.skipif(django.VERSION < (6, 1), reason="MAILERS arrived in Django 6.1"),
    # RemovedInDjango2028Warning is a PendingDeprecationWarning: make ours fail too.
    pytest.mark.filterwarnings("error::PendingDeprecationWarning:robust_mail"),
]

ROBUST = "robust_mail.backends.RobustEmailBackend"
LOCMEM = "django.core.mail.backends.locmem.EmailBackend"
RETRY = {"attempts": 2, "backoff": 0, "max_backoff": 0, "deadline": 20}


def smtp(server: Any, name: str) -> dict[str, Any]:
    """A provider in the OPTIONS form: the ROBUST_MAIL provider keys in lower case."""
    return {"name": name, "host": "127.0.0.1", "port": server.port, "timeout": 2}


def robust_mailer(*providers: dict[str, Any], **options: Any) -> dict[str, Any]:
    return {"BACKEND": ROBUST, "OPTIONS": {"providers": list(providers), "retry": RETRY, **options}}


def deprecation_warning() -> type[Warning]:
    from django.utils.deprecation import RemovedInDjango2028Warning  # type: ignore[attr-defined]

    return RemovedInDjango2028Warning  # type: ignore[no-any-return]


@contextmanager
def deprecated_email_settings(**values: Any) -> Iterator[None]:
    """override_settings for EMAIL_*, quiet about Django's own notice that they are deprecated."""
    override = override_settings(**values)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"The EMAIL_\w+ setting", deprecation_warning())
        override.enable()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"The EMAIL_\w+ setting", deprecation_warning())
            override.disable()


def test_send_mail_through_the_default_mailer_fails_over(smtp_server, settings):
    down = smtp_server("refuse")
    up = smtp_server()
    settings.MAILERS = {"default": robust_mailer(smtp(down, "primary"), smtp(up, "backup"))}

    assert send_mail("Subject", "Body", "from@example.com", ["to@example.com"]) == 1

    (received,) = up.messages
    assert received.message["Subject"] == "Subject"
    assert received.rcpt_tos == ["to@example.com"]


def test_failover_result_names_each_provider_with_using(smtp_server, settings):
    down = smtp_server("refuse")
    up = smtp_server()
    settings.MAILERS = {
        "default": {"BACKEND": LOCMEM},
        "transactional": robust_mailer(smtp(down, "primary"), smtp(up, "backup")),
    }
    message = EmailMessage("Hi", "Body", "from@example.com", ["to@example.com"])

    assert message.send(using="transactional") == 1

    result = message.delivery_result
    assert (result.status, result.provider) == (DeliveryStatus.SENT, "backup")
    (error,) = result.errors
    assert (error.provider, error.classification, error.step) == (
        "primary",
        Classification.TRANSIENT,
        "connect",
    )
    assert [m.message_id for m in up.messages] == [result.message_id]
    assert mail.outbox == []  # the default alias was not used


def test_email_settings_are_not_read_once_mailers_is_defined(smtp_server, settings):
    # tests/settings.py sets EMAIL_HOST/EMAIL_PORT to a port where nothing listens; Django
    # 6.1 hides them once MAILERS exists, so a backend that read them would crash.
    up = smtp_server()
    settings.MAILERS = {"default": robust_mailer(smtp(up, "only"))}

    assert not hasattr(settings, "EMAIL_PORT")
    assert EmailService.send_email("Subject", "Body", ["to@example.com"])
    assert len(up.messages) == 1


def test_a_backend_with_an_alias_never_falls_back_to_email_settings(smtp_server, settings):
    # Without MAILERS, EMAIL_* are readable and here point at a live server: the classic
    # form (no alias) would deliver there. With an alias the OPTIONS are the whole
    # configuration, so a missing provider list is an error and the trap stays empty.
    trap = smtp_server()
    up = smtp_server()
    settings.ROBUST_MAIL = {}
    with (
        deprecated_email_settings(EMAIL_HOST="127.0.0.1", EMAIL_PORT=trap.port),
        warnings.catch_warnings(),
    ):
        # Reading any EMAIL_* setting would warn: none may be read.
        warnings.simplefilter("error", deprecation_warning())
        backend = RobustEmailBackend(alias="transactional", providers=[smtp(up, "only")])
        sent = backend.send_messages([EmailMessage("s", "b", "f@example.com", ["t@x.com"])])
        with pytest.raises(ConfigurationError, match="no provider to send through"):
            RobustEmailBackend(alias="transactional")

    assert sent == 1
    assert len(up.messages) == 1
    assert trap.messages == []
    assert trap.connections_total == 0


def test_unknown_option_is_djangos_invalid_mailer(smtp_server, settings):
    from django.core.mail import InvalidMailer  # type: ignore[attr-defined]

    up = smtp_server()
    settings.MAILERS = {"default": robust_mailer(smtp(up, "only"), retries=3)}

    with pytest.raises(InvalidMailer, match=r"MAILERS\['default'\]: Unknown options 'retries'"):
        send_mail("Subject", "Body", "from@example.com", ["to@example.com"])
    assert up.connections_total == 0


@pytest.mark.parametrize(
    ("retry", "names"),
    [
        ({"tries": 3}, "'tries'"),
        ({"attempts": 0}, "['retry']['attempts']"),
    ],
)
def test_bad_option_value_is_an_invalid_mailer_and_a_configuration_error(
    smtp_server, settings, retry, names
):
    from django.core.mail import InvalidMailer  # type: ignore[attr-defined]

    up = smtp_server()
    settings.MAILERS = {"default": robust_mailer(smtp(up, "only"), retry=retry)}

    # Reported when the mailer is created, as Django's own backends do, and never
    # swallowed by fail_silently.
    with pytest.raises(InvalidMailer) as caught:
        mail.mailers["default"]
    assert isinstance(caught.value, ConfigurationError)
    assert "MAILERS['default']['OPTIONS']" in str(caught.value)
    assert names in str(caught.value)
    with pytest.raises(ImproperlyConfigured):
        EmailService.send_email("Subject", "Body", ["to@example.com"], fail_silently=True)
    assert up.connections_total == 0


def test_mailer_provider_delegates_to_another_alias_after_smtp_refuses(
    smtp_server, settings, mailoutbox
):
    down = smtp_server("refuse")
    settings.MAILERS = {
        "default": robust_mailer(smtp(down, "smtp"), {"name": "api", "mailer": "api"}),
        "api": {"BACKEND": LOCMEM},
    }

    message = EmailMessage("Subject", "Body", "from@example.com", ["to@example.com"])

    assert message.send() == 1

    result = message.delivery_result
    assert (result.status, result.provider) == (DeliveryStatus.SENT, "api")
    (error,) = result.errors
    assert (error.provider, error.classification) == ("smtp", Classification.TRANSIENT)
    (delivered,) = mailoutbox
    assert delivered.sent_using == "api"
    assert delivered.subject == "Subject"
    assert delivered.extra_headers["Message-ID"] == result.message_id


def test_creating_and_using_the_backend_warns_about_nothing(smtp_server, settings):
    up = smtp_server()
    settings.MAILERS = {"default": robust_mailer(smtp(up, "only"))}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with mail.mailers.default as backend:
            backend.send_messages([EmailMessage("s", "b", "f@example.com", ["t@example.com"])])
        RobustEmailBackend(providers=[smtp(up, "only")], fail_silently=True).close()

    assert len(up.messages) == 1


class UnsupportedFeatureBackend:
    """An HTTP-API backend refusing what it cannot do with a ValueError (as anymail's
    AnymailUnsupportedFeature is)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def send_messages(self, messages: Any) -> int:
        raise ValueError("this API cannot send a message with an attachment of that type")


def test_a_mailer_provider_refusing_with_value_error_fails_over(smtp_server, settings):
    # A limit of that backend, not proof that no provider takes the message.
    up = smtp_server()
    settings.MAILERS = {
        "default": robust_mailer({"name": "api", "mailer": "api"}, smtp(up, "smtp")),
        "api": {"BACKEND": f"{__name__}.UnsupportedFeatureBackend"},
    }
    message = EmailMessage("Subject", "Body", "from@example.com", ["to@example.com"])

    assert message.send() == 1

    result = message.delivery_result
    assert result.provider == "smtp" and len(up.messages) == 1
    (error,) = result.errors
    assert (error.provider, error.classification) == ("api", Classification.TRANSIENT)
    assert "cannot send a message with an attachment" in error.message


class ProjectBackend(RobustEmailBackend):
    """A project's own subclass: robust_mail serves it like its own backends."""


@pytest.mark.django_db
def test_a_subclass_of_a_robust_backend_is_served_by_robust_mail(smtp_server, settings):
    from robust_mail.models import OutboxMessage

    down = smtp_server("refuse")
    settings.MAILERS = {
        "default": {
            "BACKEND": "tests.test_mailers.ProjectBackend",
            "OPTIONS": {"providers": [smtp(down, "down")], "retry": RETRY, "fallback": "outbox"},
        }
    }

    assert send_mail("s", "b", "f@example.com", ["t@example.com"]) == 1  # queued

    assert OutboxMessage.objects.get().mailer == "default"


def test_robust_mail_s_own_settings_beside_aliases_raise_no_lease_check(settings):
    from django.core.checks import run_checks

    # ROBUST_MAIL for OTP only (the suite's settings module sets it too): its default LEASE
    # is used by no worker once an alias is robust_mail's, and must not be checked.
    settings.ROBUST_MAIL = {"OTP": {"LENGTH": 8}}
    settings.MAILERS = {
        "default": {
            "BACKEND": ROBUST,
            "OPTIONS": {
                "providers": ["smtp://127.0.0.1:2525?name=a"],
                "retry": {"deadline": 400},
                "outbox": {"lease": 5000},
            },
        }
    }

    lease_checks = ("robust_mail.E030", "robust_mail.W030")
    assert [m.id for m in run_checks(databases=[]) if m.id in lease_checks] == []
