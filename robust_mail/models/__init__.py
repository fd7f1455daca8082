"""Models of robust_mail. One module per model family, re-exported here for Django."""

from __future__ import annotations

from robust_mail.models.otp import OneTimePassword
from robust_mail.models.outbox import OutboxMessage

__all__ = ["OneTimePassword", "OutboxMessage"]
