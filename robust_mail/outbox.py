"""The transactional outbox: enqueue a message, and claim due messages for delivery.

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

Delivering a claimed row and recording the outcome: :mod:`robust_mail.outbox_delivery`.
"""

from __future__ import annotations

import functools
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage
from django.db import DatabaseError, IntegrityError, connections, router, transaction
from django.db.models import BooleanField, Case, F, Q, TextField, Value, When
from django.db.models.functions import Coalesce
from django.db.transaction import TransactionManagementError
from django.utils import timezone
from django.utils.encoding import force_str
from django.views.decorators.debug import sensitive_variables

from robust_mail.conf import ConfigurationError
from robust_mail.db import insert
from robust_mail.envelope import build_envelope, pin_message
from robust_mail.exceptions import Classification, InvalidMessage, RobustMailError
from robust_mail.models.outbox import OutboxMessage, OutboxStatus
from robust_mail.serialization import message_to_data, redacted
from robust_mail.signals import emit, message_queued

__all__ = ["Claim", "GiveUp", "OutboxUnavailable", "claim", "enqueue", "release", "taken_over"]

logger = logging.getLogger("robust_mail.outbox")

_LEASE_LOST = (
    "a worker's lease expired before it recorded an outcome; the message may have been sent"
)
_ABANDONED = (
    "dead: abandoned by its worker (crashed or killed while sending it) once too often, "
    "past MAX_AGE or the retry schedule's attempts; it may have been sent"
)
_ORDER = ("-priority", "next_attempt_at", "pk")


class OutboxUnavailable(RobustMailError):
    """The outbox's database could not store the message: nothing was queued."""


# --- enqueue ---------------------------------------------------------------------------


# Stars in Django's error reports: the payload and the built message hold the bodies (a
# one-time code, a reset link) when the INSERT fails.
@sensitive_variables("payload", "envelope", "row")
def enqueue(
    message: EmailMessage,
    *,
    priority: int = 0,
    idempotency_key: str | None = None,
    using: str | None = None,
    not_before: datetime | None = None,
    sensitive: bool | None = None,
    mailer: str | None = None,
) -> OutboxMessage:
    """Store ``message`` for delivery by a task or a worker, and return its row.

    Pins the Message-ID and Date on ``message`` first, so the caller's copy and
    the stored one are the same message. The row belongs to the current
    transaction on ``using``: rolled back, it is never sent; committed, a
    delivery task is enqueued (when a tasks backend is configured, see
    :mod:`robust_mail.tasks`), else ``robust_mail_worker`` picks it up.

    With an ``idempotency_key`` already in the outbox, nothing is stored and the
    existing row is returned (its Message-ID, not the one just pinned on
    ``message``, is the one that will be sent).

    ``sensitive`` (default: the message's ``robust_mail_sensitive`` attribute, which
    ``EmailService.send_email(..., sensitive=True)`` sets) marks a message whose bodies
    hold a secret: the admin withholds them and they are erased once the row is final.

    ``mailer``: the Django 6.1 MAILERS alias whose configuration (providers, retries)
    delivers it; the backends of such an alias pass their own. None: the classic one.

    Raises :class:`InvalidMessage` for a message that cannot be sent or stored (a
    Message-ID over 255 characters included), ``ValueError`` for an ``idempotency_key``
    over 255 characters, :class:`OutboxUnavailable` when the database fails.
    """
    _check_deliverable(mailer)
    if not_before is not None:
        not_before = _as_now_is(not_before)
    message_id = pin_message(message)
    _check_fits(message_id, idempotency_key)
    payload = message_to_data(message)  # InvalidMessage for what JSON cannot hold
    # Build it once now, so a message that could never be sent (no recipients, a bad
    # address, an injected header) is refused here, not found later by a worker; and keep
    # what was built, so the worker sends exactly these bytes without building it again.
    envelope = build_envelope(message)
    now = timezone.now()
    row = OutboxMessage(
        message_id=message_id,
        payload=payload,
        mime=envelope.data,
        subject=force_str(message.subject),
        from_email=force_str(message.from_email),
        recipients=", ".join(force_str(r) for r in message.recipients()),
        priority=priority,
        next_attempt_at=not_before or now,
        created_at=now,
        # MAX_AGE counts from the first attempt it is due for, not from now: a message
        # scheduled further ahead than MAX_AGE would otherwise die at its first failure.
        retried_at=not_before if not_before is not None and not_before > now else None,
        idempotency_key=idempotency_key,
        mailer=mailer or "",
        sensitive=bool(getattr(message, "robust_mail_sensitive", False))
        if sensitive is None
        else sensitive,
    )
    alias = using or router.db_for_write(OutboxMessage)
    try:
        _check_transactions(alias)
        insert(row, alias)
    except TransactionManagementError:
        raise  # a DatabaseError too, but the caller's usage, not the database
    except IntegrityError as exc:
        existing = _existing(idempotency_key, alias)
        if existing is None:
            refused = OutboxUnavailable(f"the outbox refused the message: {exc}")
            raise refused from (None if row.sensitive else exc)  # as for DatabaseError below
        logger.info("message with idempotency key %r already queued", idempotency_key)
        return existing
    except DatabaseError as exc:
        error = OutboxUnavailable(
            f"cannot store the message in the outbox (database {alias!r}): {exc}"
        )
        # A secret's message: not chained, so the database's frames (whose locals hold
        # the INSERT's parameters, the bodies) stay out of error reports; the text stays.
        raise error from (None if row.sensitive else exc)
    transaction.on_commit(functools.partial(_committed, message, row.pk, alias), using=alias)
    return row


