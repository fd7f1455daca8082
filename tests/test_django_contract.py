"""Django's own backend-agnostic email tests, run against RobustEmailBackend.

The test classes come unchanged from the sdist of the installed Django version (see
``tests/django_sdist.py``): ``BaseEmailBackendTests`` from ``tests/mail/tests.py`` up to
Django 6.0, ``SharedEmailBackendTests`` from ``tests/mail/test_backends.py`` from 6.1 on.
Our subclasses only supply what Django leaves to each backend: how to create it, and a
mailbox. The mailbox is a real ``SMTPTestServer``; its messages are handed to the
sdist's own ``SMTPHandler``, so they are parsed exactly as in Django's SMTP backend tests
and every assertion applies unchanged.

A Django test is overridden here only where it asserts something true of Django's own
classes and not of ours (a class name in a message, fail_silently being deprecated in
BaseEmailBackend); each override says why and asserts the equivalent for our backend.
"""

from __future__ import annotations

import warnings
from collections.abc import Coroutine
from types import ModuleType, SimpleNamespace
from typing import Any, ClassVar

import pytest
from django.test import SimpleTestCase, override_settings

from robust_mail.backends import RobustEmailBackend
from robust_mail.testing import SMTPTestServer
from tests.conftest import provider, require
from tests.django_sdist import SdistUnavailable, django_version, load_mail_tests

# A warning our own code triggers is a failure, also RemovedInDjango2028Warning (a
# PendingDeprecationWarning, which the project-wide DeprecationWarning filter misses).
pytestmark = pytest.mark.filterwarnings("error::PendingDeprecationWarning:robust_mail")

BACKEND_PATH = f"{RobustEmailBackend.__module__}.{RobustEmailBackend.__qualname__}"
# One attempt, no backoff: a contract test never needs a retry against a healthy server.
RETRY = {"ATTEMPTS": 1, "BACKOFF": 0, "MAX_BACKOFF": 0, "DEADLINE": 10}

mail_tests: ModuleType | None = None
mail_backend_tests: ModuleType | None = None
unavailable = ""
try:
    mail_tests = load_mail_tests("tests")
    if not hasattr(mail_tests, "BaseEmailBackendTests"):
        # Django 6.1+: the shared backend tests moved to test_backends.py.
        mail_backend_tests = load_mail_tests("test_backends")
except SdistUnavailable as exc:
    unavailable = str(exc)


def test_djangos_mail_tests_are_available_for_the_installed_version():
    """Without Django's tests nothing below runs: skip locally, fail in CI."""
    require(mail_tests is not None, f"Django {django_version()}'s tests/mail: {unavailable}")
    assert mail_tests is not None
    assert mail_tests.__name__ == "django_mail_tests.tests"
    assert f"/django-tests/{django_version()}/" in (mail_tests.__file__ or "")


