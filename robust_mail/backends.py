"""Django email backends: synchronous failover, and outbox-only.

Both follow Django's backend contract: keyword options (``alias`` accepted
and passed on, our own options popped before ``super().__init__()``),
``open()`` returns whether it opened, ``close()`` never raises, usable as a
context manager, ``send_messages()`` returns how many messages were handled.

SMTP connections live in process-wide pools, not in the backend: Django
builds a new backend for every ``send_mail``, and a pool per backend would
pay connect + STARTTLS + AUTH for every message.
"""

from __future__ import annotations

import difflib
import functools
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from django.apps import apps
from django.core import mail
from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend

from robust_mail.conf import TOP_LEVEL_KEYS, ConfigurationError, RobustMailConfig, get_config
from robust_mail.dispatch import Dispatcher
from robust_mail.envelope import release_pins
from robust_mail.exceptions import InvalidMessage, RobustMailError
from robust_mail.fallback import apply_fallback, queue_in_outbox
from robust_mail.results import DeliveryResult, DeliveryStatus
from robust_mail.signals import emit, message_failed

logger = logging.getLogger("robust_mail")

#: Keyword options the backends take: ROBUST_MAIL's keys in lower case (MAILERS OPTIONS).
OPTION_KEYS = frozenset(key.lower() for key in TOP_LEVEL_KEYS)
#: Django's SMTP backend's per-connection options (``get_connection(username=...)``,
#: ``send_mail(auth_user=..., auth_password=...)``): meaningless with several providers.
SMTP_KEYS = frozenset(
    {"host", "port", "username", "password", "use_tls", "use_ssl", "timeout"}
    | {"ssl_keyfile", "ssl_certfile"}
)

# Django 6.1 reports a broken MAILERS entry with InvalidMailer; before 6.1 there are no
# MAILERS and the base is just ImproperlyConfigured (already a base of ConfigurationError).
_InvalidMailer: type[ImproperlyConfigured] = getattr(mail, "InvalidMailer", ImproperlyConfigured)


class MailerConfigurationError(ConfigurationError, _InvalidMailer):  # type: ignore[misc,valid-type]
    """Bad OPTIONS in a MAILERS entry served by robust_mail (Django 6.1).

    Both our :class:`ConfigurationError` and Django's ``InvalidMailer``, so code written
    against either contract catches it.
    """


def _unknown_options(backend: str, kwargs: dict[str, Any]) -> str:
    hints = []
    for key in sorted(kwargs):
        guess = difflib.get_close_matches(key.lower(), OPTION_KEYS, n=1)
        hints.append(f"{key!r} (did you mean {guess[0]!r}?)" if guess else repr(key))
    return (
        f"{backend} ignores unknown keyword options {', '.join(hints)}. It takes "
        f"fail_silently and ROBUST_MAIL's keys in lower case: {', '.join(sorted(OPTION_KEYS))}; "
        "given any of these, they are the whole configuration and ROBUST_MAIL is not read "
        "(so include providers)."
    )


@functools.cache
def _warn_if_not_installed() -> None:
    """Once per process: sending works without the app, but nothing checks the settings."""
    if not apps.is_installed("robust_mail"):
        logger.warning(
            "robust_mail is not in INSTALLED_APPS: `manage.py check` does not check its "
            "settings, and the outbox, its worker and one-time passwords are unavailable. "
            'Add "robust_mail" to INSTALLED_APPS (then run migrate).'
        )


