"""Read-only admin for one-time passwords: who, what for, when, how many tries, from where.

Neither the code (never stored) nor its hash is shown. Importing this module registers
the admin on ``admin.site`` (``robust_mail.admin`` imports it); ``register(site)`` puts it
on a project's own admin site as well.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from robust_mail.models.otp import OneTimePassword

__all__ = ["OneTimePasswordAdmin", "register"]


class OneTimePasswordAdmin(admin.ModelAdmin):
    list_display = (
        "identifier",
        "purpose",
        "created_at",
        "expires_at",
        "attempts",
        "consumed_at",
        "invalidated",
        "pending",
        "ip_address",
    )
    list_filter = ("purpose", "invalidated", "pending")
    search_fields = ("identifier", "ip_address")
    date_hierarchy = "created_at"
    # code_hash is deliberately absent from every list here.
    fields = (
        "identifier",
        "purpose",
        "created_at",
        "expires_at",
        "attempts",
        "consumed_at",
        "invalidated",
        "pending",
        "ip_address",
        "user_agent",
    )
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Rows also count toward the issue limits: deleting them would reset those.
        # robust_mail_purge removes what is no longer needed.
        return False


def register(site: admin.AdminSite | None = None) -> None:
    """Register :class:`OneTimePasswordAdmin` on ``site`` (default: admin.site) once."""
    site = site or admin.site
    if not site.is_registered(OneTimePassword):
        site.register(OneTimePassword, OneTimePasswordAdmin)


register()
