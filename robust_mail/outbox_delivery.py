"""Delivering claimed outbox rows: one attempt through the Dispatcher, and its outcome.

:func:`attempt` decides (no database write); :func:`record` (from
:mod:`robust_mail.outbox_record`) writes the decision, fenced by the claim's lease token;
:func:`process` does both. The worker (:mod:`robust_mail.worker`) and the delivery task
(:mod:`robust_mail.tasks`) are built on these, and deliver with :func:`delivery_config`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage
from django.utils import timezone

from robust_mail.exceptions import Classification, InvalidMessage
from robust_mail.models.outbox import OutboxMessage, OutboxStatus
from robust_mail.outbox import Claim, GiveUp, claim
from robust_mail.outbox_record import (
    OUTAGES,
    Outcome,
    record,
    record_many,
    record_through_outages,
)
from robust_mail.results import DeliveryResult, DeliveryStatus

if TYPE_CHECKING:
    from robust_mail.conf import OutboxConfig, RobustMailConfig
    from robust_mail.dispatch import Dispatcher

__all__ = [
    "OUTAGES",
    "Outcome",
    "attempt",
    "attempt_many",
    "delivery_config",
    "give_up",
    "give_up_any",
    "lease_margin",
    "process",
    "process_pk",
    "record",
    "record_many",
    "record_through_outages",
    "row_config",
    "worst_case_delivery",
]

logger = logging.getLogger("robust_mail.outbox")

Clock = Callable[[], datetime]

#: Shortest wait before a deferred message is due again (seconds).
MIN_DELAY = 1.0
#: SMTP steps of one last attempt, each bounded by the provider's TIMEOUT (connect,
#: greeting, EHLO, STARTTLS, EHLO, AUTH, MAIL, RCPT, DATA, final dot).
STEPS_PER_ATTEMPT = 10


def worst_case_delivery(config: RobustMailConfig) -> float:
    """Seconds one message can take at most: RETRY DEADLINE plus a last attempt's steps."""
    timeout = max((p.timeout for p in config.providers), default=0.0)
    return config.retry.deadline + STEPS_PER_ATTEMPT * timeout


def give_up(config: OutboxConfig) -> GiveUp:
    """When an abandoned message is dead rather than taken over (see :class:`GiveUp`):
    past ``MAX_AGE``, or once it has been claimed as many times as the retry schedule
    tries a message before ``MAX_AGE`` (the last try lands on ``MAX_AGE`` itself)."""
    elapsed, attempts = 0.0, 1
    for step in config.retry_schedule:
        if elapsed >= config.max_age:
            return GiveUp(config.max_age, attempts)
        elapsed += max(step, MIN_DELAY)
        attempts += 1
    if elapsed < config.max_age and config.retry_schedule:
        last = max(config.retry_schedule[-1], MIN_DELAY)
        attempts += math.ceil((config.max_age - elapsed) / last)
    return GiveUp(config.max_age, attempts)


def give_up_any(config: RobustMailConfig) -> GiveUp:
    """:func:`give_up` for a claim that may hold rows of any MAILERS alias: the most
    lenient of ``config``'s and every alias's OUTBOX settings, so that no row is given up
    before its own alias's ``MAX_AGE`` and schedule would give it up."""
    from robust_mail.mailers import configurations

    rules = [give_up(config.outbox), *(give_up(c.outbox) for _, c in configurations())]
    return GiveUp(max(r.max_age for r in rules), max(r.attempts for r in rules))


def lease_margin(config: RobustMailConfig, lease: float) -> float:
    """How much of its ``lease`` a claim must have left to start one more message, sent
    with ``config``.

    A message started later could still be sending when the lease ends, and another worker
    would send it too. Half the lease when LEASE is shorter than one worst-case delivery
    (check W030 warns): otherwise nothing would ever start.
    """
    return min(worst_case_delivery(config), lease / 2)