class _RobustBackendBase(BaseEmailBackend):
    def __init__(
        self, fail_silently: bool = False, *, alias: str | None = None, **kwargs: Any
    ) -> None:
        options = {key: kwargs.pop(key) for key in list(kwargs) if key in OPTION_KEYS}
        smtp = {key: kwargs.pop(key) for key in list(kwargs) if key in SMTP_KEYS}
        # Empty ones (send_mail passes username=None; Django's backend tests "") ask for
        # nothing. Others Django's base class would drop without a word, and the message
        # would go out through the configured providers, as another account than asked for.
        if given := sorted(key for key, value in smtp.items() if value):
            raise TypeError(
                f"{type(self).__name__} does not take SMTP connection options per call "
                f"({', '.join(given)}; from get_connection() or send_mail(auth_user=..., "
                "auth_password=...)): it sends through ROBUST_MAIL's PROVIDERS. To send "
                "through another server or account, configure it as a provider (or, on "
                "Django 6.1, a MAILERS alias of its own)."
            )
        if kwargs and alias is None:
            # Django's backend contract is to ignore unknown keywords (its own shared
            # backend tests check it on 6.1), but dropping FALLBACK="outbox" without a word
            # would send with settings the caller did not ask for: say so in the log. With
            # an alias, Django 6.1 itself reports unknown OPTIONS.
            logger.warning("%s", _unknown_options(type(self).__name__, kwargs))
        super().__init__(alias=alias, **kwargs)
        self.alias = alias
        self.fail_silently = fail_silently
        # With an alias (Django 6.1 MAILERS) the OPTIONS are the whole configuration and
        # settings.EMAIL_* are never read; without one, settings.ROBUST_MAIL is.
        self._options: dict[str, Any] | None = options if (options or alias) else None
        self._opened = False
        _warn_if_not_installed()
        if alias is not None:
            # Like Django's own backends, a MAILERS entry with bad OPTIONS fails when the
            # mailer is created (InvalidMailer), not at the first send.
            self.config  # noqa: B018

    @property
    def config(self) -> RobustMailConfig:
        """The configuration, read when used so that ``override_settings`` applies.

        Raises :class:`ConfigurationError`; for a MAILERS alias, the
        :class:`MailerConfigurationError` subclass, which is also Django's ``InvalidMailer``.
        """
        try:
            return get_config(self._options, alias=self.alias)
        except ConfigurationError as exc:
            if self.alias is None or isinstance(exc, MailerConfigurationError):
                raise
            raise MailerConfigurationError(exc.problems or str(exc)) from exc

    def open(self) -> bool:
        """Validate the configuration; True if this call opened the backend.

        Connections themselves are pooled per process and opened on demand.
        """
        if self._opened:
            return False
        self.config  # noqa: B018 - raises ConfigurationError early, never swallowed
        self._opened = True
        return True

    def close(self) -> None:
        # Pooled connections stay open for the next backend instance; see pool.pools.
        self._opened = False

    def send_messages(self, email_messages: Iterable[EmailMessage]) -> int:
        messages = list(email_messages)
        if not messages:
            return 0
        config = self.config
        handled = 0
        problems: list[Exception] = []
        sendable = []
        for message in messages:
            if message.recipients():
                sendable.append(message)
            else:
                # As Django's SMTP backend does: a message without recipients is skipped.
                logger.warning("message without recipients skipped: %r", message.subject)
        for result in self.deliver_many(sendable, config=config):
            if isinstance(result, InvalidMessage):
                problems.append(result)
            elif result.ok:
                handled += 1
            else:
                problems.append(result.to_exception())
        self._raise_first(problems)
        return handled

    def deliver_many(
        self, messages: list[EmailMessage], *, config: RobustMailConfig
    ) -> list[DeliveryResult | InvalidMessage]:
        """:meth:`deliver` for each message, or the :class:`InvalidMessage` it raised."""
        results: list[DeliveryResult | InvalidMessage] = []
        for message in messages:
            try:
                results.append(self.deliver(message, config=config))
            except InvalidMessage as exc:
                results.append(exc)
        return results

    def _raise_first(self, problems: Sequence[Exception]) -> None:
        if not problems:
            return
        first = problems[0]
        # Like Django: a malformed message raises even with fail_silently.
        invalid = next((p for p in problems if isinstance(p, InvalidMessage)), None)
        if invalid is not None:
            raise invalid
        if not self.fail_silently:
            raise first

    def deliver(
        self,
        message: EmailMessage,
        *,
        config: RobustMailConfig | None = None,
        fail_silently: bool | None = None,
    ) -> DeliveryResult:
        """Deliver (or queue) one message; ``fail_silently`` None: the backend's own."""
        raise NotImplementedError