def _check_deliverable(mailer: str | None) -> None:
    """Refuse a message nothing could ever deliver, rather than store it to go dead."""
    from robust_mail.outbox_delivery import NOTHING_DELIVERS, can_deliver  # imports this

    try:
        deliverable = can_deliver(mailer)
    except ImproperlyConfigured as exc:
        raise ConfigurationError(f"cannot queue for mailer {mailer!r}: {exc}") from exc
    if not deliverable:
        raise ConfigurationError(
            f"no configuration can deliver queued messages: {NOTHING_DELIVERS} (see check "
            "robust_mail.W033)"
        )


def _as_now_is(value: datetime) -> datetime:
    """``value`` aware or naive as ``timezone.now()`` is, so the two compare.

    A naive time under ``USE_TZ`` is read in the default time zone, as a DateTimeField
    reads it; an aware one without ``USE_TZ`` becomes the default zone's local time.
    """
    if settings.USE_TZ and timezone.is_naive(value):
        return timezone.make_aware(value)
    if not settings.USE_TZ and timezone.is_aware(value):
        return timezone.make_naive(value)
    return value


def _check_transactions(alias: str) -> None:
    connection = transaction.get_connection(alias)
    if not connection.get_autocommit() and not connection.in_atomic_block:
        # Refused before the INSERT: transaction.on_commit() below would raise after it,
        # leaving a row the caller's transaction may still commit.
        raise TransactionManagementError(
            "enqueue() needs autocommit or an atomic block: delivery is scheduled with "
            "transaction.on_commit(), which Django does not allow under manual "
            "transaction management (set_autocommit(False)). Nothing was queued."
        )


def _check_fits(message_id: str, idempotency_key: str | None) -> None:
    # Refused here rather than by the column: SQLite would store a longer value, and
    # PostgreSQL's "value too long" is not the database being unavailable.
    fields = OutboxMessage._meta
    longest = fields.get_field("message_id").max_length or 0
    if len(message_id) > longest:
        raise InvalidMessage(
            f"the Message-ID is {len(message_id)} characters long; the outbox keeps at most "
            f"{longest}"
        )
    longest = fields.get_field("idempotency_key").max_length or 0
    if idempotency_key is not None and len(idempotency_key) > longest:
        raise ValueError(
            f"idempotency_key is {len(idempotency_key)} characters long; at most {longest}"
        )


