"""Enqueueing into the outbox, transactions, and exclusive claims with leases."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import django
import pytest
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.db import transaction
from django.utils import timezone

from robust_mail import tasks
from robust_mail.exceptions import InvalidMessage
from robust_mail.models import OutboxMessage
from robust_mail.outbox import claim, enqueue, release
from robust_mail.signals import message_queued
from robust_mail.worker import Worker
from tests.conftest import needs_mailers, provider

pytestmark = pytest.mark.django_db


def rich_message() -> EmailMultiAlternatives:
    message = EmailMultiAlternatives(
        "Bestätigung Ihrer Bestellung №42",
        "Vielen Dank für Ihre Bestellung!\n",
        "Shop Ünïcode <shop@example.com>",
        ["Zoë Çelik <zoe@example.com>"],
        cc=["cc@example.com"],
        bcc=["audit@example.com"],
        headers={"X-Order": "42"},
    )
    message.attach_alternative("<p>Vielen Dank für Ihre <b>Bestellung</b>!</p>", "text/html")
    message.attach("rechnung.pdf", b"%PDF-1.4\x00\xff binary", "application/pdf")
    message.attach("notiz.txt", "Grüße\n", "text/plain")
    return message


def generated(message: EmailMessage) -> bytes:
    random.seed(99)  # the MIME boundary is the only random part
    return bytes(message.message().as_bytes())


def immediate_tasks() -> dict[str, Any]:
    assert tasks.task_framework is not None
    backend = f"{tasks.task_framework.__name__}.backends.immediate.ImmediateBackend"
    return {"default": {"BACKEND": backend}}


# --- enqueue -----------------------------------------------------------------------------


def test_enqueue_stores_the_message_that_the_caller_built_byte_for_byte() -> None:
    message = rich_message()
    row = enqueue(message)
    assert row.message_id == message.extra_headers["Message-ID"]
    assert "Date" in message.extra_headers
    stored = OutboxMessage.objects.get(pk=row.pk)
    assert stored.status == "queued" and stored.attempts == 0
    assert stored.recipients == "Zoë Çelik <zoe@example.com>, cc@example.com, audit@example.com"
    assert generated(stored.rebuild()) == generated(message)


def test_enqueue_refuses_a_message_without_recipients_and_stores_nothing() -> None:
    with pytest.raises(InvalidMessage, match="no recipients"):
        enqueue(EmailMessage("s", "b", "f@example.com", []))
    assert not OutboxMessage.objects.exists()


def test_enqueue_refuses_an_unserialisable_attachment_and_stores_nothing() -> None:
    message = EmailMessage("s", "b", "f@example.com", ["t@example.com"])
    message.attachments.append(("x.bin", object(), "application/octet-stream"))
    with pytest.raises(InvalidMessage, match="cannot be stored in the outbox"):
        enqueue(message)
    assert not OutboxMessage.objects.exists()


def maybe_lazy(text: str) -> object:
    """Lazy where Django itself can build the part: 6.1 refuses a lazy alternative or
    attachment content (KeyError in the email content manager), 5.2 takes them."""
    from django.utils.translation import gettext_lazy

    return gettext_lazy(text) if django.VERSION < (6, 1) else text


def test_lazy_translations_are_queued_by_the_fallback_and_in_the_background(
    smtp_server, robust, settings
) -> None:
    # Django's own backends send gettext_lazy strings; the outbox must not refuse them.
    from django.core.mail import send_mail
    from django.utils.translation import gettext_lazy

    from robust_mail import EmailService

    down = smtp_server("refuse")
    robust([provider(down, "down")], FALLBACK="outbox", RETRY={"ATTEMPTS": 1})

    assert send_mail(gettext_lazy("Welcome"), gettext_lazy("Body"), None, ["t@example.com"]) == 1
    assert EmailService.send_email(
        gettext_lazy("Welcome"),
        gettext_lazy("Body"),
        ["t@example.com"],
        html_message=maybe_lazy("<p>Body</p>"),
        background=True,
    )
    settings.EMAIL_BACKEND = "robust_mail.backends.OutboxEmailBackend"
    message = EmailMessage("Welcome", gettext_lazy("Body"), None, ["t@example.com"])
    message.attach(gettext_lazy("invoice.txt"), maybe_lazy("Total: 3"), "text/plain")
    assert message.send() == 1

    rows = list(OutboxMessage.objects.order_by("pk"))
    assert [row.rebuild().body for row in rows] == ["Body", "Body", "Body"]
    assert rows[2].rebuild().attachments[0][:2] == ("invoice.txt", "Total: 3")


@pytest.mark.parametrize("field", ["subject", "header", "filename"])
def test_enqueue_refuses_a_nul_in_a_header_as_invalid_not_as_a_database_outage(field) -> None:
    # PostgreSQL refuses NUL in text: left to the INSERT it would be OutboxUnavailable, a
    # "database outage" retried forever, for a message RFC 5322 forbids anyway.
    message = EmailMessage("s", "b", "f@example.com", ["t@example.com"])
    if field == "subject":
        message.subject = "Order\x00 #1"
    elif field == "header":
        message.extra_headers["X-Ref"] = "a\x00b"
    else:
        message.attach("a\x00.txt", "x", "text/plain")
    with pytest.raises(InvalidMessage, match="NUL character"):
        enqueue(message)
    assert not OutboxMessage.objects.exists()


def test_the_outbox_fallback_warns_when_its_row_is_in_the_caller_s_transaction(
    smtp_server, robust, caplog
) -> None:
    # The send counts as done, yet a rollback of the caller's transaction loses the row.
    from django.core.mail import send_mail

    down = smtp_server("refuse")
    robust([provider(down, "down")], FALLBACK="outbox", RETRY={"ATTEMPTS": 1})
    warning = "inside a transaction: it is lost if that transaction is rolled back"

    assert send_mail("Outside", "b", None, ["t@example.com"]) == 1
    assert warning not in caplog.text  # the test's own atomic block is not the caller's
    with transaction.atomic():
        assert send_mail("Inside", "b", None, ["t@example.com"]) == 1
    (record,) = [r for r in caplog.records if warning in r.getMessage()]
    assert record.levelname == "WARNING"
    assert OutboxMessage.objects.latest("pk").message_id in record.getMessage()


def test_same_idempotency_key_is_queued_only_once() -> None:
    # Inside the test's transaction: the duplicate is refused under a savepoint.
    first = enqueue(EmailMessage("a", "b", "f@example.com", ["t@example.com"]), idempotency_key="k")
    again = enqueue(EmailMessage("a", "b", "f@example.com", ["t@example.com"]), idempotency_key="k")
    assert again.pk == first.pk
    assert OutboxMessage.objects.count() == 1


def test_values_longer_than_their_columns_are_refused_before_the_database() -> None:
    # SQLite would store them and PostgreSQL refuse them with "value too long" (not the
    # database being down): the same clear error on every database instead.
    long_id = "<" + "x" * 300 + "@example.com>"
    message = EmailMessage(
        "a", "b", "f@example.com", ["t@example.com"], headers={"Message-ID": long_id}
    )
    with pytest.raises(
        InvalidMessage, match="Message-ID is 314 characters long; the outbox keeps at most 255"
    ):
        enqueue(message)
    with pytest.raises(ValueError, match="idempotency_key is 256 characters long; at most 255"):
        enqueue(
            EmailMessage("a", "b", "f@example.com", ["t@example.com"]), idempotency_key="k" * 256
        )
    assert not OutboxMessage.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_same_idempotency_key_is_queued_only_once_in_autocommit() -> None:
    first = enqueue(EmailMessage("a", "b", "f@example.com", ["t@example.com"]), idempotency_key="k")
    again = enqueue(EmailMessage("a", "b", "f@example.com", ["t@example.com"]), idempotency_key="k")
    assert again.pk == first.pk
    assert OutboxMessage.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_manual_transaction_management_is_refused_before_anything_is_written() -> None:
    # Django's on_commit(), which schedules the delivery, is not allowed with autocommit
    # off outside an atomic block: say so before the INSERT, not after it.
    from django.db.transaction import TransactionManagementError

    transaction.set_autocommit(False)
    try:
        with pytest.raises(TransactionManagementError, match="Nothing was queued"):
            enqueue(EmailMessage("a", "b", "f@example.com", ["t@example.com"]))
        assert not OutboxMessage.objects.exists()
    finally:
        transaction.rollback()
        transaction.set_autocommit(True)


@pytest.mark.django_db(transaction=True)
def test_in_autocommit_a_message_is_queued_with_one_statement() -> None:
    # A request that queues a message outside any transaction pays one statement: no
    # BEGIN and COMMIT around it (each a round trip to a database server).
    from django.db import connection

    assert connection.vendor == "sqlite"
    connection.ensure_connection()
    statements: list[str] = []
    connection.connection.set_trace_callback(statements.append)
    try:
        enqueue(EmailMessage("a", "b", "f@example.com", ["t@example.com"]))
    finally:
        connection.connection.set_trace_callback(None)
    assert [s.split()[0].upper() for s in statements] == ["INSERT"], statements
    assert OutboxMessage.objects.count() == 1


def test_not_before_and_priority_are_stored() -> None:
    later = timezone.now() + timedelta(hours=1)
    row = enqueue(
        EmailMessage("s", "b", "f@example.com", ["t@example.com"]), priority=5, not_before=later
    )
    assert row.priority == 5 and row.next_attempt_at == later


def test_a_naive_not_before_is_read_in_the_default_time_zone(settings: Any) -> None:
    settings.TIME_ZONE = "Europe/Paris"
    naive = timezone.make_naive(timezone.now() + timedelta(days=4))

    row = enqueue(EmailMessage("s", "b", "f@example.com", ["t@example.com"]), not_before=naive)

    row.refresh_from_db()
    assert row.next_attempt_at == timezone.make_aware(naive)
    assert row.queued_since == timezone.make_aware(naive)


def test_an_aware_not_before_without_use_tz_is_the_local_time(settings: Any) -> None:
    settings.USE_TZ = False
    settings.TIME_ZONE = "UTC"
    aware = datetime.now(UTC) + timedelta(days=4)

    row = enqueue(EmailMessage("s", "b", "f@example.com", ["t@example.com"]), not_before=aware)

    row.refresh_from_db()
    assert row.next_attempt_at == aware.replace(tzinfo=None)


def test_message_queued_is_sent_only_when_the_transaction_commits(
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    seen: list[int] = []

    def receiver(sender: object, outbox_id: int, **kwargs: object) -> None:
        seen.append(outbox_id)

    message_queued.connect(receiver)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            row = enqueue(EmailMessage("s", "b", "f@example.com", ["t@example.com"]))
            assert seen == []
        assert seen == [row.pk]
    finally:
        message_queued.disconnect(receiver)


# --- transactions, end to end --------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_message_queued_in_a_rolled_back_transaction_is_never_sent(
    smtp_server: Any, robust: Any, settings: Any
) -> None:
    server = smtp_server()
    robust([provider(server, "only")])
    settings.TASKS = immediate_tasks()

    class Abort(Exception):
        pass

    with pytest.raises(Abort), transaction.atomic():
        enqueue(EmailMessage("s", "b", "f@example.com", ["t@example.com"]))
        raise Abort

    assert not OutboxMessage.objects.exists()
    Worker(once=True, report=lambda line: None).run()
    assert server.messages == []


@pytest.mark.django_db(transaction=True)
def test_committed_message_is_delivered_by_the_task_after_the_commit(
    smtp_server: Any, robust: Any, settings: Any
) -> None:
    server = smtp_server()
    robust([provider(server, "only")])
    settings.TASKS = immediate_tasks()

    with transaction.atomic():
        row = enqueue(rich_message())
        assert server.messages == []  # nothing leaves before the commit

    received = server.wait_for(1)
    assert [m.message_id for m in received] == [row.message_id]
    stored = OutboxMessage.objects.get(pk=row.pk)
    assert stored.status == "sent" and stored.provider == "only" and stored.attempts == 1


@pytest.mark.django_db(transaction=True)
def test_without_tasks_configured_the_message_waits_for_the_worker(
    smtp_server: Any, robust: Any
) -> None:
    server = smtp_server()
    robust([provider(server, "only")])
    row = enqueue(EmailMessage("s", "b", "f@example.com", ["t@example.com"]))
    assert OutboxMessage.objects.get(pk=row.pk).status == "queued"
    assert server.messages == []

    stats = Worker(once=True, report=lambda line: None).run()

    assert stats.sent == 1
    assert [m.message_id for m in server.messages] == [row.message_id]


# --- claims ------------------------------------------------------------------------------


def queue(count: int, **kwargs: Any) -> list[OutboxMessage]:
    return [
        enqueue(EmailMessage(f"m{i}", "b", "f@example.com", ["t@example.com"]), **kwargs)
        for i in range(count)
    ]


def test_a_claimed_message_cannot_be_claimed_again_while_its_lease_lasts() -> None:
    queue(3)
    now = timezone.now()
    first = claim(limit=10, lease=60, now=now)
    second = claim(limit=10, lease=60, now=now + timedelta(seconds=59))
    assert len(first.rows) == 3
    assert second.rows == []
    assert {r.status for r in first.rows} == {"sending"}
    assert {r.attempts for r in first.rows} == {1}


def test_an_expired_lease_is_claimed_again_and_flagged_ambiguous() -> None:
    from robust_mail.outbox_delivery import Outcome, record

    (row,) = queue(1)
    now = timezone.now()
    crashed = claim(limit=1, lease=60, now=now)
    taken_over = claim(limit=1, lease=60, now=now + timedelta(seconds=61))

    assert [r.pk for r in taken_over.rows] == [row.pk]
    again = taken_over.rows[0]
    assert again.attempts == 2 and again.ambiguous
    assert "lease expired" in again.last_error
    # The first worker, back from the dead, can no longer write its outcome.
    assert not record(crashed.rows[0], crashed, Outcome(OutboxMessage.Status.SENT, {}))
    assert record(again, taken_over, Outcome(OutboxMessage.Status.SENT, {}))
    assert OutboxMessage.objects.get(pk=row.pk).status == "sent"


def test_an_abandoned_message_that_had_its_time_is_dead_not_taken_over_again() -> None:
    # A message that kills every worker sending it (out of memory, say) would otherwise be
    # taken over after every lease, forever: past MAX_AGE, or once claimed as many times as
    # the retry schedule tries a message, it is dead instead.
    from robust_mail.outbox import GiveUp

    worn_out, too_old, recent = queue(3)
    worn_out.sensitive = True
    worn_out.save()
    now = timezone.now()
    claim(limit=3, lease=60, now=now)  # the worker that dies
    OutboxMessage.objects.filter(pk=worn_out.pk).update(attempts=17)
    OutboxMessage.objects.filter(pk=too_old.pk).update(created_at=now - timedelta(days=4))
    later = now + timedelta(seconds=61)

    held = claim(limit=3, lease=60, now=later, give_up=GiveUp(max_age=3 * 86400, attempts=17))

    assert [r.pk for r in held.rows] == [recent.pk]
    rows = {r.pk: r for r in OutboxMessage.objects.all()}
    for pk in (worn_out.pk, too_old.pk):
        assert (rows[pk].status, rows[pk].ambiguous, rows[pk].lease_token) == ("dead", True, "")
        assert "abandoned by its worker" in rows[pk].last_error
        assert rows[pk].mime is None
    assert rows[worn_out.pk].payload["redacted"] is True  # sensitive: bodies erased
    assert "redacted" not in rows[too_old.pk].payload


def test_an_abandoned_message_scheduled_beyond_max_age_is_taken_over_not_buried() -> None:
    # MAX_AGE counts from the first attempt a message is due for (not_before), also when
    # its worker died at that attempt.
    from robust_mail.outbox import GiveUp

    due = timezone.now() + timedelta(days=4)
    (row,) = queue(1, not_before=due)
    claim(limit=1, lease=60, now=due)  # the worker that dies

    held = claim(
        limit=1,
        lease=60,
        now=due + timedelta(seconds=61),
        give_up=GiveUp(max_age=3 * 86400, attempts=17),
    )

    assert [(r.pk, r.status, r.ambiguous) for r in held.rows] == [(row.pk, "sending", True)]


def test_give_up_follows_the_retry_schedule() -> None:
    from robust_mail.conf import OutboxConfig
    from robust_mail.outbox_delivery import give_up

    # 0, 1 min, 6 min, 36 min, 2 h 36, 8 h 36, then every 6 h, the last at 3 days.
    assert give_up(OutboxConfig()).attempts == 17
    # 0, 10 s, 20 s, and the last at MAX_AGE.
    assert give_up(OutboxConfig(retry_schedule=(10.0,), max_age=25.0)).attempts == 4
    assert give_up(OutboxConfig(retry_schedule=(60.0, 300.0), max_age=30.0)).attempts == 2


def test_claims_respect_the_limit_priority_and_due_time() -> None:
    low = queue(2)
    high = queue(1, priority=9)
    later = queue(1, not_before=timezone.now() + timedelta(minutes=5))
    held = claim(limit=2, lease=60)
    assert [r.pk for r in held.rows] == [high[0].pk, low[0].pk]
    rest = claim(limit=10, lease=60)
    assert [r.pk for r in rest.rows] == [low[1].pk]
    assert later[0].pk not in {r.pk for r in held.rows + rest.rows}


def test_released_messages_are_queued_again_without_counting_an_attempt() -> None:
    queue(2)
    held = claim(limit=2, lease=60)
    assert release(held, held.rows) == 2
    rows = list(OutboxMessage.objects.all())
    assert {(r.status, r.attempts, r.lease_token) for r in rows} == {("queued", 0, "")}
    assert len(claim(limit=10, lease=60).rows) == 2


def test_claim_of_one_message_by_primary_key() -> None:
    first, second = queue(2)
    held = claim(limit=1, lease=60, pk=second.pk)
    assert [r.pk for r in held.rows] == [second.pk]
    assert OutboxMessage.objects.get(pk=first.pk).status == "queued"


@needs_mailers
def test_an_abandoned_message_is_given_up_by_its_own_mailer_s_rules(settings: Any) -> None:
    # A "bulk" alias keeping messages 7 days: its message abandoned on day 4 is taken over,
    # not dead by the default alias's 3 days.
    from robust_mail.outbox_delivery import delivery_config, give_up_any

    settings.MAILERS = {
        "default": {
            "BACKEND": "robust_mail.backends.RobustEmailBackend",
            "OPTIONS": {"providers": ["smtp://127.0.0.1:1?name=a"]},
        },
        "bulk": {
            "BACKEND": "robust_mail.backends.OutboxEmailBackend",
            "OPTIONS": {
                "providers": ["smtp://127.0.0.1:2?name=b"],
                "outbox": {"max_age": 7 * 86400},
            },
        },
    }
    (row,) = queue(1, mailer="bulk")
    now = timezone.now()
    claim(limit=1, lease=60, now=now)
    OutboxMessage.objects.filter(pk=row.pk).update(created_at=now - timedelta(days=4))

    held = claim(
        limit=1, lease=60, now=now + timedelta(seconds=61), give_up=give_up_any(delivery_config())
    )

    assert [r.pk for r in held.rows] == [row.pk]
