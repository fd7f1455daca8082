"""``EmailService``: the helper views call to send mail and learn what happened."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from smtplib import SMTPException
from typing import Any, cast

import django
from django.conf import settings
from django.core import mail
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.core.mail.backends.base import BaseEmailBackend

from robust_mail.backends import _RobustBackendBase
from robust_mail.conf import ConfigurationError
from robust_mail.envelope import build_envelope, release_pins
from robust_mail.exceptions import Classification, InvalidMessage, RobustMailError
from robust_mail.fallback import queue_in_outbox
from robust_mail.results import DeliveryResult, DeliveryStatus

logger = logging.getLogger("robust_mail")


def default_backend() -> BaseEmailBackend:
    """The project's default mail backend, on every supported Django version.

    Django 6.1 deprecates ``get_connection()``; its ``mailers.default`` builds the default
    backend from ``MAILERS`` or, while MAILERS is not set, from ``EMAIL_BACKEND`` (calling
    ``get_connection()`` from inside Django, which does not warn).
    """
    mailers = getattr(mail, "mailers", None)
    if mailers is not None:
        return mailers.default
    return mail.get_connection()


class EmailService:
    """Send mail from views and tasks.

    Works with whatever backend the project configured: with robust_mail's
    backends it returns the real :class:`DeliveryResult`; with another one
    (``locmem`` in tests, say) it sends through it and reports what it can.
    All methods are class methods, so ``EmailService.send_email(...)`` works
    without an instance.
    """

    @classmethod
    def send_email(
        cls,
        subject: str,
        message: str,
        recipient_list: Sequence[str],
        from_email: str | None = None,
        *,
        html_message: str | None = None,
        fail_silently: bool = False,
        background: bool = False,
        sensitive: bool = False,
        using: str | None = None,
        **extra: Any,
    ) -> bool:
        """Build and send one message; True when it was sent, queued or printed.

        ``extra`` goes to :class:`~django.core.mail.EmailMultiAlternatives`
        (``cc``, ``bcc``, ``reply_to``, ``headers``, ``attachments``). Raises
        :class:`DeliveryFailed` (or :class:`RateLimited`) when nothing took the message,
        unless ``fail_silently``. Bad input (:class:`InvalidMessage`: a bad address,
        header injection; ``TypeError`` for a ``recipient_list`` that is a string) and
        configuration errors are raised anyway, as Django's ``send_mail`` does: they are
        the caller's to fix, not a delivery failure. No recipients at all sends nothing
        and returns False, as ``send_mail`` returns 0.
        ``sensitive=True`` marks a message that carries a secret (a one-time code, a reset
        link): if it waits in the outbox, the admin withholds its bodies and they are
        erased once it is sent, failed or dead.
        ``using``: a Django 6.1 ``MAILERS`` alias to send (or queue) through instead of
        the default one.
        """
        if isinstance(recipient_list, str | bytes):
            # list() would split it into characters: "root" delivered to r, o, o and t.
            raise TypeError('"recipient_list" argument must be a list or tuple')
        email = EmailMultiAlternatives(
            subject,
            message,
            from_email or settings.DEFAULT_FROM_EMAIL,
            list(recipient_list),
            **extra,
        )
        if html_message is not None:
            email.attach_alternative(html_message, "text/html")
        if sensitive:
            # Carries a secret (a one-time code): the outbox erases the bodies once done.
            email.robust_mail_sensitive = True  # type: ignore[attr-defined]
        if not email.recipients():
            _skip_without_recipients(email)
            return False
        try:
            result = cls._send(email, background, using, fail_silently)
            if not result.ok:
                raise result.to_exception()
        except (ConfigurationError, InvalidMessage):
            raise
        except (RobustMailError, SMTPException, OSError):
            # SMTPException / OSError: what another backend (Django's SMTP one) raises.
            if fail_silently:
                logger.exception("send_email failed (fail_silently=True)")
                return False
            raise
        return True

    @classmethod
    def send(
        cls, message: EmailMessage, *, background: bool = False, using: str | None = None
    ) -> DeliveryResult:
        """Send (or with ``background=True`` queue) ``message``; return what happened.

        Through the ``MAILERS`` alias ``using`` when given (Django 6.1), else
        ``message.connection`` when it has one (as ``message.send()`` would), else the
        default backend; queued with ``background=True``, to be delivered with ``using``'s
        configuration (an alias served by robust_mail). When that backend is not one of
        robust_mail's (``locmem`` in tests, say) ``background=True`` sends through it at
        once: the outbox would bypass the backend the project chose.
        Delivery failures are reported in the result, not raised; a message
        that cannot be built raises :class:`InvalidMessage`. A message without
        recipients is not sent (``message.send()`` returns 0 for it): the result is
        ``FAILED``, with no attempts and no Message-ID.
        """
        return cls._send(message, background, using, fail_silently=False)

    @classmethod
    def _send(
        cls, message: EmailMessage, background: bool, using: str | None, fail_silently: bool
    ) -> DeliveryResult:
        if not message.recipients():
            _skip_without_recipients(message)
            result = DeliveryResult(
                DeliveryStatus.FAILED, "", classification=Classification.MESSAGE_FATAL
            )
            return result.attach(message)
        if background:
            connection = _connection_of(message)
            if using is None:
                backend = connection if connection is not None else default_backend()
                if not isinstance(backend, _RobustBackendBase):
                    # The project chose another backend (locmem in tests, console in
                    # development, another package's): queueing would bypass it, the mail
                    # going out later over robust_mail's SMTP, never in mail.outbox. So it
                    # is sent through that backend now, as background=False would.
                    return _send_through_other(backend, message)
            if using is None and isinstance(connection, _RobustBackendBase):
                using = connection.alias  # queued for the alias it would have gone through
            if using is not None:
                # Which Django lacks MAILERS, said now; enqueue() checks the alias itself.
                _require_mailers(using)
            release_pins(message)
            # enqueue validates before storing
            return queue_in_outbox(message, mailer=using)
        backend = _backend_for(message, using)
        if isinstance(backend, _RobustBackendBase):
            # fail_silently=True reaches the backend (a message over a rate limit is then
            # queued by the outbox fallback, not dropped); False leaves the backend's own.
            return backend.deliver(message, fail_silently=fail_silently or None)
        return _send_through_other(backend, message)


def _skip_without_recipients(message: EmailMessage) -> None:
    # Django's send_mail() and EmailMessage.send() return 0 for it, fail_silently or not;
    # the backends skip it the same way. Logged, so an empty list by mistake shows.
    logger.warning("message without recipients not sent: %r", message.subject)


def _require_mailers(using: str) -> None:
    """``using=`` names a MAILERS alias: there must be MAILERS to name one in."""
    from robust_mail.conf import mailers_setting

    if mailers_setting() is None:
        why = "MAILERS is not set" if django.VERSION >= (6, 1) else "MAILERS arrived in Django 6.1"
        raise ConfigurationError(f"using={using!r} names a MAILERS alias, but {why}.")


def _backend_for(message: EmailMessage, using: str | None) -> BaseEmailBackend:
    if using is not None:
        _require_mailers(using)
        return cast(BaseEmailBackend, mail.mailers[using])  # type: ignore[attr-defined]
    connection = _connection_of(message)
    if connection is not None:
        return connection
    return default_backend()


def _connection_of(message: EmailMessage) -> BaseEmailBackend | None:
    # Read where Django keeps it: Django 6.1 deprecates the connection attribute (reading
    # it warns), and still honours a connection given to the message.
    stored = vars(message)
    return cast("BaseEmailBackend | None", stored.get("_connection", stored.get("connection")))


def _send_through_other(backend: BaseEmailBackend, message: EmailMessage) -> DeliveryResult:
    envelope = build_envelope(message)
    sent = backend.send_messages([message])
    status = DeliveryStatus.SENT if sent else DeliveryStatus.FAILED
    result = DeliveryResult(
        status, envelope.message_id, provider=type(backend).__name__, attempts=1
    )
    return result.attach(message)
