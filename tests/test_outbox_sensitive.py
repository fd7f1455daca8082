"""Messages that carry a secret (a one-time code) do not keep it in the outbox."""

from __future__ import annotations

from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from robust_mail import EmailService
from robust_mail.models import OutboxMessage
from tests.conftest import provider

pytestmark = pytest.mark.django_db

SECRET = "Your code is 424242"


@pytest.fixture(autouse=True)
def _default_admin(settings: Any) -> None:
    settings.ROOT_URLCONF = "tests.urls"
    # Background sends are queued only through robust_mail's backend: the test runner's
    # locmem one would take them at once.
    settings.EMAIL_BACKEND = "robust_mail.backends.RobustEmailBackend"


def _queue(sensitive: bool) -> OutboxMessage:
    assert EmailService.send_email(
        "Sign-in code", SECRET, ["user@example.com"], background=True, sensitive=sensitive
    )
    return OutboxMessage.objects.latest("pk")


def test_sensitive_body_is_delivered_then_erased_from_the_outbox(smtp_server, robust):
    server = smtp_server()
    robust([provider(server, "only")])
    row = _queue(sensitive=True)
    assert row.sensitive

    call_command("robust_mail_worker", "--once", stdout=StringIO())

    row.refresh_from_db()
    assert row.status == "sent"
    assert SECRET in server.messages[0].message.get_content()
    assert SECRET not in str(row.payload)
    assert row.payload["redacted"] is True
    assert row.mime is None  # the bytes enqueue built, secret included, are gone too
    assert row.subject == "Sign-in code"  # what it was stays visible


def test_ordinary_messages_keep_their_body_after_delivery(smtp_server, robust):
    server = smtp_server()
    robust([provider(server, "only")])
    row = _queue(sensitive=False)

    call_command("robust_mail_worker", "--once", stdout=StringIO())

    row.refresh_from_db()
    assert row.status == "sent"
    assert SECRET in str(row.payload)


def test_admin_preview_withholds_the_body_of_a_waiting_sensitive_message(admin_client: Client):
    row = _queue(sensitive=True)

    page = admin_client.get(reverse("admin:robust_mail_outboxmessage_change", args=[row.pk]))

    text = page.content.decode()
    assert "Body withheld" in text
    assert "424242" not in text
    assert SECRET.encode() in bytes(OutboxMessage.objects.get(pk=row.pk).mime)  # kept, not shown


def test_a_failed_sensitive_message_cannot_be_retried_with_its_body_erased(admin_client: Client):
    from robust_mail.serialization import redacted

    row = _queue(sensitive=True)
    # As a final outcome leaves it: failed, its bodies erased.
    OutboxMessage.objects.filter(pk=row.pk).update(
        status="failed", payload=redacted(row.payload), mime=None
    )
    ordinary = _queue(sensitive=False)
    OutboxMessage.objects.filter(pk=ordinary.pk).update(status="failed")

    response = admin_client.post(
        reverse("admin:robust_mail_outboxmessage_changelist"),
        {"action": "retry_now", "_selected_action": [row.pk, ordinary.pk]},
    )

    assert response.status_code == 302
    row.refresh_from_db()
    ordinary.refresh_from_db()
    assert row.status == "failed"  # nothing left to send
    assert ordinary.status == "queued"  # the action itself did run


def test_outbox_actions_need_the_change_permission(django_user_model: Any):
    viewer = django_user_model.objects.create_user("viewer", password="pw-viewer-1", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_outboxmessage"))
    client = Client()
    client.force_login(viewer)
    row = _queue(sensitive=False)

    page = client.get(reverse("admin:robust_mail_outboxmessage_changelist")).content.decode()
    client.post(
        reverse("admin:robust_mail_outboxmessage_changelist"),
        {"action": "cancel", "_selected_action": [row.pk]},
    )

    assert "retry_now" not in page and 'value="cancel"' not in page
    row.refresh_from_db()
    assert row.status == "queued"


def test_cancelling_a_waiting_sensitive_message_erases_its_secret(admin_client: Client):
    row = _queue(sensitive=True)
    ordinary = OutboxMessage.objects.get(pk=_queue_another().pk)

    admin_client.post(
        reverse("admin:robust_mail_outboxmessage_changelist"),
        {"action": "cancel", "_selected_action": [row.pk, ordinary.pk]},
    )

    row.refresh_from_db()
    ordinary.refresh_from_db()
    assert (row.status, row.mime, row.payload["redacted"]) == ("failed", None, True)
    assert SECRET not in str(row.payload)
    # An ordinary cancelled message keeps its body (it can be retried), not the built bytes.
    assert (ordinary.status, ordinary.mime) == ("failed", None)
    assert "Nothing secret" in str(ordinary.payload)


def _queue_another() -> OutboxMessage:
    assert EmailService.send_email(
        "Newsletter", "Nothing secret", ["user@example.com"], background=True
    )
    return OutboxMessage.objects.latest("pk")


def test_view_only_staff_never_see_bodies_even_of_unmarked_messages(
    django_user_model: Any, admin_client: Client
):
    # Django's own password-reset email is not marked sensitive, yet holds a reset link.
    row = _queue(sensitive=False)
    change = reverse("admin:robust_mail_outboxmessage_change", args=[row.pk])
    viewer = django_user_model.objects.create_user("viewer", password="pw-viewer-1", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_outboxmessage"))
    client = Client()
    client.force_login(viewer)

    seen = client.get(change).content.decode()

    assert "Sign-in code" in seen and SECRET not in seen
    assert "Bodies are shown to staff who may change outbox messages" in seen
    assert SECRET in admin_client.get(change).content.decode()  # who may act, may read
