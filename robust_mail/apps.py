from __future__ import annotations

from django.apps import AppConfig


class RobustMailConfig(AppConfig):
    name = "robust_mail"
    verbose_name = "Robust mail"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Importing the modules registers their system checks.
        from robust_mail import checks, otp_checks, outbox_checks  # noqa: F401
