"""The transactional outbox: enqueue a message, claim due messages, deliver and record them.

Guarantee: at least once. A row is written in the caller's transaction, so a
rollback means the message is never sent and a commit means it will be. A
worker *claims* rows by putting its own lease token on them for ``LEASE``
seconds; it writes the outcome only while its token is still there. A worker
that dies mid-send leaves the row ``sending`` until the lease expires, then
another worker sends it again, with the same Message-ID, and the row is flagged
``ambiguous`` (the first attempt may have reached the provider).

Claims: ``SELECT ... FOR UPDATE SKIP LOCKED`` where the database has it
(PostgreSQL, MySQL 8, Oracle), so concurrent workers never wait on each other's
rows; elsewhere (SQLite) a conditional ``UPDATE`` that re-checks the row is still
claimable, so two workers can never both win a row.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.core.mail import EmailMessage
from django.db import DatabaseError, IntegrityError, connections, router, transaction
from django.db.models import BooleanField, Case, F, Q, TextField, Value, When
from django.utils import timezone
from django.utils.encoding import force_str

from robust_mail.envelope import build_envelope, pin_message
from robust_mail.exceptions import Classification, InvalidMessage, RobustMailError
from robust_mail.models.outbox import OutboxMessage, OutboxStatus
from robust_mail.results import DeliveryResult, DeliveryStatus
from robust_mail.serialization import message_to_data
from robust_mail.signals import emit, message_failed, message_queued

if TYPE_CHECKING:
    from robust_mail.conf import OutboxConfig
    from robust_mail.dispatch import Dispatcher

__all__ = [
    "Claim",
    "OutboxUnavailable",
    "Outcome",
    "attempt",
    "claim",
    "enqueue",
    "process",
    "process_pk",
    "record",
    "release",
]

logger = logging.getLogger("robust_mail.outbox")

Clock = Callable[[], datetime]

_LEASE_LOST = (
    "a worker's lease expired before it recorded an outcome; the message may have been sent"
)
_ORDER = ("-priority", "next_attempt_at", "pk")


class OutboxUnavailable(RobustMailError):
    """The outbox's database could not store the message: nothing was queued."""


# --- enqueue ---------------------------------------------------------------------------


def enqueue(
    message: EmailMessage,
    *,
    priority: int = 0,
    idempotency_key: str | None = None,
    using: str | None = None,
    not_before: datetime | None = None,
) -> OutboxMessage:
    """Store ``message`` for delivery by a task or a worker, and return its row.

    Pins the Message-ID and Date on ``message`` first, so the caller's copy and
    the stored one are the same message. The row belongs to the current
    transaction on ``using``: rolled back, it is never sent; committed, a
    delivery task is enqueued (when a tasks backend is configured, see
    :mod:`robust_mail.tasks`), else ``robust_mail_worker`` picks it up.

    With an ``idempotency_key`` already in the outbox, nothing is stored and the
    existing row is returned. Raises :class:`InvalidMessage` for a message that
    cannot be sent or stored, :class:`OutboxUnavailable` when the database fails.
    """
    message_id = pin_message(message)
    payload = message_to_data(message)  # InvalidMessage for what JSON cannot hold
    # Build it once now, so a message that could never be sent (no recipients, a bad
    # address, an injected header) is refused here, not found later by a worker.
    build_envelope(message)
    now = timezone.now()
    row = OutboxMessage(
        message_id=message_id,
        payload=payload,
        subject=force_str(message.subject),
        from_email=force_str(message.from_email),
        recipients=", ".join(force_str(r) for r in message.recipients()),
        priority=priority,
        next_attempt_at=not_before or now,
        created_at=now,
        idempotency_key=idempotency_key,
    )
    alias = using or router.db_for_write(OutboxMessage)
    try:
        with transaction.atomic(using=alias):
            row.save(using=alias, force_insert=True)
    except IntegrityError as exc:
        existing = _existing(idempotency_key, alias)
        if existing is None:
            raise OutboxUnavailable(f"the outbox refused the message: {exc}") from exc
        logger.info("message with idempotency key %r already queued", idempotency_key)
        return existing
    except DatabaseError as exc:
        raise OutboxUnavailable(
            f"cannot store the message in the outbox (database {alias!r}): {exc}"
        ) from exc
    transaction.on_commit(functools.partial(_committed, message, row.pk), using=alias)
    return row


def _existing(idempotency_key: str | None, alias: str) -> OutboxMessage | None:
    if idempotency_key is None:
        return None
    return OutboxMessage.objects.using(alias).filter(idempotency_key=idempotency_key).first()


def _committed(message: EmailMessage, pk: int) -> None:
    emit(message_queued, OutboxMessage, message=message, outbox_id=pk)
    from robust_mail.tasks import schedule_delivery

    try:
        schedule_delivery(pk)
    except Exception:
        # The row is committed: a worker delivers it anyway. Never fail the caller's request.
        logger.exception("could not enqueue the delivery task for outbox message %s", pk)


