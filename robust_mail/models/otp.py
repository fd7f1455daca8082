"""The one-time password row: a keyed hash of a code, never the code itself."""

from __future__ import annotations

from typing import Any

from django.db import models

#: The ``purpose`` of decoy rows. No real code has it: purposes are non-empty slugs.
DECOY_PURPOSE = ""


class CodeManager(models.Manager["OneTimePassword"]):
    """Every row but the decoys: what the store, the limits and the admin see."""

    def get_queryset(self) -> models.QuerySet[Any]:
        return super().get_queryset().exclude(purpose=DECOY_PURPOSE)


class OneTimePassword(models.Model):
    """One code issued to one identifier for one purpose.

    ``code_hash`` is HMAC-SHA256 over (purpose, identifier, code) keyed with a secret that
    is not in the database (``ROBUST_MAIL["OTP"]["SECRET"]`` or a key derived from
    ``SECRET_KEY``), so a dump of this table does not reveal codes: a 6-digit code's bare
    SHA-256 is reversed in milliseconds, an HMAC without the key is not.

    A row is *live* while ``consumed_at`` is null, ``invalidated`` and ``pending`` are
    false and ``expires_at`` is in the future. ``attempts`` and ``consumed_at`` only ever change
    through conditional UPDATEs (see :class:`robust_mail.otp_store.DatabaseOTPStore`).

    *Decoy* rows (``purpose == ""``, empty identifier and hash, born used, invalidated
    and expired) are the database write that requests for addresses without an account
    make in place of queueing an email, so both take the same time
    (:func:`robust_mail.otp_store.write_decoy`). They can never verify, count toward no
    limit, are hidden by the default manager ``objects`` (so from the admin too) and
    are deleted by ``robust_mail_purge`` whatever their age. ``_base_manager`` sees them.
    """

    identifier = models.CharField(max_length=254)
    purpose = models.CharField(max_length=64)
    code_hash = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    attempts = models.PositiveIntegerField(default=0)
    consumed_at = models.DateTimeField(null=True, blank=True)
    invalidated = models.BooleanField(default=False)
    #: Stored, its email not yet handed to the mail system: not verifiable yet (and, if
    #: the send fails, removed). ``invalidate()`` voids pending codes too.
    # db_default too: during a rolling deploy, processes still on the previous version
    # insert rows without this column.
    pending = models.BooleanField(default=False, db_default=False)
    ip_address = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=255, blank=True, default="")

    objects = CodeManager()

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
