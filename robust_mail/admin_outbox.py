"""Admin for the outbox: list, filter, search, a decoded preview, "retry now" and "cancel".

Importing this module registers :class:`OutboxMessageAdmin` with the default admin site.
Rows are read-only here: the message itself is never edited, only its state. Only finished
rows (sent, failed, dead) can be deleted: deleting a queued row would drop its mail without
a trace, and a row being sent is a worker's.
"""

from __future__ import annotations

import email
import email.policy
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.actions import delete_selected as django_delete_selected
from django.contrib.admin.utils import quote, unquote
from django.contrib.admin.views.main import ChangeList
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from robust_mail.envelope import build_envelope
from robust_mail.exceptions import InvalidMessage
from robust_mail.models.outbox import OutboxMessage, OutboxStatus
from robust_mail.serialization import redacted

#: States an admin may send back to the queue. Never "sent" (that would send a duplicate)
#: nor "sending" (a worker holds it).
RETRYABLE = (OutboxStatus.QUEUED, OutboxStatus.FAILED, OutboxStatus.DEAD)
CANCELLED = "cancelled"
#: States an admin may delete: the row's delivery is over, nothing is lost with it.
DELETABLE = (OutboxStatus.SENT, OutboxStatus.FAILED, OutboxStatus.DEAD)
#: Columns the changelist never shows and must not load: the whole message, attachments
#: included (a page of 100 rows with 2 MB attachments would read ~540 MB).
BULKY = ("payload", "mime")


class OutboxChangeList(ChangeList):
    def get_queryset(
        self, request: HttpRequest, exclude_parameters: list[str | None] | None = None
    ) -> QuerySet[OutboxMessage]:
        # Here only, not in ModelAdmin.get_queryset: the change page needs the payload.
        return super().get_queryset(request, exclude_parameters).defer(*BULKY)