class RobustEmailBackend(_RobustBackendBase):
    """Synchronous failover across the configured providers, then the fallback."""

    def deliver(
        self,
        message: EmailMessage,
        *,
        config: RobustMailConfig | None = None,
        fail_silently: bool | None = None,
    ) -> DeliveryResult:
        """Deliver one message and apply the fallback; never raises for a delivery failure.

        Raises :class:`InvalidMessage` for a message that cannot be built and
        :class:`~robust_mail.conf.ConfigurationError` for broken settings.
        """
        config = config or self.config
        release_pins(message)
        silently = self.fail_silently if fail_silently is None else fail_silently
        return self._settle(message, Dispatcher(config).deliver(message), config, silently)

    def deliver_many(
        self, messages: list[EmailMessage], *, config: RobustMailConfig
    ) -> list[DeliveryResult | InvalidMessage]:
        """Several messages at once: their first attempts share one connection
        (:meth:`Dispatcher.deliver_many`); each then fails over and falls back on its own."""
        for message in messages:
            release_pins(message)
        results = Dispatcher(config).deliver_many([(message, None) for message in messages])
        settled: list[DeliveryResult | InvalidMessage] = []
        broken: Exception | None = None
        for message, result in zip(messages, results, strict=True):
            assert result is not None  # None only when asked to stop, which we never ask
            if isinstance(result, InvalidMessage):
                settled.append(result)
                continue
            try:
                if isinstance(result, Exception):
                    raise result  # what deliver() would have raised for this message
                settled.append(self._settle(message, result, config, self.fail_silently))
            except Exception as exc:
                # Raised (broken settings, a fallback that cannot work such as the outbox's
                # database being down), but only once every message has had its chance.
                broken = broken or exc
        if broken is not None:
            raise broken
        return settled

    def _settle(
        self,
        message: EmailMessage,
        result: DeliveryResult,
        config: RobustMailConfig,
        fail_silently: bool,
    ) -> DeliveryResult:
        """Apply the fallback to a deferred result; signal a failure.

        A message a rate limit holds back is the caller's to handle (RateLimited), except
        with ``fail_silently`` and the outbox fallback: that caller (Django's
        AdminEmailHandler, for one) cannot handle it, and the outbox takes it to send once
        the window reopens rather than let it be dropped without a word.
        """
        held_back = result.rate_limited and not (fail_silently and config.fallback == "outbox")
        if result.status is DeliveryStatus.DEFERRED and not held_back:
            try:
                result = apply_fallback(message, result, config, mailer=self.alias)
            except RobustMailError:
                raise  # broken settings, or a message the outbox refuses: the caller's to fix
            except Exception as exc:
                logger.error(
                    "message %s: every provider failed and the fallback %r failed too: %s",
                    result.message_id,
                    config.fallback,
                    exc,
                )
                result.fallback_error = exc
        if not result.ok:
            emit(message_failed, type(self), message=message, result=result)
        return result


class OutboxEmailBackend(_RobustBackendBase):
    """Every message goes into the durable outbox and ``send_messages`` returns at once."""

    def deliver(
        self,
        message: EmailMessage,
        *,
        config: RobustMailConfig | None = None,
        fail_silently: bool | None = None,
    ) -> DeliveryResult:
        release_pins(message)
        # enqueue validates before anything is stored; the alias delivers it later.
        result = queue_in_outbox(message, mailer=self.alias)
        if not result.ok:  # the database could not take it
            emit(message_failed, type(self), message=message, result=result)
        return result
