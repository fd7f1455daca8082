"""What a worker does with a claimed message: sent, failed, retried on schedule, dead.

Real SMTP servers on 127.0.0.1; time is an injected clock, never a sleep.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from django.core.mail import EmailMessage
from django.utils import timezone

from robust_mail.models import OutboxMessage
from robust_mail.outbox import enqueue
from robust_mail.signals import message_failed
from robust_mail.worker import Worker
from tests.conftest import provider

pytestmark = pytest.mark.django_db

MINUTE, HOUR = 60.0, 3600.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def at(self, row: OutboxMessage, seconds: float) -> Clock:
        self.now = row.created_at + timedelta(seconds=seconds)
        return self


def message(subject: str = "Hello", to: tuple[str, ...] = ("to@example.com",)) -> EmailMessage:
    return EmailMessage(subject, "Body", "from@example.com", list(to))


def drain(clock: Clock) -> Any:
    return Worker(once=True, clock=clock, report=lambda line: None).run()


def reload(row: OutboxMessage) -> OutboxMessage:
    return OutboxMessage.objects.get(pk=row.pk)


def test_accepted_message_is_marked_sent_with_its_provider(smtp_server: Any, robust: Any) -> None:
    down, up = smtp_server("refuse"), smtp_server()
    robust([provider(down, "primary"), provider(up, "backup")])
    row = enqueue(message())

    stats = drain(Clock(row.created_at))

    row = reload(row)
    assert stats.sent == 1
    assert (row.status, row.provider, row.attempts) == ("sent", "backup", 1)
    assert row.sent_at is not None and row.lease_token == "" and row.lease_until is None
    assert [m.message_id for m in up.messages] == [row.message_id]


def test_refused_recipients_of_a_partial_delivery_are_recorded(
    smtp_server: Any, robust: Any
) -> None:
    server = smtp_server(refuse_recipients=["gone@example.com"])
    robust([provider(server, "only")])
    row = enqueue(message(to=("ok@example.com", "gone@example.com")))

    drain(Clock(row.created_at))

    row = reload(row)
    assert row.status == "sent"
    assert list(row.refused) == ["gone@example.com"]
    assert row.refused["gone@example.com"][0] == 550
    assert "gone@example.com" in row.last_error
    assert server.messages[0].rcpt_tos == ["ok@example.com"]


def test_message_fatal_refusal_fails_at_once_and_signals(smtp_server: Any, robust: Any) -> None:
    server = smtp_server("rcpt_550")
    robust([provider(server, "only")])
    row = enqueue(message())
    failures: list[Any] = []

    def on_failed(sender: object, **kwargs: Any) -> None:
        failures.append(kwargs["message"].extra_headers["Message-ID"])

    message_failed.connect(on_failed)
    try:
        stats = drain(Clock(row.created_at))
    finally:
        message_failed.disconnect(on_failed)

    row = reload(row)
    assert stats.failed == 1
    assert (row.status, row.last_classification, row.attempts) == ("failed", "message_fatal", 1)
    assert "550" in row.last_error
    assert failures == [row.message_id]


def test_transient_failures_follow_the_retry_schedule(smtp_server: Any, robust: Any) -> None:
    server = smtp_server("refuse")
    robust([provider(server, "only")], CIRCUIT_BREAKER={"FAILURE_THRESHOLD": 100})
    row = enqueue(message())
    clock = Clock(row.created_at)
    elapsed = 0.0
    waits = []
    for _ in range(7):
        drain(clock.at(row, elapsed))
        row = reload(row)
        assert row.status == "queued" and row.last_classification == "transient"
        wait = (row.next_attempt_at - clock.now).total_seconds()
        waits.append(wait)
        elapsed += wait
    assert waits == [MINUTE, 5 * MINUTE, 30 * MINUTE, 2 * HOUR, 6 * HOUR, 6 * HOUR, 6 * HOUR]
    assert row.attempts == 7


def test_not_yet_due_message_is_left_alone(smtp_server: Any, robust: Any) -> None:
    server = smtp_server("refuse")
    robust([provider(server, "only")])
    row = enqueue(message())
    clock = Clock(row.created_at)
    drain(clock)
    drain(clock.at(row, 59))
    assert reload(row).attempts == 1


def test_message_still_undelivered_after_max_age_is_dead_with_the_reason(
    smtp_server: Any, robust: Any
) -> None:
    server = smtp_server("refuse")
    robust(
        [provider(server, "only")],
        OUTBOX={"RETRY_SCHEDULE": [1800], "MAX_AGE": 3000},
        CIRCUIT_BREAKER={"FAILURE_THRESHOLD": 100},
    )
    row = enqueue(message())
    clock = Clock(row.created_at)
    drain(clock.at(row, 1800))
    # The next wait would pass MAX_AGE: one last try at the deadline itself.
    assert reload(row).next_attempt_at == row.created_at + timedelta(seconds=3000)
    failures: list[Any] = []

    def on_failed(sender: Any, **kw: Any) -> None:
        failures.append(kw["result"])

    message_failed.connect(on_failed)
    try:
        stats = drain(clock.at(row, 3000))
    finally:
        message_failed.disconnect(on_failed)  # this receiver only: others may be connected

    row = reload(row)
    assert stats.dead == 1
    assert row.status == "dead"
    assert "MAX_AGE" in row.last_error and "connect" in row.last_error
    assert len(failures) == 1


def test_a_message_scheduled_beyond_max_age_gets_its_whole_max_age_from_then(
    smtp_server: Any, robust: Any
) -> None:
    # not_before 4 days ahead, MAX_AGE 3 days (the default): counted from the enqueue, the
    # message was dead at its very first transient failure.
    robust([provider(smtp_server("refuse"), "only")])
    start = timezone.now()
    due = start + timedelta(days=4)
    row = enqueue(message(), not_before=due)
    clock = Clock(due + timedelta(seconds=1))

    stats = drain(clock)

    after = reload(row)
    assert stats.retried == 1 and stats.dead == 0
    assert (after.status, after.attempts) == ("queued", 1)
    assert after.next_attempt_at == due + timedelta(seconds=1 + MINUTE)  # the first step
    clock.now = due + timedelta(days=3)  # MAX_AGE after the first due attempt: no more
    assert drain(clock).dead == 1
    assert "MAX_AGE" in reload(row).last_error


def test_open_breaker_defers_without_dropping_or_counting_an_attempt(
    smtp_server: Any, robust: Any
) -> None:
    server = smtp_server("refuse")
    robust(
        [provider(server, "only")],
        CIRCUIT_BREAKER={"FAILURE_THRESHOLD": 1, "RESET_TIMEOUT": 600},
    )
    first, second = enqueue(message("one")), enqueue(message("two"))
    clock = Clock(second.created_at)

    drain(clock)  # the first failure opens the breaker; the second message is not tried

    first, second = reload(first), reload(second)
    assert first.status == second.status == "queued"
    assert first.attempts == 1 and second.attempts == 0
    wait = (second.next_attempt_at - clock.now).total_seconds()
    assert 0 < wait <= 600  # when the breaker half-opens, not a schedule step
    assert "circuit open" in second.last_error


def test_rate_limit_defers_the_message_until_the_window_allows_it(
    smtp_server: Any, robust: Any
) -> None:
    server = smtp_server()
    robust([provider(server, "only")], RATE_LIMITS={"GLOBAL": "1/h"})
    first, second = enqueue(message("one")), enqueue(message("two"))

    stats = drain(Clock(second.created_at))

    assert stats.sent == 1 and stats.retried == 1
    waiting = [r for r in (reload(first), reload(second)) if r.status == "queued"]
    assert len(waiting) == 1 and waiting[0].attempts == 0
    assert "rate" in waiting[0].last_error
    assert len(server.messages) == 1


def test_a_rate_limited_message_past_max_age_waits_for_a_real_attempt(
    smtp_server: Any, robust: Any
) -> None:
    # A backlog larger than GLOBAL allows within MAX_AGE went dead without any provider
    # seeing it: rate limits defer, they never drop (docs/rate-limits.md).
    server = smtp_server()
    robust(
        [provider(server, "only")],
        RATE_LIMITS={"GLOBAL": "1/h"},
        OUTBOX={"MAX_AGE": 600, "RETRY_SCHEDULE": [60]},
    )
    first, second = enqueue(message("one")), enqueue(message("two"))
    clock = Clock(second.created_at)
    drain(clock)
    clock.now = second.created_at + timedelta(seconds=601)  # past MAX_AGE, same window

    stats = drain(clock)

    waiting = [r for r in (reload(first), reload(second)) if r.status != "sent"]
    assert stats.dead == 0 and stats.retried == 1
    assert [(r.status, r.attempts) for r in waiting] == [("queued", 0)]
    assert waiting[0].next_attempt_at > clock.now  # not due again at once: no busy loop
    assert len(server.messages) == 1


def test_poison_message_fails_and_never_stalls_the_queue(smtp_server: Any, robust: Any) -> None:
    server = smtp_server()
    robust([provider(server, "only")])
    poison = OutboxMessage.objects.create(message_id="<poison@x>", payload={"version": 99})
    good = enqueue(message())

    stats = drain(Clock(good.created_at))  # created after the poison row: both are due

    poison, good = reload(poison), reload(good)
    assert stats.failed == 1 and stats.sent == 1
    assert poison.status == "failed" and "cannot rebuild" in poison.last_error
    assert good.status == "sent"
    assert [m.message_id for m in server.messages] == [good.message_id]


def test_ambiguous_delivery_is_recorded_and_retried_with_the_same_message_id(
    smtp_server: Any, robust: Any
) -> None:
    server = smtp_server("disconnect_after_data")
    robust([provider(server, "only")], CIRCUIT_BREAKER={"FAILURE_THRESHOLD": 100})
    row = enqueue(message())
    clock = Clock(row.created_at)

    drain(clock)
    row = reload(row)
    assert row.status == "queued" and row.ambiguous
    assert row.last_classification == "ambiguous"

    server.mode = "accept"
    drain(clock.at(row, MINUTE))
    row = reload(row)
    assert row.status == "sent" and row.ambiguous
    assert row.last_classification == "ambiguous"
    assert {m.message_id for m in server.messages} == {row.message_id}


def test_outcomes_recorded_together_are_each_fenced_by_the_lease(
    smtp_server: Any, robust: Any
) -> None:
    from robust_mail.outbox import claim
    from robust_mail.outbox_delivery import attempt, record_many

    robust([provider(smtp_server(), "local")])
    rows = [enqueue(message(f"m{i}")) for i in range(3)]
    clock = Clock(rows[0].created_at + timedelta(seconds=1))
    held = claim(limit=3, lease=60, now=clock())
    config = Worker(once=True, clock=clock).config
    outcomes = [
        (row, attempt(row, dispatcher=Worker(once=True).dispatcher, config=config.outbox))
        for row in held.rows
    ]
    # Another worker took the middle row over (its lease token replaced ours).
    OutboxMessage.objects.filter(pk=held.rows[1].pk).update(lease_token="someone-else")

    written = record_many(held, outcomes)

    assert written == [True, False, True]
    statuses = dict(OutboxMessage.objects.values_list("pk", "status"))
    assert [statuses[r.pk] for r in held.rows] == ["sent", "sending", "sent"]


@pytest.mark.django_db(transaction=True)
def test_threaded_worker_records_every_outcome_of_a_mixed_batch(
    smtp_server: Any, robust: Any
) -> None:
    server = smtp_server("rcpt_550", refuse_recipients=["bad@example.com"])
    robust([provider(server, "local")])
    good = [enqueue(message(f"ok {i}")) for i in range(12)]
    bad = [enqueue(message(f"bad {i}", to=("bad@example.com",))) for i in range(3)]
    clock = Clock(good[0].created_at + timedelta(seconds=1))

    stats = Worker(concurrency=4, once=True, clock=clock, report=lambda line: None).run()

    assert (stats.sent, stats.failed, stats.lost) == (12, 3, 0)
    assert {reload(r).status for r in good} == {"sent"}
    assert {reload(r).status for r in bad} == {"failed"}
    assert OutboxMessage.objects.filter(status="sending").count() == 0
    assert sorted(m.message_id for m in server.messages) == sorted(r.message_id for r in good)


def on_the_wire(built: bytes) -> bytes:
    # The transport ends DATA on a line end (Django 6's SMTP policy already ends with one).
    return built if built.endswith(b"\r\n") else built + b"\r\n"


def test_the_worker_sends_the_bytes_enqueue_built_and_then_erases_them(
    smtp_server: Any, robust: Any
) -> None:
    server = smtp_server()
    robust([provider(server, "local")])
    row = enqueue(message("Grüße", to=("to@example.com",)))
    built = bytes(reload(row).mime)
    assert (
        built.startswith(b"Content-Type: ") and b"Message-ID: " + row.message_id.encode() in built
    )

    drain(Clock(row.created_at))

    (received,) = server.messages
    assert received.data == on_the_wire(built)
    assert (reload(row).status, reload(row).mime) == ("sent", None)


def test_a_row_without_stored_bytes_is_built_again_from_its_payload(
    smtp_server: Any, robust: Any
) -> None:
    # Rows queued before the bytes were kept (or given back by "retry now" once final).
    server = smtp_server()
    robust([provider(server, "local")])
    row = enqueue(message("Hello"))
    built = bytes(reload(row).mime)
    OutboxMessage.objects.filter(pk=row.pk).update(mime=None)

    drain(Clock(row.created_at))

    (received,) = server.messages
    assert received.data == on_the_wire(built)
    assert reload(row).status == "sent"


def test_a_row_refused_even_bare_costs_the_rows_after_it_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What makes a database refuse even the bare outcome cannot be produced on purpose:
    # the refusal is injected where the row's values are made.
    from django.utils import timezone

    from robust_mail import outbox_record
    from robust_mail.outbox import claim

    for i in range(3):
        enqueue(EmailMessage(f"m{i}", "Body", "from@example.com", ["to@example.com"]))
    held = claim(limit=3, lease=60)
    refused = held.rows[1].pk
    values = outbox_record._values

    def refuse_one(row: Any, outcome: Any) -> Any:
        if row.pk == refused:
            raise TypeError("a value this database cannot take")
        return values(row, outcome)

    monkeypatch.setattr(outbox_record, "_values", refuse_one)
    outcomes = [
        (row, outbox_record.Outcome("sent", {"sent_at": timezone.now()})) for row in held.rows
    ]

    written = outbox_record.record_through_outages(held, outcomes)

    assert written == [True, False, True]
    statuses = dict(OutboxMessage.objects.values_list("pk", "status"))
    assert [statuses[row.pk] for row in held.rows] == ["sent", "sending", "sent"]