# --- claims ----------------------------------------------------------------------------


@dataclass
class Claim:
    """Rows one worker holds until ``lease_until``; outcomes are written under ``token``."""

    token: str
    using: str
    rows: list[OutboxMessage] = field(default_factory=list)


def claim(
    *,
    limit: int,
    lease: float,
    using: str | None = None,
    now: datetime | None = None,
    pk: int | None = None,
) -> Claim:
    """Claim up to ``limit`` due messages (highest priority, then oldest due first).

    Due: ``queued`` with ``next_attempt_at`` reached, or ``sending`` with an
    expired lease (its worker died) — those are flagged ``ambiguous``.
    ``attempts`` counts claims, so an attempt cut short by a crash counts too.
    """
    alias = using or router.db_for_write(OutboxMessage)
    now = now or timezone.now()
    token = uuid.uuid4().hex
    rows = OutboxMessage.objects.using(alias)
    due = rows.filter(
        Q(status=OutboxStatus.QUEUED, next_attempt_at__lte=now)
        | Q(status=OutboxStatus.SENDING, lease_until__lt=now)
    )
    if pk is not None:
        due = due.filter(pk=pk)
    changes: dict[str, Any] = {
        "status": OutboxStatus.SENDING,
        "lease_until": now + timedelta(seconds=lease),
        "lease_token": token,
        "attempts": F("attempts") + 1,
        # UPDATE sees the old status: a row still "sending" was abandoned by a dead worker.
        "ambiguous": Case(
            When(status=OutboxStatus.SENDING, then=Value(True)),
            default=F("ambiguous"),
            output_field=BooleanField(),
        ),
        "last_error": Case(
            When(status=OutboxStatus.SENDING, then=Value(_LEASE_LOST)),
            default=F("last_error"),
            output_field=TextField(),
        ),
    }
    if connections[alias].features.has_select_for_update_skip_locked:
        with transaction.atomic(using=alias):
            locked = due.select_for_update(skip_locked=True).order_by(*_ORDER)
            pks = list(locked.values_list("pk", flat=True)[:limit])
            if pks:
                rows.filter(pk__in=pks).update(**changes)
    else:
        pks = list(due.order_by(*_ORDER).values_list("pk", flat=True)[:limit])
        if pks:
            # Re-checks "due" in the UPDATE itself: a row another worker took in between
            # is no longer due and is not touched.
            due.filter(pk__in=pks).update(**changes)
    held = list(rows.filter(lease_token=token, status=OutboxStatus.SENDING).order_by(*_ORDER))
    return Claim(token=token, using=alias, rows=held if pks else [])


def release(held: Claim, rows: list[OutboxMessage]) -> int:
    """Give back claimed rows that were not attempted (a clean stop); returns how many."""
    if not rows:
        return 0
    return (
        OutboxMessage.objects.using(held.using)
        .filter(pk__in=[r.pk for r in rows], lease_token=held.token, status=OutboxStatus.SENDING)
        .update(
            status=OutboxStatus.QUEUED,
            lease_until=None,
            lease_token="",
            attempts=F("attempts") - 1,
        )
    )


# --- delivery --------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one attempt decided for one row: the new status and the fields to write."""

    status: OutboxStatus
    fields: dict[str, Any]
    result: DeliveryResult | None = None
    message: EmailMessage | None = None


def attempt(
    row: OutboxMessage, *, dispatcher: Dispatcher, config: OutboxConfig, clock: Clock = timezone.now
) -> Outcome:
    """Deliver one claimed row through ``dispatcher`` and decide its new state (no DB write).

    SENT / PARTIAL → ``sent``; FAILED (message-fatal) or a row that cannot be
    rebuilt → ``failed``; anything else is deferred: rescheduled by the
    result's ``retry_after`` or ``RETRY_SCHEDULE``, and ``dead`` once
    ``MAX_AGE`` has passed. An open breaker or a rate limit therefore defers,
    never drops.
    """
    try:
        message = row.rebuild()
    except InvalidMessage as exc:
        return _final(OutboxStatus.FAILED, f"cannot rebuild the stored message: {exc}", None)
    try:
        result = dispatcher.deliver(message)
    except InvalidMessage as exc:
        return _final(OutboxStatus.FAILED, f"invalid message: {exc}", None, message)
    except Exception as exc:
        # Not a delivery failure (those come back as results): a bug or a broken
        # environment. Retry on the schedule rather than stall or lose the message.
        logger.exception("outbox message %s: delivery raised", row.pk)
        return _defer(row, f"{type(exc).__name__}: {exc}", None, config, clock(), None, message)
    ambiguous = row.ambiguous or result.ambiguous
    if result.status in (DeliveryStatus.SENT, DeliveryStatus.PARTIAL):
        refused = {addr: [code, reply] for addr, (code, reply) in result.refused.items()}
        note = f"refused: {', '.join(sorted(refused))}" if refused else ""
        fields = {
            "provider": result.provider or "",
            "sent_at": clock(),
            "refused": refused,
            "ambiguous": ambiguous,
            "last_error": note,
            "last_classification": Classification.AMBIGUOUS.value if ambiguous else "",
        }
        return Outcome(OutboxStatus.SENT, fields, result, message)
    if result.status is DeliveryStatus.FAILED:
        outcome = _final(OutboxStatus.FAILED, result.describe(), result, message)
        outcome.fields["ambiguous"] = ambiguous
        return outcome
    return _defer(row, result.describe(), result, config, clock(), result.retry_after, message)


