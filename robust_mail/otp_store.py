"""Where one-time passwords live: the store interface and its two implementations.

The service (:mod:`robust_mail.otp`) owns the rules — hashing, expiry, attempts, reasons;
a store only keeps records and gives the atomic operations the rules need:

- ``add`` stores a new code *pending* after checking the issue limits, and refuses with
  :class:`~robust_mail.exceptions.RateLimited` without keeping anything when over one. A
  pending code counts toward the limits but no verification can find it: a code must not
  be guessable while its email is still being sent, nor take attempts that ``withdraw``
  would then wipe out with it;
- ``activate`` (its email has been handed to the mail system) makes it the live code and
  retires every other live code for the same identifier and purpose: of two codes whose
  emails crossed, the one sent last works. ``withdraw`` (its email failed) removes a
  pending code as if it had never been issued, so it counts toward no limit, and the
  code live before it stays live;
- ``count_attempt`` and ``consume`` are conditional and atomic: of any number of
  concurrent callers, at most ``max_attempts`` resp. exactly one succeed.

The per-address issue limit counts what :func:`~robust_mail.ratelimit.ip_bucket` gives: an
IPv4 address, or an IPv6 /64 — and that is also what a store keeps as ``ip_address``.

:func:`write_decoy` is the one write a request for an address without an account makes
in place of queueing an email (see :mod:`robust_mail.password_reset`).

:class:`DatabaseOTPStore` keeps :class:`~robust_mail.models.OneTimePassword` rows and counts
limits over sliding windows of rows. :class:`CacheOTPStore` keeps everything in a Django
cache (Redis) for projects that want codes out of the database; its limits are fixed-window
counters; it lives in :mod:`robust_mail.otp_cache_store` and is importable from here too.
Both pass ``tests/test_otp_store.py``'s contract tests.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from django.db import connections, models, router, transaction

from robust_mail.db import insert
from robust_mail.exceptions import RateLimited
from robust_mail.ratelimit import ip_bucket

__all__ = [
    "DatabaseOTPStore",
    "IssueLimits",
    "NewCode",
    "OTPStore",
    "StoredCode",
    "purge_decoys",
    "write_decoy",
]

HOUR = 3600
DAY = 86400


@dataclass(frozen=True)
class IssueLimits:
    """Issue limits; 0 switches one off. Cooldown is per identifier and purpose, the
    hourly and daily limits are per identifier (all purposes), the IP limit per address."""

    cooldown: float = 60
    per_hour: int = 5
    per_day: int = 10
    per_ip_per_hour: int = 20


@dataclass(frozen=True)
class NewCode:
    identifier: str
    purpose: str
    #: Out of the ``repr``, so out of error reports and error trackers' locals: with the
    #: key, it gives the code in at most one guess per possible code.
    code_hash: str = field(repr=False)
    created_at: datetime
    expires_at: datetime
    ip_address: str | None = None
    user_agent: str = ""


@dataclass(frozen=True)
class StoredCode:
    """A live (not consumed, not invalidated) code as a store returns it."""

    key: str
    identifier: str
    purpose: str
    code_hash: str = field(repr=False)  # as in NewCode
    created_at: datetime
    expires_at: datetime
    attempts: int


class OTPStore(Protocol):
    """The operations the OTP service needs. Keys are opaque strings.

    A store whose ``count_attempt`` no database rollback can undo may say so with a
    class attribute ``counts_outside_transactions = True``. Otherwise the service counts
    each attempt a second time in its cache, so that a request rolled back (a view that
    refuses a wrong code by raising, under ``ATOMIC_REQUESTS``) cannot take back its
    attempt.
    """

    def add(self, code: NewCode, limits: IssueLimits) -> str:
        """Store ``code`` pending; raise RateLimited (storing nothing) when over a limit.

        A pending code counts toward the limits; ``latest`` does not return it."""

    def withdraw(self, key: str) -> None:
        """Remove a pending code as if never issued: it no longer counts toward any limit."""

    def activate(self, key: str) -> None:
        """Make a pending code live and invalidate every other live code for the same
        identifier and purpose. Called once per code, by whoever added it; does nothing
        for a code withdrawn or gone."""

    def latest(self, identifier: str, purpose: str) -> StoredCode | None:
        """The newest live code: activated, neither consumed nor invalidated (it may have
        expired)."""

    def count_attempt(self, key: str, max_attempts: int) -> bool:
        """Atomically count one attempt if fewer than ``max_attempts`` were made.

        Counts on used codes too, so a verification that lost a race to ``consume`` is
        told "invalid" by ``consume``, not "locked" by this."""

    def consume(self, key: str, now: datetime) -> bool:
        """Atomically mark the code used; True for exactly one caller, and only while live."""

    def invalidate(self, identifier: str, purpose: str) -> int:
        """Invalidate every unused code for identifier and purpose, pending ones included
        (``activate`` then leaves them dead); how many."""

    def purge_expired(self, now: datetime) -> int:
        """Delete records no longer needed for codes or limits; how many."""


def _retry_after(times: list[datetime], limit: int, window: float, now: datetime) -> float:
    """Seconds until fewer than ``limit`` of ``times`` (ascending) fall in the window."""
    oldest_that_must_leave = times[len(times) - limit]
    return (oldest_that_must_leave + timedelta(seconds=window) - now).total_seconds()


class DatabaseOTPStore:
    """:class:`~robust_mail.models.OneTimePassword` rows in the database ``using``.

    Limits are checked *after* inserting, counting the new row: two concurrent requests
    then both see each other and both back off, so a limit is never exceeded (at worst
    both retry). Rows stay for a day after they expire so the daily limit keeps counting.

    A row is inserted ``pending`` — not live, hidden from ``latest`` — and ``activate``
    clears the flag unless ``invalidate`` voided it meanwhile. A process that dies
    between ``add`` and ``activate`` thus leaves a code that never verifies and still
    counts toward the limits, as its email may have gone out.
    """

    def __init__(self, using: str | None = None) -> None:
        self._using = using

    @property
    def using(self) -> str:
        """The database alias: ``using``, else where the routers write OneTimePassword.

        Reads go there too: limits and single use must see the latest writes.
        """
        from robust_mail.models import OneTimePassword

        return self._using or router.db_for_write(OneTimePassword)

    def _rows(self) -> models.QuerySet[Any]:
        from robust_mail.models import OneTimePassword

        return OneTimePassword.objects.using(self.using)

    def add(self, code: NewCode, limits: IssueLimits) -> str:
        code = replace(code, ip_address=ip_bucket(code.ip_address))
        with transaction.atomic(using=self.using):
            self._one_issue_at_a_time(code.identifier, limits)
            row = self._rows().create(
                identifier=code.identifier,
                purpose=code.purpose,
                code_hash=code.code_hash,
                created_at=code.created_at,
                expires_at=code.expires_at,
                ip_address=code.ip_address,
                user_agent=code.user_agent[:255],
                pending=True,
            )
        try:
            self._check_limits(row.pk, code, limits)
        except RateLimited:
            self._rows().filter(pk=row.pk).delete()
            raise
        return str(row.pk)

    def _one_issue_at_a_time(self, identifier: str, limits: IssueLimits) -> None:
        """On PostgreSQL, refuse to issue while another transaction issues for ``identifier``.

        Inside the caller's transaction (``ATOMIC_REQUESTS``), concurrent requests do not
        see each other's uncommitted rows, so each would pass the limits: 30 at once got 30
        codes. An advisory lock held to the end of the transaction stops that. Tried, not
        waited for: waiting would hold a web worker for the other request's whole send,
        and could deadlock with a verify's row lock in the same request. The refusal is the
        cooldown's (the other request's code, once sent, would trigger it anyway). SQLite
        needs none (one writer at a time, its snapshot taken after the wait); on MySQL the
        limits are only as strict as in autocommit.
        """
        connection = connections[self.using]
        if connection.vendor != "postgresql":
            return
        digest = hashlib.sha256(f"robust_mail.otp.issue:{identifier}".encode()).digest()
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_try_advisory_xact_lock(%s)",
                [int.from_bytes(digest[:8], "big", signed=True)],
            )
            (locked,) = cursor.fetchone()
        if not locked:
            raise RateLimited(
                "a code is being sent for this address", retry_after=max(limits.cooldown, 1.0)
            )

    def _times(self, own: int, since: datetime, **where: Any) -> list[datetime]:
        rows = self._rows().filter(created_at__gt=since, **where).exclude(pk=own)
        return sorted(rows.values_list("created_at", flat=True))

    def _check_limits(self, own: int, code: NewCode, limits: IssueLimits) -> None:
        now = code.created_at
        if limits.cooldown > 0:
            recent = self._times(
                own,
                now - timedelta(seconds=limits.cooldown),
                identifier=code.identifier,
                purpose=code.purpose,
            )
            if recent:
                raise RateLimited(
                    "a code was sent moments ago",
                    retry_after=_retry_after(recent, 1, limits.cooldown, now),
                )
        checks: list[tuple[int, float, dict[str, Any], str]] = [
            (limits.per_hour, HOUR, {"identifier": code.identifier}, "too many codes this hour"),
            (limits.per_day, DAY, {"identifier": code.identifier}, "too many codes today"),
        ]
        if code.ip_address:
            checks.append(
                (
                    limits.per_ip_per_hour,
                    HOUR,
                    {"ip_address": code.ip_address},
                    "too many codes from this address",
                )
            )
        for limit, window, where, text in checks:
            if limit > 0:
                times = self._times(own, now - timedelta(seconds=window), **where)
                if len(times) >= limit:
                    raise RateLimited(text, retry_after=_retry_after(times, limit, window, now))

    def withdraw(self, key: str) -> None:
        self._rows().filter(pk=int(key)).delete()

    def activate(self, key: str) -> None:
        pk = int(key)
        row = self._rows().filter(pk=pk).values("identifier", "purpose", "invalidated").first()
        if row is None:
            return
        if row["invalidated"]:
            # Voided while its email was on its way: it never becomes live, and it must not
            # retire a code issued since (the user asked again meanwhile).
            self._rows().filter(pk=pk).update(pending=False)
            return
        # One UPDATE, so there is never a moment with two live codes or none: this row
        # stops being pending (live, unless invalidate() voided it while its email was
        # being sent) and every other live one is retired.
        self._rows().filter(
            models.Q(pk=pk) | models.Q(invalidated=False, pending=False),
            identifier=row["identifier"],
            purpose=row["purpose"],
            consumed_at__isnull=True,
        ).update(
            pending=models.Case(
                models.When(pk=pk, then=models.Value(False)), default=models.F("pending")
            ),
            invalidated=models.Case(
                models.When(pk=pk, then=models.F("invalidated")), default=models.Value(True)
            ),
        )

    def _unused(self, identifier: str, purpose: str) -> models.QuerySet[Any]:
        """Neither consumed nor invalidated: live, or pending (its email on its way)."""
        return self._rows().filter(
            identifier=identifier, purpose=purpose, consumed_at__isnull=True, invalidated=False
        )

    def _live(self, identifier: str, purpose: str) -> models.QuerySet[Any]:
        return self._unused(identifier, purpose).filter(pending=False)

    def latest(self, identifier: str, purpose: str) -> StoredCode | None:
        row = self._live(identifier, purpose).order_by("-pk").first()
        if row is None:
            return None
        return StoredCode(
            key=str(row.pk),
            identifier=row.identifier,
            purpose=row.purpose,
            code_hash=row.code_hash,
            created_at=row.created_at,
            expires_at=row.expires_at,
            attempts=row.attempts,
        )

    def count_attempt(self, key: str, max_attempts: int) -> bool:
        # One UPDATE: the database serialises concurrent attempts, none is lost.
        updated = (
            self._rows()
            .filter(pk=int(key), attempts__lt=max_attempts)
            .update(attempts=models.F("attempts") + 1)
        )
        return updated == 1

    def consume(self, key: str, now: datetime) -> bool:
        # A conditional UPDATE, not read-then-write: exactly one concurrent caller gets 1.
        updated = (
            self._rows()
            .filter(
                pk=int(key),
                consumed_at__isnull=True,
                invalidated=False,
                pending=False,
                expires_at__gt=now,
            )
            .update(consumed_at=now)
        )
        return updated == 1

    def invalidate(self, identifier: str, purpose: str) -> int:
        # Pending ones too: a code whose email is on its way must not become usable after
        # a password change that was meant to void every code.
        return int(self._unused(identifier, purpose).update(invalidated=True))

    def purge_expired(self, now: datetime) -> int:
        # Keep a day past expiry (or use): the daily issue limit counts these rows.
        cutoff = now - timedelta(seconds=DAY)
        done = (
            models.Q(expires_at__lt=now)
            | models.Q(consumed_at__isnull=False)
            | models.Q(invalidated=True)
        )
        deleted, _ = self._rows().filter(done, created_at__lt=cutoff).delete()
        return int(deleted)


def write_decoy(now: datetime, *, using: str | None = None) -> None:
    """Insert one decoy row, in a transaction of its own (a savepoint inside another).

    It stands in for the outbox row that queueing an email inserts, so a request for an
    address without an account writes and commits as much as one with. The row can
    never verify or be found: empty purpose and identifier (no real code has either),
    an empty hash, already used, invalidated and expired, no IP address (so no limit
    counts it). The default manager hides it; :func:`purge_decoys` deletes it. Written
    whatever the configured store, to the database the routers choose for
    OneTimePassword.
    """
    from robust_mail.models.otp import DECOY_PURPOSE, OneTimePassword

    alias = using or router.db_for_write(OneTimePassword)
    decoy = OneTimePassword(
        identifier="",
        purpose=DECOY_PURPOSE,
        code_hash="",
        created_at=now,
        expires_at=now,
        consumed_at=now,
        invalidated=True,
        ip_address=None,
    )
    from robust_mail.models.outbox import OutboxMessage

    # As enqueue inserts the outbox row, in the state of the outbox's database.
    insert(decoy, alias, like=router.db_for_write(OutboxMessage))


def purge_decoys(*, using: str | None = None) -> int:
    """Delete every decoy row, whatever its age (none counts toward a limit); how many."""
    from robust_mail.models.otp import DECOY_PURPOSE, OneTimePassword

    alias = using or router.db_for_write(OneTimePassword)
    rows = OneTimePassword._base_manager.using(alias).filter(purpose=DECOY_PURPOSE)
    deleted, _ = rows.delete()
    return int(deleted)


def __getattr__(name: str) -> Any:
    # CacheOTPStore lives in its own module; this keeps the documented dotted path.
    if name == "CacheOTPStore":
        from robust_mail.otp_cache_store import CacheOTPStore

        return CacheOTPStore
    raise AttributeError(f"module 'robust_mail.otp_store' has no attribute {name!r}")