def _run_to_completion(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends (``SMTPHandler.handle_DATA``), without a loop.

    No event loop is involved, so this works whatever loop another test left behind.
    """
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise AssertionError(f"{coroutine!r} suspended; it was expected to finish at once")


class SMTPMailbox:
    """The mailbox Django's shared tests read: what a real SMTP server received.

    Each message goes through the ``SMTPHandler`` of the same Django sdist, so it is
    parsed exactly as Django's own SMTP backend tests parse theirs (that differs between
    versions), and held to the same rule: the envelope sender must match the From header.
    """

    server: ClassVar[SMTPTestServer]
    smtp_handler_class: ClassVar[type[Any]]

    @classmethod
    def start_mailbox(cls) -> None:
        cls.server = SMTPTestServer(name="django-contract").start()
        cls.addClassCleanup(cls.server.stop)  # type: ignore[attr-defined]

    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        self.server.clear()
        self.addCleanup(self.server.clear)  # type: ignore[attr-defined]

    def flush_mailbox(self) -> None:
        self.server.clear()

    def get_mailbox_content(self) -> list[Any]:
        handler = self.smtp_handler_class()
        for received in self.server.messages:
            envelope = SimpleNamespace(
                content=received.data, mail_from=received.mail_from, rcpt_tos=received.rcpt_tos
            )
            reply = _run_to_completion(handler.handle_DATA(None, None, envelope))
            assert reply == "250 OK", reply
        return list(handler.mailbox)

    @classmethod
    def provider_settings(cls) -> dict[str, Any]:
        return provider(cls.server, "django-contract")


if mail_tests is not None and mail_backend_tests is None:

    class RobustEmailBackendTests(  # type: ignore[misc]
        SMTPMailbox, mail_tests.BaseEmailBackendTests, SimpleTestCase
    ):
        """Django ≤ 6.0: ``BaseEmailBackendTests`` with ``EMAIL_BACKEND`` + ``ROBUST_MAIL``."""

        email_backend = BACKEND_PATH
        smtp_handler_class = mail_tests.SMTPHandler

        @classmethod
        def setUpClass(cls) -> None:
            cls.start_mailbox()
            cls.enterClassContext(
                override_settings(
                    ROBUST_MAIL={"PROVIDERS": [cls.provider_settings()], "RETRY": RETRY}
                )
            )
            super().setUpClass()


if mail_tests is not None and mail_backend_tests is not None:
    from django.utils.deprecation import (  # type: ignore[attr-defined]
        RemovedInDjango2028Warning,
    )

    class RobustEmailBackendSharedTests(  # type: ignore[misc]
        SMTPMailbox, mail_backend_tests.SharedEmailBackendTests, SimpleTestCase
    ):
        """Django ≥ 6.1: ``SharedEmailBackendTests``, the backend built with MAILERS OPTIONS."""

        backend_class = RobustEmailBackend
        smtp_handler_class = mail_backend_tests.SMTPHandler

        @classmethod
        def setUpClass(cls) -> None:
            cls.start_mailbox()
            super().setUpClass()

        @classmethod
        def options(cls) -> dict[str, Any]:
            """MAILERS OPTIONS pointing at the mailbox: ROBUST_MAIL's keys in lower case."""
            entry = {key.lower(): value for key, value in cls.provider_settings().items()}
            retry = {key.lower(): value for key, value in RETRY.items()}
            return {"providers": [entry], "retry": retry}

        def create_backend(self, **kwargs: Any) -> RobustEmailBackend:
            for key, value in self.options().items():
                kwargs.setdefault(key, value)
            return super().create_backend(**kwargs)  # type: ignore[no-any-return]

        def test_create_from_mailers(self, required_options: Any = None) -> None:
            # Django's own note: "Subclasses must override this test case if any options
            # are required." Ours needs its providers.
            super().test_create_from_mailers(required_options=required_options or self.options())

        def test_fail_silently_arg_accepted(self) -> None:
            # Django's version asserts that fail_silently is deprecated in BaseEmailBackend
            # and refused with an alias. Like Django's SMTP backend (whose tests override
            # this case the same way), ours supports fail_silently itself: it is accepted
            # with and without an alias, and using it warns about nothing.
            for alias in ("test_alias", None):
                for value in (True, False):
                    with self.subTest(alias=alias, fail_silently=value), warnings.catch_warnings():
                        warnings.simplefilter("error", RemovedInDjango2028Warning)
                        backend = self.create_backend(alias=alias, fail_silently=value)
                        self.assertIs(backend.fail_silently, value)

        def test_unknown_kwargs_ignored(self) -> None:
            # Django's version expects "<module>.EmailBackend.__init__()" in the warning:
            # every built-in backend class is called EmailBackend. Ours is
            # RobustEmailBackend; BaseEmailBackend names the class it was given, so
            # assert the same message with our class's real name.
            msg = (
                f"{BACKEND_PATH}.__init__() does not support 'unknown_kwarg'. In Django "
                "2028, BaseEmailBackend will raise a TypeError for unknown keyword "
                "arguments."
            )
            with self.assertWarnsMessage(RemovedInDjango2028Warning, msg):
                backend = self.create_backend(alias=None, unknown_kwarg="foo")
            self.assertFalse(hasattr(backend, "unknown_kwarg"))