def _final(
    status: OutboxStatus,
    reason: str,
    result: DeliveryResult | None,
    message: EmailMessage | None = None,
) -> Outcome:
    classification = result.classification if result and result.classification else None
    fields = {
        "last_error": reason,
        "last_classification": (classification or Classification.MESSAGE_FATAL).value,
    }
    return Outcome(status, fields, result, message)


def _defer(
    row: OutboxMessage,
    reason: str,
    result: DeliveryResult | None,
    config: OutboxConfig,
    now: datetime,
    retry_after: float | None,
    message: EmailMessage | None,
) -> Outcome:
    classification = result.classification if result and result.classification else None
    fields: dict[str, Any] = {
        "last_error": reason,
        "last_classification": (classification or Classification.TRANSIENT).value,
        "ambiguous": row.ambiguous or bool(result and result.ambiguous),
    }
    deadline = row.created_at + timedelta(seconds=config.max_age)
    if now >= deadline:
        fields["last_error"] = (
            f"undelivered after {row.attempts} attempt(s) in {config.max_age:.0f}s "
            f"(MAX_AGE): {reason}"
        )
        return Outcome(OutboxStatus.DEAD, fields, result, message)
    if result is not None and result.attempts == 0:
        # Nothing was tried (every breaker open, or a rate limit): not an attempt of this
        # message, so it neither uses up a step of the schedule nor waits one out.
        fields["attempts"] = max(row.attempts - 1, 0)
        delay = retry_after if retry_after is not None else config.retry_schedule[0]
    else:
        step = config.retry_schedule[min(max(row.attempts, 1), len(config.retry_schedule)) - 1]
        delay = max(step, retry_after or 0.0)
    # One last try at the deadline itself rather than giving up before it.
    fields["next_attempt_at"] = min(now + timedelta(seconds=delay), deadline)
    return Outcome(OutboxStatus.QUEUED, fields, result, message)


def record(row: OutboxMessage, held: Claim, outcome: Outcome) -> bool:
    """Write ``outcome`` if this claim still holds the row; False if its lease was lost.

    Raises ``DatabaseError`` when the database is unreachable (the worker retries).
    """
    updated = (
        OutboxMessage.objects.using(held.using)
        .filter(pk=row.pk, lease_token=held.token, status=OutboxStatus.SENDING)
        .update(status=outcome.status, lease_until=None, lease_token="", **outcome.fields)
    )
    if not updated:
        logger.warning(
            "outbox message %s: lease lost before the outcome (%s) was recorded",
            row.pk,
            outcome.status,
        )
        return False
    if outcome.status in (OutboxStatus.FAILED, OutboxStatus.DEAD):
        logger.warning(
            "outbox message %s (%s) %s: %s",
            row.pk,
            row.message_id,
            outcome.status,
            outcome.fields.get("last_error"),
        )
        if outcome.message is not None:
            emit(message_failed, OutboxMessage, message=outcome.message, result=outcome.result)
    return True


def process(
    row: OutboxMessage,
    held: Claim,
    *,
    dispatcher: Dispatcher,
    config: OutboxConfig,
    clock: Clock = timezone.now,
) -> Outcome:
    """Attempt one claimed row and record the outcome."""
    outcome = attempt(row, dispatcher=dispatcher, config=config, clock=clock)
    record(row, held, outcome)
    return outcome


def process_pk(
    pk: int,
    *,
    using: str | None = None,
    dispatcher: Dispatcher | None = None,
    clock: Clock = timezone.now,
) -> OutboxMessage | None:
    """Claim and deliver one message by primary key (the delivery task's body).

    Returns the row as it stands afterwards, or None when it was not due (already
    sent, held by a worker, or scheduled for later).
    """
    from robust_mail.conf import get_config
    from robust_mail.dispatch import Dispatcher

    config = get_config()
    held = claim(limit=1, lease=config.outbox.lease, using=using, now=clock(), pk=pk)
    if not held.rows:
        return None
    row = held.rows[0]
    process(
        row, held, dispatcher=dispatcher or Dispatcher(config), config=config.outbox, clock=clock
    )
    return OutboxMessage.objects.using(held.using).filter(pk=pk).first()
