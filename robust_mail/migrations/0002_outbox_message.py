from __future__ import annotations

import django.utils.timezone
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("robust_mail", "0001_one_time_password"),
    ]

    operations = [
        migrations.CreateModel(
            name="OutboxMessage",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("message_id", models.CharField(db_index=True, max_length=255)),
                ("payload", models.JSONField()),
                ("subject", models.TextField(blank=True, default="")),
                ("from_email", models.TextField(blank=True, default="")),
                ("recipients", models.TextField(blank=True, default="")),
                (
                    "status",
                    models.CharField(
                        choices=[
                            ("queued", "queued"),
                            ("sending", "sending"),
                            ("sent", "sent"),
                            ("failed", "failed"),
                            ("dead", "dead"),
                        ],
                        default="queued",
                        max_length=16,
                    ),
                ),
                (
                    "priority",
                    models.SmallIntegerField(default=0, help_text="Higher is claimed first."),
                ),
                (
                    "attempts",
                    models.PositiveIntegerField(
                        default=0, help_text="Times a worker claimed this message to deliver it."
                    ),
                ),
                ("next_attempt_at", models.DateTimeField(default=django.utils.timezone.now)),
                ("lease_until", models.DateTimeField(blank=True, null=True)),
                (
                    "lease_token",
                    models.CharField(blank=True, default="", editable=False, max_length=32),
                ),
                ("last_error", models.TextField(blank=True, default="")),
                ("last_classification", models.CharField(blank=True, default="", max_length=32)),
                ("provider", models.CharField(blank=True, default="", max_length=100)),
                ("refused", models.JSONField(blank=True, default=dict)),
                ("ambiguous", models.BooleanField(default=False)),
                (
                    "created_at",
                    models.DateTimeField(db_index=True, default=django.utils.timezone.now),
                ),
                ("sent_at", models.DateTimeField(blank=True, null=True)),
                (
                    "idempotency_key",
                    models.CharField(blank=True, max_length=255, null=True, unique=True),
                ),
            ],
            options={
                "verbose_name": "outbox message",
                "verbose_name_plural": "outbox messages",
                "ordering": ("-created_at", "-pk"),
                "indexes": [
                    models.Index(
                        fields=["status", "next_attempt_at"], name="robust_mail_outbox_due"
                    ),
                    models.Index(fields=["status", "lease_until"], name="robust_mail_outbox_lease"),
                ],
            },
        ),
    ]
