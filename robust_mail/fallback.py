"""Where a message goes when every provider failed: the outbox, the console, or nowhere.

A message-fatal failure never reaches a fallback: no provider would ever
accept that message, so storing it would only delay the error.
"""

from __future__ import annotations

import logging
import sys
import threading
from datetime import timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage as PyEmailMessage
from typing import TextIO

from django.conf import settings
from django.core.mail import EmailMessage
from django.db import router, transaction
from django.utils import timezone

from robust_mail import metrics
from robust_mail.conf import ConfigurationError, RobustMailConfig
from robust_mail.envelope import build_envelope, pin_message
from robust_mail.results import DeliveryResult, DeliveryStatus
from robust_mail.terminal import terminal_safe

logger = logging.getLogger("robust_mail")

_console_lock = threading.Lock()


def apply_fallback(
    message: EmailMessage,
    result: DeliveryResult,
    config: RobustMailConfig,
    *,
    mailer: str | None = None,
) -> DeliveryResult:
    """Hand a DEFERRED message to the configured fallback; return the new result.

    ``mailer``: the MAILERS alias whose configuration this is, kept with an outbox row so
    that it is delivered later through the same providers.
    """
    if result.status is not DeliveryStatus.DEFERRED or config.fallback is None:
        return result
    if config.fallback == "console":
        write_console(message)
        handled = DeliveryResult(
            DeliveryStatus.CONSOLE,
            result.message_id,
            attempts=result.attempts,
            errors=result.errors,
            ambiguous=result.ambiguous,
            classification=result.classification,
        )
    elif config.fallback == "outbox":
        in_transaction = _in_callers_transaction()
        handled = queue_in_outbox(message, result, mailer=mailer)
        if in_transaction and handled.status is DeliveryStatus.QUEUED:
            # The send counts as done, but the row is the caller's transaction's: rolled
            # back (ATOMIC_REQUESTS and a later error, say), the message is lost, where a
            # provider that was up would have sent it. Said, so such a loss can be found.
            logger.warning(
                "message %s was queued in the outbox inside a transaction: it is lost if "
                "that transaction is rolled back",
                handled.message_id,
            )
    else:  # pragma: no cover - rejected by conf.py and the system checks
        raise ConfigurationError(f"unknown ROBUST_MAIL FALLBACK {config.fallback!r}")
    handled.attach(message)
    if handled.ok and not result.rate_limited:
        # Counted against the last provider tried: the one whose failure (or open breaker)
        # left the message to the fallback. An alert on it means "every provider is down";
        # a message a rate limit held back (fail_silently) met no provider and is not one.
        last = result.errors[-1].provider if result.errors else "-"
        metrics.incr(last, "fallback")
    return handled


def _in_callers_transaction() -> bool:
    """Whether an outbox row written now would belong to a transaction of the caller's."""
    from robust_mail.models.outbox import OutboxMessage

    connection = transaction.get_connection(router.db_for_write(OutboxMessage))
    # The atomic blocks Django's TestCase wraps each test in are not the caller's.
    return any(not getattr(block, "_from_testcase", False) for block in connection.atomic_blocks)


def queue_in_outbox(
    message: EmailMessage, result: DeliveryResult | None = None, *, mailer: str | None = None
) -> DeliveryResult:
    """Store ``message`` durably for the workers and report it QUEUED.

    When the database cannot take it, the result is left DEFERRED with the
    :class:`~robust_mail.outbox.OutboxUnavailable` as its ``fallback_error``: the caller
    reports it like any undelivered message (``fail_silently`` honoured, a
    ``DeliveryFailed`` otherwise) — a logging handler's ``mail_admins`` must not raise
    because the database is what failed. Raises :class:`InvalidMessage` for a message that
    cannot be stored.
    """
    from robust_mail.outbox import OutboxUnavailable, enqueue

    delay = result.retry_after if result is not None else None
    not_before = timezone.now() + timedelta(seconds=delay) if delay else None
    try:
        row = enqueue(message, not_before=not_before, mailer=mailer)
    except OutboxUnavailable as exc:
        message_id = pin_message(message)
        logger.error("message %s could not be queued in the outbox: %s", message_id, exc)
        unqueued = DeliveryResult(
            DeliveryStatus.DEFERRED,
            message_id,
            attempts=result.attempts if result else 0,
            errors=result.errors if result else (),
            ambiguous=result.ambiguous if result else False,
            classification=result.classification if result else None,
            fallback_error=exc,
        )
        return unqueued.attach(message)
    queued = DeliveryResult(
        DeliveryStatus.QUEUED,
        row.message_id,
        attempts=result.attempts if result else 0,
        errors=result.errors if result else (),
        ambiguous=result.ambiguous if result else False,
        classification=result.classification if result else None,
        outbox_id=row.pk,
    )
    return queued.attach(message)


def write_console(message: EmailMessage, stream: TextIO | None = None) -> None:
    """Print a readable copy of ``message``: decoded bodies, long lines kept whole.

    Outside DEBUG the bodies are withheld: they may hold one-time codes or
    reset links, which must never reach a production log.
    """
    out = stream or sys.stdout
    envelope = build_envelope(message)
    parsed = message_from_bytes(envelope.data, policy=policy.default)
    assert isinstance(parsed, PyEmailMessage)
    lines = [
        "-" * 72,
        "robust_mail console fallback: no provider accepted this message",
        f"Message-ID: {envelope.message_id}",
        f"Envelope-From: {envelope.from_addr}",
        f"Envelope-To: {', '.join(envelope.recipients)}",
    ]
    for name in ("From", "To", "Cc", "Reply-To", "Subject", "Date"):
        if parsed[name] is not None:
            lines.append(f"{name}: {parsed[name]}")
    lines.append("")
    if settings.DEBUG:
        lines.extend(_readable_parts(parsed))
    else:
        lines.append("[bodies withheld: DEBUG is False]")
    lines.append("-" * 72)
    with _console_lock:
        out.write(terminal_safe("\n".join(lines)) + "\n")
        out.flush()
    logger.warning("message %s written to the console fallback", envelope.message_id)


def _readable_parts(parsed: PyEmailMessage) -> list[str]:
    lines: list[str] = []
    for part in parsed.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        filename = part.get_filename()
        if filename or not ctype.startswith("text/"):
            size = len(part.get_payload(decode=True) or b"")
            lines.append(f"[attachment {filename or '(unnamed)'}: {ctype}, {size} bytes]")
            continue
        lines.append(f"--- {ctype} ---")
        lines.append(str(part.get_content()).rstrip("\n"))
    return lines