def row_config(row: OutboxMessage, fallback: RobustMailConfig) -> RobustMailConfig:
    """The configuration that delivers ``row``: its MAILERS alias's, else ``fallback``.

    An alias no longer served by robust_mail (the settings changed since it was queued) is
    logged, and ``fallback`` delivers the message rather than leave it queued forever.
    """
    if not row.mailer:
        return fallback
    try:
        return delivery_config(row.mailer)
    except ImproperlyConfigured as exc:  # ConfigurationError too
        logger.warning(
            "outbox message %s was queued by mailer %r, which cannot deliver it now (%s): "
            "delivering it with the worker's configuration",
            row.pk,
            row.mailer,
            exc,
        )
        return fallback


def delivery_config(mailer: str | None = None) -> RobustMailConfig:
    """The configuration outbox messages are delivered with.

    ``mailer`` names a Django 6.1 ``MAILERS`` alias served by robust_mail, whose
    OPTIONS are then the configuration. Without it: the ``"default"`` alias if
    robust_mail serves it, else the first alias it serves, else ``ROBUST_MAIL``
    (with Django's ``EMAIL_*`` settings), as :func:`robust_mail.conf.get_config` reads it.
    """
    from robust_mail.conf import get_config
    from robust_mail.mailers import robust_mailers

    ours = dict(robust_mailers())
    if mailer is None:
        if not ours:
            return get_config()
        mailer = "default" if "default" in ours else next(iter(ours))
    if mailer not in ours:
        raise ImproperlyConfigured(f"MAILERS has no alias {mailer!r} served by robust_mail")
    return get_config(ours[mailer], alias=mailer)


#: Why :func:`can_deliver` is False (check W033, and ``enqueue()``'s refusal).
NOTHING_DELIVERS = (
    "MAILERS has no alias with robust_mail's backend and ROBUST_MAIL has no PROVIDERS"
)


def can_deliver(mailer: str | None = None) -> bool:
    """Whether the configuration delivering ``mailer``'s queued messages has a provider.

    False on Django 6.1 with MAILERS but no alias served by robust_mail and no PROVIDERS
    in ROBUST_MAIL: a worker would retry such a message until MAX_AGE. Raises
    ``ImproperlyConfigured`` as :func:`delivery_config` does.
    """
    return bool(delivery_config(mailer).providers)


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
    outcome = attempt_many([row], dispatcher=dispatcher, config=config, clock=clock)[0]
    assert outcome is not None  # nothing asked to stop
    return outcome


def attempt_many(
    rows: Sequence[OutboxMessage],
    *,
    dispatcher: Dispatcher,
    config: OutboxConfig,
    clock: Clock = timezone.now,
    proceed: Callable[[], bool] | None = None,
    on_outcome: Callable[[int, Outcome], None] | None = None,
) -> list[Outcome | None]:
    """:func:`attempt` for each of ``rows``, delivered together with
    :meth:`Dispatcher.deliver_many` (one connection, pipelined where the server allows).

    None for a row not tried because ``proceed()`` returned False before its turn.
    ``on_outcome(index, outcome)`` is called as soon as each row's outcome is decided,
    so the caller can record it while the others are still being sent.
    """
    outcomes: list[Outcome | None] = [None] * len(rows)

    def decided(index: int, outcome: Outcome) -> None:
        outcomes[index] = outcome
        if on_outcome is not None:
            on_outcome(index, outcome)

    messages: list[EmailMessage] = []
    to_send: list[int] = []
    items: list[tuple[EmailMessage, bytes | None]] = []
    for index, row in enumerate(rows):
        try:
            message = row.rebuild()
        except InvalidMessage as exc:
            decided(
                index,
                _final(OutboxStatus.FAILED, f"cannot rebuild the stored message: {exc}", None),
            )
            continue
        to_send.append(index)
        messages.append(message)
        items.append((message, bytes(row.mime) if row.mime is not None else None))

    def on_result(position: int, result: DeliveryResult | Exception) -> None:
        index = to_send[position]
        decided(index, _decide(rows[index], messages[position], result, config, clock))

    try:
        results = dispatcher.deliver_many(items, proceed=proceed, on_result=on_result)
    except Exception as exc:
        # Not a delivery failure (those come back as results): a bug, a broken
        # environment, or a task's time limit raised mid-send. Retry on the schedule
        # rather than stall or lose the messages; any of them may have been sent.
        logger.exception("outbox message(s) %s: delivery raised", [rows[i].pk for i in to_send])
        for index, message in zip(to_send, messages, strict=True):
            if outcomes[index] is None:
                reason = f"{type(exc).__name__}: {exc}"
                outcome = _defer(rows[index], reason, None, config, clock(), None, message)
                outcome.fields["ambiguous"] = True
                decided(index, outcome)
        return outcomes
    for position, result in enumerate(results):
        index = to_send[position]
        if result is not None and outcomes[index] is None:
            # Delivered or not, its outcome could not be decided (a bug, logged where it
            # happened). It may have been sent: never released as untried, but tried again
            # flagged ambiguous.
            reason = "its outcome could not be decided after delivery"
            outcome = _defer(rows[index], reason, None, config, clock(), None, messages[position])
            outcome.fields["ambiguous"] = True
            decided(index, outcome)
    return outcomes


