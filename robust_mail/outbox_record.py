"""Writing what an attempt decided for a claimed outbox row, fenced by the claim's lease.

:class:`Outcome` is the decision (:mod:`robust_mail.outbox_delivery` makes it);
:func:`record_many` writes several in one transaction, each row only while the claim still
holds it; :func:`record_through_outages` waits out a database outage while the lease lasts
and writes a row the database refuses without its details. After the commit, failures are
signalled (``message_failed``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.core.mail import EmailMessage
from django.db import InterfaceError, OperationalError, transaction
from django.utils import timezone

from robust_mail.db import drop_connections
from robust_mail.fenced_update import FencedUpdates
from robust_mail.models.outbox import OutboxMessage, OutboxStatus
from robust_mail.outbox import Claim
from robust_mail.results import DeliveryResult
from robust_mail.serialization import redacted
from robust_mail.signals import emit, message_failed

__all__ = ["OUTAGES", "Outcome", "record", "record_many", "record_through_outages"]

logger = logging.getLogger("robust_mail.outbox")

Clock = Callable[[], datetime]

#: Pause after a database outage (writing outcomes, claiming), doubled each time up to the
#: maximum (seconds).
DB_RETRY_FIRST = 1.0
DB_RETRY_MAX = 30.0
#: A database that cannot be reached now (as opposed to one refusing a value).
OUTAGES = (OperationalError, InterfaceError)


@dataclass
class Outcome:
    """What one attempt decided for one row: the new status and the fields to write."""

    status: OutboxStatus
    fields: dict[str, Any]
    result: DeliveryResult | None = None
    message: EmailMessage | None = None

    def bare(self, error: Exception) -> Outcome:
        """This outcome without the values the database refused: its status and schedule.

        A row left ``sending`` because its outcome could not be written is taken over
        after its lease and sent again, and again: an outcome with less detail is better.
        """
        fields = {key: self.fields[key] for key in _BARE if key in self.fields}
        fields["last_error"] = (
            f"the outcome ({self.status}) was recorded without its details, which the "
            f"database refused ({type(error).__name__})"
        )
        return Outcome(self.status, fields, self.result, self.message)


_BARE = ("sent_at", "next_attempt_at", "attempts", "ambiguous", "last_classification")


_FINAL = frozenset({OutboxStatus.SENT, OutboxStatus.FAILED, OutboxStatus.DEAD})


def record(row: OutboxMessage, held: Claim, outcome: Outcome) -> bool:
    """Write ``outcome`` if this claim still holds the row; False if its lease was lost.

    Raises ``DatabaseError`` when the database is unreachable (the worker retries).
    """
    return record_many(held, [(row, outcome)])[0]


def record_many(held: Claim, outcomes: list[tuple[OutboxMessage, Outcome]]) -> list[bool]:
    """Write several outcomes of one claim in one transaction (one commit, one fsync).

    Each row is still fenced by the claim's lease token on its own: the result says,
    row by row, whether the outcome was written (False: the lease was lost). Raises
    ``DatabaseError`` when the database is unreachable; then nothing was written.
    """
    fence = {"lease_token": held.token, "status": OutboxStatus.SENDING}
    updates = FencedUpdates(OutboxMessage.objects.all(), held.using, fence)
    with transaction.atomic(using=held.using):
        written = [updates.write(row.pk, _values(row, outcome)) for row, outcome in outcomes]
    for (row, outcome), ok in zip(outcomes, written, strict=True):
        _report(row, outcome, ok)
    return written


def record_through_outages(
    held: Claim,
    outcomes: list[tuple[OutboxMessage, Outcome]],
    *,
    clock: Clock = timezone.now,
    patient: bool = True,
) -> list[bool]:
    """:func:`record_many`, retried through database outages while the lease lasts.

    After the lease another worker owns the rows and the writes would be fenced off
    anyway. A row whose outcome the database refuses outright (a value it cannot hold;
    not an outage) costs the others nothing: each is then written on its own, and that
    one :meth:`~Outcome.bare`. Not ``patient``: an outage is raised at once.
    """
    pause = DB_RETRY_FIRST
    while True:
        try:
            return _record_or_bare(held, outcomes)
        except OUTAGES as exc:
            if not patient:
                raise
            lease_until = outcomes[0][0].lease_until
            if lease_until is None or clock() >= lease_until:
                logger.error(
                    "%d outbox outcome(s) not recorded, lease over: %s", len(outcomes), exc
                )
                return [False] * len(outcomes)
            logger.warning(
                "cannot record %d outbox outcome(s) (%s); retrying in %.0fs",
                len(outcomes),
                exc,
                pause,
            )
            drop_connections()
            # Not interrupted by a worker's stop(): finishing a message includes this.
            threading.Event().wait(pause)
            pause = min(pause * 2, DB_RETRY_MAX)


def _record_or_bare(held: Claim, outcomes: list[tuple[OutboxMessage, Outcome]]) -> list[bool]:
    try:
        return record_many(held, outcomes)
    except OUTAGES:
        raise
    except Exception as exc:
        if len(outcomes) > 1:
            return [_record_alone(held, item) for item in outcomes]
        row, outcome = outcomes[0]
        logger.exception("outbox message %s: the database refused its outcome", row.pk)
        return record_many(held, [(row, outcome.bare(exc))])


def _record_alone(held: Claim, item: tuple[OutboxMessage, Outcome]) -> bool:
    # One row the database refuses even bare must not cost the rows after it theirs.
    try:
        return _record_or_bare(held, [item])[0]
    except OUTAGES:
        raise
    except Exception:
        logger.exception("outbox message %s: outcome not recorded", item[0].pk)
        return False


def _values(row: OutboxMessage, outcome: Outcome) -> dict[str, Any]:
    fields = dict(outcome.fields)
    if outcome.status in _FINAL:
        fields["mime"] = None  # only needed while waiting; the payload keeps the message
        if row.sensitive:
            # The secret has done its job (or never will): keep only the headers.
            fields["payload"] = redacted(row.payload)
    return {
        "status": outcome.status,
        "lease_until": None,
        "lease_token": "",
        **{key: _storable(value) for key, value in fields.items()},
    }


def _storable(value: Any) -> Any:
    """``value`` with text every database column takes: no NUL, no lone surrogate.

    Replies come from servers and exceptions (decoded with ``errors="replace"``, which
    keeps a NUL): PostgreSQL refuses a NUL in text and jsonb.
    """
    if isinstance(value, str):
        if "\x00" in value:
            value = value.replace("\x00", "\ufffd")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # Lone surrogates (the only str UTF-8 cannot encode): U+FFFD, as for a NUL.
            value = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in value)
        return value
    if isinstance(value, dict):
        return {_storable(key): _storable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_storable(item) for item in value]
    return value


def _report(row: OutboxMessage, outcome: Outcome, written: bool) -> None:
    # After the commit: a signal receiver must never see an outcome that was rolled back.
    if not written:
        logger.warning(
            "outbox message %s: lease lost before the outcome (%s) was recorded",
            row.pk,
            outcome.status,
        )
        return
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
