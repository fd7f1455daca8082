"""The durable outbox: one row per message waiting for, or done with, delivery."""

from __future__ import annotations

from typing import Any

from django.db import models
from django.utils import timezone


class OutboxStatus(models.TextChoices):
    #: Waiting for ``next_attempt_at``; any worker may claim it then.
    QUEUED = "queued", "queued"
    #: Claimed by a worker until ``lease_until``; after that any worker may claim it again.
    SENDING = "sending", "sending"
    #: A provider accepted it (for some recipients at least: see ``refused``).
    SENT = "sent", "sent"
    #: Refused as it is (message-fatal), cancelled, or not rebuildable: never retried.
    FAILED = "failed", "failed"
    #: Still not delivered after ``MAX_AGE``: given up.
    DEAD = "dead", "dead"


class OutboxMessage(models.Model):
    """One message in the outbox.

    ``payload`` is the whole message as JSON (see :mod:`robust_mail.serialization`),
    never a pickle, with the Message-ID and Date pinned, so every attempt sends the
    same message. ``subject``, ``from_email`` and ``recipients`` are copies made for
    the admin's list and search.

    Claims go through :mod:`robust_mail.outbox`: a worker sets ``status=sending``,
    ``lease_until`` and its own ``lease_token`` in one conditional UPDATE, and writes
    the outcome only while that token is still on the row, so a worker whose lease
    ran out can never overwrite the work of the worker that took over.
    """

    Status = OutboxStatus

    message_id = models.CharField(max_length=255, db_index=True)
    payload = models.JSONField()
    #: The message as enqueue rendered it (RFC 5322 bytes), sent as it is while the row is
    #: waiting, so workers do not render it again; erased once the row is final (the
    #: payload keeps the message). Never shown: a sensitive message's secret is in it.
    mime = models.BinaryField(null=True, blank=True, editable=False)
    subject = models.TextField(blank=True, default="")
    from_email = models.TextField(blank=True, default="")
    #: To, Cc and Bcc, comma separated.
    recipients = models.TextField(blank=True, default="")

    status = models.CharField(
        max_length=16, choices=OutboxStatus.choices, default=OutboxStatus.QUEUED
    )
    priority = models.SmallIntegerField(default=0, help_text="Higher is claimed first.")
    attempts = models.PositiveIntegerField(
        default=0, help_text="Times a worker claimed this message to deliver it."
    )
    next_attempt_at = models.DateTimeField(default=timezone.now)
    lease_until = models.DateTimeField(null=True, blank=True)
    lease_token = models.CharField(max_length=32, blank=True, default="", editable=False)

    last_error = models.TextField(blank=True, default="")
    last_classification = models.CharField(max_length=32, blank=True, default="")
    provider = models.CharField(max_length=100, blank=True, default="")
    #: Recipients the accepting provider refused: address → [code, reply].
    refused = models.JSONField(default=dict, blank=True)
    #: True when some attempt may have reached a provider without our seeing the reply
    #: (a timeout after DATA, or a worker that died holding the message): a duplicate,
    #: with the same Message-ID, is then possible.
    ambiguous = models.BooleanField(default=False)
    #: The bodies hold a secret (a one-time code, a reset link): they are withheld from the
    #: admin and erased from the row once it is sent, failed or dead.
    sensitive = models.BooleanField(default=False)

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    #: Where MAX_AGE counts from when not ``created_at``: when "Retry now" sent it back to
    #: the queue after it had failed or died (so the retry gets the whole schedule, not a
    #: single try), or, for a message queued with a future ``not_before``, that first
    #: scheduled attempt (so a schedule beyond MAX_AGE does not kill it at its first failure).
    retried_at = models.DateTimeField(null=True, blank=True, editable=False)
    sent_at = models.DateTimeField(null=True, blank=True)
    idempotency_key = models.CharField(max_length=255, unique=True, null=True, blank=True)
    #: The Django 6.1 MAILERS alias that queued it (its OPTIONS are the configuration it
    #: is delivered with); empty: the classic configuration (``ROBUST_MAIL``).
    # db_default too: during a rolling deploy, processes still on the previous version
    # insert rows without this column.
    mailer = models.CharField(max_length=100, blank=True, default="", db_default="")

    class Meta:
        app_label = "robust_mail"
        verbose_name = "outbox message"
        verbose_name_plural = "outbox messages"
        ordering = ("-created_at", "-pk")
        indexes = [
            models.Index(fields=["status", "next_attempt_at"], name="robust_mail_outbox_due"),
            models.Index(fields=["status", "lease_until"], name="robust_mail_outbox_lease"),
        ]

    def __str__(self) -> str:
        return f"{self.message_id} ({self.status})"

    @property
    def queued_since(self) -> Any:
        """Where its MAX_AGE counts from: queued, first due (``not_before``), or last
        retried by hand."""
        return self.retried_at or self.created_at

    def rebuild(self) -> Any:
        """The stored message as a Django ``EmailMessage`` (raises ``InvalidMessage``)."""
        from robust_mail.serialization import message_from_data

        return message_from_data(self.payload)