@admin.register(OutboxMessage)
class OutboxMessageAdmin(admin.ModelAdmin):  # not ModelAdmin[...]: Django has no __class_getitem__
    list_display = (
        "created_at",
        "status",
        "subject",
        "recipients",
        "attempts",
        "next_attempt_at",
        "provider",
        "last_classification",
    )
    list_filter = ("status", "provider", "last_classification", "ambiguous")
    search_fields = ("recipients", "subject", "message_id", "=idempotency_key")
    date_hierarchy = "created_at"
    ordering = ("-created_at", "-pk")
    actions = ("retry_now", "cancel", "delete_selected")
    fieldsets = (
        (None, {"fields": ("message_id", "status", "subject", "from_email", "recipients")}),
        (
            "Delivery",
            {
                "fields": (
                    "priority",
                    "attempts",
                    "next_attempt_at",
                    "lease_until",
                    "provider",
                    "sent_at",
                    "refused",
                    "ambiguous",
                    "last_classification",
                    "last_error",
                    "created_at",
                    "idempotency_key",
                )
            },
        ),
        ("Message", {"fields": ("preview",)}),
    )

    def get_readonly_fields(
        self, request: HttpRequest, obj: OutboxMessage | None = None
    ) -> list[str]:
        return [f.name for f in OutboxMessage._meta.fields] + ["preview", "preview_headers"]

    def get_fieldsets(self, request: HttpRequest, obj: OutboxMessage | None = None) -> Any:
        # Bodies only for staff who may act on the outbox: a message not marked sensitive
        # may still carry a secret (Django's own password-reset email holds a reset link),
        # and view-only staff must not be able to read it and sign in as its recipient.
        if super().has_change_permission(request):
            return self.fieldsets
        return (*self.fieldsets[:-1], ("Message", {"fields": ("preview_headers",)}))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # A row's own page is a view: nothing on it can be edited, so no Save buttons (the
        # change permission still governs the list's actions, asked without a row).
        if obj is not None:
            return False
        return super().has_change_permission(request, obj)

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return OutboxChangeList

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        if obj is not None and obj.status not in DELETABLE:
            return False
        return super().has_delete_permission(request, obj)

    def delete_view(
        self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        # Django would answer a bare 403 (the change page shows no Delete button for such a
        # row, but the URL can still be followed): say why, on the row's own page.
        obj = self.get_object(request, unquote(object_id))
        if (
            obj is not None
            and obj.status not in DELETABLE
            and super().has_delete_permission(request, obj)
        ):
            self.message_user(request, _not_deletable(obj), messages.ERROR)
            change = f"admin:{self.opts.app_label}_{self.opts.model_name}_change"
            url = reverse(change, args=[quote(obj.pk)], current_app=self.admin_site.name)
            return HttpResponseRedirect(url)
        return super().delete_view(request, object_id, extra_context)

    def delete_model(self, request: HttpRequest, obj: OutboxMessage) -> None:
        # Conditional, as in delete_queryset: "Retry now" may have requeued it meanwhile.
        OutboxMessage.objects.using(obj._state.db).filter(pk=obj.pk, status__in=DELETABLE).delete()

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[OutboxMessage]) -> None:
        # Filtered again at the DELETE itself: a row requeued or claimed since the
        # confirmation page stays.
        queryset.filter(status__in=DELETABLE).delete()

    @admin.action(
        description="Delete selected outbox messages (sent, failed or dead)",
        permissions=["delete"],
    )
    def delete_selected(
        self, request: HttpRequest, queryset: QuerySet[OutboxMessage]
    ) -> HttpResponse | None:
        """Django's own action, on the finished rows only; the others are kept, and said so."""
        kept = queryset.exclude(status__in=DELETABLE).count()
        if kept:
            self.message_user(
                request,
                f"{kept} message(s) not deleted: they are queued or being sent. Only sent, "
                "failed and dead messages can be deleted; cancel a queued message first.",
                messages.WARNING,
            )
        finished = queryset.filter(status__in=DELETABLE)
        if not finished.exists():
            return None
        return django_delete_selected(self, request, finished)

    @admin.display(description="decoded message")
    def preview(self, obj: OutboxMessage) -> str:
        """Headers and the text parts of the stored message, as it will be sent."""
        if obj.sensitive:
            # A one-time code or reset link: staff who can read the outbox must not be able
            # to sign in as the recipient.
            return format_html(
                "<div><strong>Subject:</strong> {}</div><div><strong>To:</strong> {}</div>"
                "<p><em>Body withheld: this message carries a secret (e.g. a one-time code)."
                "</em></p>",
                obj.subject,
                obj.recipients,
            )
        try:
            message = obj.rebuild()
            data = build_envelope(message).data
        except InvalidMessage as exc:
            return format_html("<p><strong>Cannot rebuild this message:</strong> {}</p>", exc)
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        headers = format_html_join(
            "\n", "<div><strong>{}:</strong> {}</div>", ((k, str(v)) for k, v in parsed.items())
        )
        parts = format_html_join("\n", "{}", ((_render_part(p),) for p in parsed.walk()))
        return format_html("{}\n{}", headers, parts)

    @admin.display(description="decoded message")
    def preview_headers(self, obj: OutboxMessage) -> str:
        """The preview for view-only staff: who and what, never the bodies."""
        return format_html(
            "<div><strong>Subject:</strong> {}</div><div><strong>To:</strong> {}</div>"
            "<p><em>Bodies are shown to staff who may change outbox messages.</em></p>",
            obj.subject,
            obj.recipients,
        )

    @admin.action(
        description="Retry now (failed, dead or waiting messages)", permissions=["change"]
    )
    def retry_now(self, request: HttpRequest, queryset: QuerySet[OutboxMessage]) -> None:
        # A sensitive message that ended has had its bodies erased: nothing left to send.
        retryable = queryset.filter(status__in=RETRYABLE).exclude(
            sensitive=True, status__in=(OutboxStatus.FAILED, OutboxStatus.DEAD)
        )
        now = timezone.now()
        # A waiting message scheduled for later (not_before) is due now: MAX_AGE counts from
        # now, not from the time it was scheduled for.
        retryable.filter(status=OutboxStatus.QUEUED, retried_at__gt=now).update(retried_at=now)
        count = retryable.filter(status=OutboxStatus.QUEUED).update(next_attempt_at=now)
        # A failed or dead message starts over: the whole schedule, MAX_AGE from now.
        count += retryable.filter(status__in=(OutboxStatus.FAILED, OutboxStatus.DEAD)).update(
            status=OutboxStatus.QUEUED,
            next_attempt_at=now,
            lease_until=None,
            lease_token="",
            retried_at=now,
            attempts=0,
        )
        self.message_user(request, f"{count} message(s) queued for delivery now.", messages.SUCCESS)

    @admin.action(description="Cancel (waiting messages)", permissions=["change"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[OutboxMessage]) -> None:
        who = getattr(request.user, "get_username", lambda: "?")()
        waiting = list(queryset.filter(status=OutboxStatus.QUEUED).values_list("pk", flat=True))
        count = OutboxMessage.objects.filter(pk__in=waiting, status=OutboxStatus.QUEUED).update(
            status=OutboxStatus.FAILED,
            last_classification=CANCELLED,
            last_error=f"cancelled in the admin by {who}",
            mime=None,  # final now: like a delivered row, only the payload stays
        )
        # As when a sensitive row ends any other way: its secret goes with it.
        cancelled = OutboxMessage.objects.filter(
            pk__in=waiting, sensitive=True, last_classification=CANCELLED
        )
        for row in cancelled.only("pk", "payload"):
            OutboxMessage.objects.filter(pk=row.pk).update(payload=redacted(row.payload))
        self.message_user(request, f"{count} message(s) cancelled.", messages.SUCCESS)


def _not_deletable(obj: OutboxMessage) -> str:
    how = (
        "cancel it first"
        if obj.status == OutboxStatus.QUEUED
        else "wait until the worker has sent it or given up"
    )
    return f"{obj} was not deleted: only sent, failed and dead messages can be deleted; {how}."


def _render_part(part: Any) -> str:
    if part.is_multipart():
        return format_html("<div><em>{}</em></div>", part.get_content_type())
    ctype = part.get_content_type()
    filename = part.get_filename()
    if filename or not ctype.startswith("text/"):
        size = len(part.get_payload(decode=True) or b"")
        return format_html(
            "<div>attachment <strong>{}</strong> ({}, {} bytes)</div>",
            filename or "(unnamed)",
            ctype,
            size,
        )
    note = ""
    try:
        text = str(part.get_content())
    except (LookupError, ValueError):
        # A charset Python does not know (or not a text encoding, or one that cannot decode
        # with replacement): a preview must not fail the page over it.
        text = (part.get_payload(decode=True) or b"").decode("utf-8", errors="replace")
        note = f" (charset {part.get_content_charset()!r} cannot be decoded: shown as UTF-8)"
    return format_html(
        '<div><em>{}{}</em><pre style="white-space: pre-wrap">{}</pre></div>',
        ctype,
        note,
        text,
    )
