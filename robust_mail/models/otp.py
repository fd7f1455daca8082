"""The one-time password row: a keyed hash of a code, never the code itself."""

from __future__ import annotations

from django.db import models


class OneTimePassword(models.Model):
    """One code issued to one identifier for one purpose.

    ``code_hash`` is HMAC-SHA256 over (purpose, identifier, code) keyed with a secret that
    is not in the database (``ROBUST_MAIL["OTP"]["SECRET"]`` or a key derived from
    ``SECRET_KEY``), so a dump of this table does not reveal codes: a 6-digit code's bare
    SHA-256 is reversed in milliseconds, an HMAC without the key is not.

    A row is *live* while ``consumed_at`` is null, ``invalidated`` is false and
    ``expires_at`` is in the future. ``attempts`` and ``consumed_at`` only ever change
    through conditional UPDATEs (see :class:`robust_mail.otp_store.DatabaseOTPStore`).
    """

    identifier = models.CharField(max_length=254)
    purpose = models.CharField(max_length=64)
    code_hash = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    attempts = models.PositiveIntegerField(default=0)
    consumed_at = models.DateTimeField(null=True, blank=True)
    invalidated = models.BooleanField(default=False)
    ip_address = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=255, blank=True, default="")

    class Meta:
        app_label = "robust_mail"
        verbose_name = "one-time password"
        verbose_name_plural = "one-time passwords"
        ordering = ("-created_at", "-pk")
        indexes = [
            # The live code for an identifier and purpose; cooldown and hourly/daily counts.
            models.Index(
                fields=["identifier", "purpose", "created_at"], name="robust_mail_otp_lookup"
            ),
            # The per-IP issue limit.
            models.Index(fields=["ip_address", "created_at"], name="robust_mail_otp_ip"),
            # purge_expired().
            models.Index(fields=["expires_at"], name="robust_mail_otp_expires"),
        ]

    def __str__(self) -> str:
        # Never the hash: the admin and logs show this.
        return f"{self.purpose} code for {self.identifier}"

    def __repr__(self) -> str:
        return f"<OneTimePassword pk={self.pk} purpose={self.purpose!r}>"
