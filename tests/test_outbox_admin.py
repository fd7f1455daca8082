"""The outbox in the admin: list, filters, search, decoded preview, retry now, cancel."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.mail import EmailMultiAlternatives
from django.test import Client
from django.urls import reverse

from robust_mail.models import OutboxMessage
from robust_mail.outbox import enqueue

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:robust_mail_outboxmessage_changelist"


@pytest.fixture(autouse=True)
def _default_admin(settings: Any) -> None:
    # The default admin site, whatever URLconf an earlier test may have left behind.
    settings.ROOT_URLCONF = "tests.urls"


def queued(subject: str, to: str, **fields: Any) -> OutboxMessage:
    message = EmailMultiAlternatives(subject, "Plain body ✓", "shop@example.com", [to])
    message.attach_alternative("<p>HTML <b>body</b></p>", "text/html")
    message.attach("invoice.pdf", b"%PDF-1.4", "application/pdf")
    row = enqueue(message)
    if fields:
        OutboxMessage.objects.filter(pk=row.pk).update(**fields)
        row.refresh_from_db()
    return row


def test_changelist_filters_by_status_and_provider(admin_client: Client) -> None:
    queued("Welcome", "ann@example.com", status="sent", provider="primary")
    queued("Reset", "bob@example.com", status="dead", provider="")
    url = reverse(CHANGELIST)

    everything = admin_client.get(url).content.decode()
    assert "Welcome" in everything and "Reset" in everything
    sent = admin_client.get(url, {"status__exact": "sent"}).content.decode()
    assert "Welcome" in sent and "Reset" not in sent
    primary = admin_client.get(url, {"provider": "primary"}).content.decode()
    assert "Welcome" in primary and "Reset" not in primary


@pytest.mark.parametrize("term", ["bob@example", "Reset your", "message-id"])
def test_search_by_recipient_subject_and_message_id(admin_client: Client, term: str) -> None:
    queued("Welcome aboard", "ann@example.com")
    target = queued("Reset your password", "bob@example.com")
    if term == "message-id":
        term = target.message_id.strip("<>").split("@")[0]
    page = admin_client.get(reverse(CHANGELIST), {"q": term}).content.decode()
    assert "Reset your password" in page and "Welcome aboard" not in page


def test_change_page_shows_a_decoded_read_only_preview(admin_client: Client) -> None:
    row = queued("Grüße", "zoe@example.com")
    url = reverse("admin:robust_mail_outboxmessage_change", args=[row.pk])
    page = admin_client.get(url).content.decode()
    assert "Plain body ✓" in page
    assert "&lt;p&gt;HTML &lt;b&gt;body&lt;/b&gt;&lt;/p&gt;" in page  # escaped, not rendered
    assert "invoice.pdf" in page and "application/pdf" in page
    assert row.message_id.replace("<", "&lt;").replace(">", "&gt;") in page
    assert 'name="subject"' not in page  # nothing editable


def test_preview_of_a_poison_row_says_why_it_cannot_be_rebuilt(admin_client: Client) -> None:
    row = OutboxMessage.objects.create(message_id="<p@x>", payload={"version": 7})
    url = reverse("admin:robust_mail_outboxmessage_change", args=[row.pk])
    assert "Cannot rebuild this message" in admin_client.get(url).content.decode()


def test_retry_now_requeues_failed_and_dead_but_never_sent_messages(
    admin_client: Client,
) -> None:
    failed = queued("a", "a@example.com", status="failed")
    dead = queued("b", "b@example.com", status="dead")
    sent = queued("c", "c@example.com", status="sent")
    admin_client.post(
        reverse(CHANGELIST),
        {"action": "retry_now", "_selected_action": [failed.pk, dead.pk, sent.pk]},
    )
    statuses = dict(OutboxMessage.objects.values_list("pk", "status"))
    assert statuses == {failed.pk: "queued", dead.pk: "queued", sent.pk: "sent"}


def test_a_dead_message_retried_by_hand_gets_the_whole_schedule_again(
    admin_client: Client, smtp_server: Any, robust: Any
) -> None:
    # Dead after MAX_AGE; "Retry now" must not mean a single try that a greylisting 451
    # (or an open breaker) turns straight back into "dead".
    from datetime import timedelta

    from django.utils import timezone

    from robust_mail.worker import Worker
    from tests.conftest import provider

    robust([provider(smtp_server("refuse"), "down")])
    dead = queued("a", "a@example.com", status="dead", attempts=17)
    OutboxMessage.objects.filter(pk=dead.pk).update(created_at=timezone.now() - timedelta(days=4))

    admin_client.post(reverse(CHANGELIST), {"action": "retry_now", "_selected_action": [dead.pk]})
    dead.refresh_from_db()
    assert (dead.status, dead.attempts) == ("queued", 0)
    assert dead.retried_at is not None

    Worker(once=True, report=lambda line: None).run()  # the provider is down: transient

    dead.refresh_from_db()
    assert (dead.status, dead.attempts) == ("queued", 1)
    assert dead.next_attempt_at - dead.retried_at >= timedelta(seconds=59)  # first step


def test_cancel_fails_waiting_messages_and_says_who(admin_client: Client) -> None:
    waiting = queued("a", "a@example.com")
    sent = queued("b", "b@example.com", status="sent")
    admin_client.post(
        reverse(CHANGELIST), {"action": "cancel", "_selected_action": [waiting.pk, sent.pk]}
    )
    waiting.refresh_from_db()
    sent.refresh_from_db()
    assert waiting.status == "failed" and waiting.last_classification == "cancelled"
    assert waiting.last_error == "cancelled in the admin by admin"
    assert sent.status == "sent"