def _decide(
    row: OutboxMessage,
    message: EmailMessage,
    result: DeliveryResult | Exception,
    config: OutboxConfig,
    clock: Clock,
) -> Outcome:
    if isinstance(result, InvalidMessage):
        return _final(OutboxStatus.FAILED, f"invalid message: {result}", None, message)
    if isinstance(result, Exception):
        # Not a delivery failure (those come back as results): a bug, a broken
        # environment, or a task's time limit raised mid-send. Retry on the schedule
        # rather than stall or lose the message; it may have been sent: ambiguous.
        logger.error("outbox message %s: delivery raised", row.pk, exc_info=result)
        reason = f"{type(result).__name__}: {result}"
        outcome = _defer(row, reason, None, config, clock(), None, message)
        outcome.fields["ambiguous"] = True
        return outcome
    ambiguous = row.ambiguous or result.ambiguous
    if result.status in (DeliveryStatus.SENT, DeliveryStatus.PARTIAL):
        refused = {addr: [code, reply] for addr, (code, reply) in result.refused.items()}
        note = f"refused: {', '.join(sorted(refused))}" if refused else ""
        fields = {
            "provider": (result.provider or "")[
                : OutboxMessage._meta.get_field("provider").max_length
            ],
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
    deadline = row.queued_since + timedelta(seconds=config.max_age)
    # Nothing tried (every breaker open, or a rate limit): deferred, never dropped. A
    # rate-limited backlog larger than the limit allows in MAX_AGE would otherwise go dead
    # without any provider having seen it; past the deadline, its next real attempt decides.
    nothing_tried = result is not None and result.attempts == 0
    if now >= deadline and not nothing_tried:
        fields["last_error"] = (
            f"undelivered after {row.attempts} attempt(s) in {config.max_age:.0f}s "
            f"(MAX_AGE): {reason}"
        )
        return Outcome(OutboxStatus.DEAD, fields, result, message)
    if nothing_tried:
        # Nothing was tried (every breaker open, or a rate limit): not an attempt of this
        # message, so it neither uses up a step of the schedule nor waits one out.
        fields["attempts"] = max(row.attempts - 1, 0)
        delay = retry_after if retry_after is not None else config.retry_schedule[0]
    else:
        step = config.retry_schedule[min(max(row.attempts, 1), len(config.retry_schedule)) - 1]
        delay = max(step, retry_after or 0.0)
    # At least a second, so a worker draining with --once never spins on one message;
    # and one last try at the deadline itself rather than giving up before it.
    delay = max(delay, MIN_DELAY)
    next_attempt = now + timedelta(seconds=delay)
    fields["next_attempt_at"] = min(next_attempt, deadline) if now < deadline else next_attempt
    return Outcome(OutboxStatus.QUEUED, fields, result, message)


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
    # Through outages too: a message sent but not recorded is sent again after its lease.
    record_through_outages(held, [(row, outcome)], clock=clock)
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
    from robust_mail.dispatch import Dispatcher

    config = delivery_config()
    held = claim(
        limit=1,
        lease=config.outbox.lease,
        using=using,
        now=clock(),
        pk=pk,
        give_up=give_up_any(config),
    )
    if not held.rows:
        return None
    row = held.rows[0]
    config = row_config(row, config)
    process(
        row, held, dispatcher=dispatcher or Dispatcher(config), config=config.outbox, clock=clock
    )
    return OutboxMessage.objects.using(held.using).filter(pk=pk).first()