def _existing(idempotency_key: str | None, alias: str) -> OutboxMessage | None:
    if idempotency_key is None:
        return None
    return OutboxMessage.objects.using(alias).filter(idempotency_key=idempotency_key).first()


def _committed(message: EmailMessage, pk: int, alias: str) -> None:
    emit(message_queued, OutboxMessage, message=message, outbox_id=pk)
    from robust_mail.tasks import schedule_delivery

    # The database only when it is not the router's: the task's arguments then stay the
    # message's pk alone, as tasks queued by earlier versions have them.
    using = None if alias == router.db_for_write(OutboxMessage) else alias
    try:
        schedule_delivery(pk, using=using)
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


@dataclass(frozen=True)
class GiveUp:
    """When a message abandoned by its worker is not taken over again, but ``dead``.

    ``max_age``: seconds since it was queued (``OUTBOX MAX_AGE``); ``attempts``: claims
    made (every claim counts, a crashed one too), the schedule's whole run
    (:func:`robust_mail.outbox_delivery.give_up`). A message that kills every worker that
    sends it (out of memory, say) is otherwise taken over after every lease, forever.
    """

    max_age: float
    attempts: int


def claim(
    *,
    limit: int,
    lease: float,
    using: str | None = None,
    now: datetime | None = None,
    pk: int | None = None,
    give_up: GiveUp | None = None,
) -> Claim:
    """Claim up to ``limit`` due messages (highest priority, then oldest due first).

    Due: ``queued`` with ``next_attempt_at`` reached, or ``sending`` with an
    expired lease (its worker died) — those are flagged ``ambiguous``, unless
    ``give_up`` says they have had their time: those become ``dead`` instead.
    ``attempts`` counts claims, so an attempt cut short by a crash counts too.
    """
    alias = using or router.db_for_write(OutboxMessage)
    now = now or timezone.now()
    token = uuid.uuid4().hex
    rows = OutboxMessage.objects.using(alias)
    if give_up is not None:
        _bury_abandoned(rows if pk is None else rows.filter(pk=pk), give_up, now)
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


def _bury_abandoned(rows: Any, give_up: GiveUp, now: datetime) -> None:
    abandoned = rows.filter(status=OutboxStatus.SENDING, lease_until__lt=now)
    queued_since = Coalesce("retried_at", "created_at")
    due_to_die = abandoned.alias(queued_since=queued_since).filter(
        Q(queued_since__lte=now - timedelta(seconds=give_up.max_age))
        | Q(attempts__gte=give_up.attempts)
    )
    # Row by row (rare): a sensitive one's bodies are erased as for any final row.
    for row in due_to_die.only("pk", "sensitive", "payload"):
        changes: dict[str, Any] = {
            "status": OutboxStatus.DEAD,
            "lease_until": None,
            "lease_token": "",
            "mime": None,
            "ambiguous": True,
            "last_classification": Classification.AMBIGUOUS.value,
            "last_error": _ABANDONED,
        }
        if row.sensitive:
            changes["payload"] = redacted(row.payload)
        if abandoned.filter(pk=row.pk).update(**changes):
            logger.warning("outbox message %s: %s", row.pk, _ABANDONED)


def taken_over(row: OutboxMessage) -> bool:
    """True when this claim took ``row`` over from a worker whose lease expired."""
    return row.last_error == _LEASE_LOST


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


_DELIVERY_NAMES = frozenset(
    {"Outcome", "attempt", "process", "process_pk", "record", "record_many"}
)


def __getattr__(name: str) -> Any:
    # The delivery half lives in outbox_delivery (which imports this module); its public
    # names are reachable from here too, resolved lazily to avoid the import cycle.
    if name in _DELIVERY_NAMES:
        from robust_mail import outbox_delivery

        return getattr(outbox_delivery, name)
    raise AttributeError(f"module 'robust_mail.outbox' has no attribute {name!r}")
