"""Admin registrations; one module per model family."""

from __future__ import annotations

from robust_mail import admin_otp, admin_outbox  # noqa: F401  (they register on import)
