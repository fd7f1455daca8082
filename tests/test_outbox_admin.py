"""The outbox in the admin: list, filters, search, decoded preview, retry now, cancel."""

from __future__ import annotations

import re
from email.mime.text import MIMEText
from typing import Any

import pytest
from django.contrib.messages import get_messages
from django.core.mail import EmailMultiAlternatives
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from robust_mail.models import OutboxMessage
from robust_mail.outbox import enqueue

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:robust_mail_outboxmessage_changelist"
ALL_STATES = ("queued", "sending", "sent", "failed", "dead")


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


def test_retry_now_of_a_message_scheduled_for_later_counts_max_age_from_now(
    admin_client: Client,
) -> None:
    from datetime import timedelta

    from django.core.mail import EmailMessage
    from django.utils import timezone

    from robust_mail.outbox import enqueue

    due = timezone.now() + timedelta(days=4)
    row = enqueue(EmailMessage("s", "b", "f@example.com", ["t@example.com"]), not_before=due)
    assert row.queued_since == due  # MAX_AGE from its first scheduled attempt

    admin_client.post(reverse(CHANGELIST), {"action": "retry_now", "_selected_action": [row.pk]})

    row.refresh_from_db()
    assert row.status == "queued" and row.next_attempt_at < due
    assert row.queued_since == row.next_attempt_at  # due now: MAX_AGE from now


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


def test_changelist_does_not_load_message_bodies_or_attachments(admin_client: Client) -> None:
    for n in range(3):
        queued(f"Invoice {n}", f"c{n}@example.com")
    table = OutboxMessage._meta.db_table
    bulky = [OutboxMessage._meta.get_field(name).column for name in ("payload", "mime")]

    with CaptureQueriesContext(connection) as ctx:
        page = admin_client.get(reverse(CHANGELIST)).content.decode()

    assert "Invoice 2" in page
    rows = [q["sql"] for q in ctx.captured_queries if f'"{table}"."subject"' in q["sql"]]
    assert rows  # the query that reads the page's rows
    assert not [sql for sql in rows for column in bulky if f'"{table}"."{column}"' in sql]


def test_change_page_still_reads_the_payload_for_its_preview(admin_client: Client) -> None:
    row = queued("Invoice", "c@example.com")
    url = reverse("admin:robust_mail_outboxmessage_change", args=[row.pk])
    assert "Plain body ✓" in admin_client.get(url).content.decode()


# -- deleting -------------------------------------------------------------------------------


def test_delete_selected_deletes_finished_messages_and_keeps_waiting_and_sending_ones(
    admin_client: Client,
) -> None:
    rows = {s: queued(s, f"{s}@example.com", status=s) for s in ALL_STATES}
    everything = [row.pk for row in rows.values()]
    url = reverse(CHANGELIST)

    confirm = admin_client.post(
        url, {"action": "delete_selected", "_selected_action": everything}
    ).content.decode()
    # The confirmation page offers only the finished ones, and says why the others stay.
    assert "2 message(s) not deleted: they are queued or being sent" in confirm
    offered = {int(pk) for pk in re.findall(r'name="_selected_action" value="(\d+)"', confirm)}
    assert offered == {rows[s].pk for s in ("sent", "failed", "dead")}

    # Even a confirmation that names them all (forged, or sent after a "Retry now").
    done = admin_client.post(
        url, {"action": "delete_selected", "_selected_action": everything, "post": "yes"}
    )
    assert done.status_code == 302
    assert set(OutboxMessage.objects.values_list("status", flat=True)) == {"queued", "sending"}
    notices = [str(m) for m in get_messages(done.wsgi_request)]
    assert any("Successfully deleted 3" in n for n in notices)
    assert any("2 message(s) not deleted" in n for n in notices)


def test_delete_selected_of_only_waiting_messages_deletes_nothing_and_says_why(
    admin_client: Client,
) -> None:
    row = queued("a", "a@example.com")
    response = admin_client.post(
        reverse(CHANGELIST),
        {"action": "delete_selected", "_selected_action": [row.pk], "post": "yes"},
        follow=True,
    )
    assert OutboxMessage.objects.filter(pk=row.pk).exists()
    assert "1 message(s) not deleted" in response.content.decode()


def test_delete_queryset_keeps_a_message_requeued_after_the_confirmation() -> None:
    from django.contrib.admin import site

    finished = queued("a", "a@example.com", status="sent")
    requeued = queued("b", "b@example.com", status="queued")
    site._registry[OutboxMessage].delete_queryset(None, OutboxMessage.objects.all())
    assert list(OutboxMessage.objects.values_list("pk", flat=True)) == [requeued.pk]
    assert not OutboxMessage.objects.filter(pk=finished.pk).exists()


def _change_and_delete(row: OutboxMessage) -> tuple[str, str]:
    """The admin URLs of a message's own page and of its delete page."""
    return (
        reverse("admin:robust_mail_outboxmessage_change", args=[row.pk]),
        reverse("admin:robust_mail_outboxmessage_delete", args=[row.pk]),
    )


@pytest.mark.parametrize("status", ["queued", "sending"])
def test_a_waiting_or_sending_message_cannot_be_deleted_on_its_own_page(
    admin_client: Client, status: str
) -> None:
    row = queued("a", "a@example.com", status=status)
    change, delete = _change_and_delete(row)

    assert delete not in admin_client.get(change).content.decode()  # no Delete button
    response = admin_client.post(delete, {"post": "yes"}, follow=True)

    assert OutboxMessage.objects.filter(pk=row.pk).exists()
    assert response.redirect_chain == [(change, 302)]
    assert "was not deleted: only sent, failed and dead messages" in response.content.decode()


@pytest.mark.parametrize("status", ["sent", "failed", "dead"])
def test_a_finished_message_can_be_deleted_on_its_own_page(
    admin_client: Client, status: str
) -> None:
    row = queued("a", "a@example.com", status=status)
    change, delete = _change_and_delete(row)

    assert delete in admin_client.get(change).content.decode()
    assert admin_client.post(delete, {"post": "yes"}).status_code == 302
    assert not OutboxMessage.objects.filter(pk=row.pk).exists()


# -- preview of odd parts -------------------------------------------------------------------


@pytest.mark.parametrize("charset", ["x-no-such-charset", "zlib", "idna"])
def test_preview_of_a_text_part_in_a_charset_python_cannot_decode(
    admin_client: Client, charset: str
) -> None:
    message = EmailMultiAlternatives("s", "body", "f@example.com", ["a@example.com"])
    part = MIMEText("héllo <script>alert(1)</script>", "plain", "utf-8")
    part.replace_header("Content-Type", f'text/plain; charset="{charset}"')
    message.attach(part)
    row = enqueue(message)

    url = reverse("admin:robust_mail_outboxmessage_change", args=[row.pk])
    response = admin_client.get(url)

    assert response.status_code == 200
    page = response.content.decode()
    assert "héllo &lt;script&gt;alert(1)&lt;/script&gt;" in page  # as UTF-8, escaped
    assert "<script>alert(1)" not in page
    assert f"charset &#x27;{charset}&#x27; cannot be decoded: shown as UTF-8" in page


def test_a_message_page_is_a_view_without_save_buttons(admin_client: Client) -> None:
    row = queued("a", "a@example.com", status="failed")
    change = reverse("admin:robust_mail_outboxmessage_change", args=[row.pk])

    page = admin_client.get(change).content.decode()

    assert "View outbox message" in page
    assert 'name="_save"' not in page and 'name="_continue"' not in page
    assert admin_client.post(change, {"status": "queued"}).status_code == 403
    row.refresh_from_db()
    assert row.status == "failed"
