"""Where one-time passwords live: the store interface and its two implementations.

The service (:mod:`robust_mail.otp`) owns the rules — hashing, expiry, attempts, reasons;
a store only keeps records and gives the atomic operations the rules need:

- ``add`` stores a new code after checking the issue limits, and refuses with
  :class:`~robust_mail.exceptions.RateLimited` without keeping anything when over one;
- ``withdraw`` removes a code as if it had never been issued (its email failed), so it
  counts toward no limit; ``activate`` then retires the older live codes;
- ``count_attempt`` and ``consume`` are conditional and atomic: of any number of
  concurrent callers, at most ``max_attempts`` resp. exactly one succeed.

:class:`DatabaseOTPStore` keeps :class:`~robust_mail.models.OneTimePassword` rows and counts
limits over sliding windows of rows. :class:`CacheOTPStore` keeps everything in a Django
cache (Redis) for projects that want codes out of the database; its limits are fixed-window
counters. Both pass ``tests/test_otp_store.py``'s contract tests.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from django.core.cache import caches
from django.db import models, transaction

from robust_mail.exceptions import RateLimited
from robust_mail.ratelimit import Hit, Rate, RateLimiter

__all__ = [
    "CacheOTPStore",
    "DatabaseOTPStore",
    "IssueLimits",
    "NewCode",
    "OTPStore",
    "StoredCode",
]

HOUR = 3600
DAY = 86400


@dataclass(frozen=True)
class IssueLimits:
    """Issue limits; 0 switches one off. Cooldown is per identifier and purpose, the
    hourly and daily limits are per identifier (all purposes), the IP limit per address."""

    cooldown: int = 60
    per_hour: int = 5
    per_day: int = 10
    per_ip_per_hour: int = 20


@dataclass(frozen=True)
class NewCode:
    identifier: str
    purpose: str
    code_hash: str
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
    code_hash: str
    created_at: datetime
    expires_at: datetime
    attempts: int


class OTPStore(Protocol):
    """The operations the OTP service needs. Keys are opaque strings."""

    def add(self, code: NewCode, limits: IssueLimits) -> str:
        """Store ``code``; raise RateLimited (storing nothing) when over a limit."""

    def withdraw(self, key: str) -> None:
        """Remove a code as if never issued: it no longer counts toward any limit."""

    def activate(self, key: str) -> None:
        """Invalidate every live code for the same identifier and purpose issued before it."""

    def latest(self, identifier: str, purpose: str) -> StoredCode | None:
        """The newest code neither consumed nor invalidated (it may have expired)."""

    def count_attempt(self, key: str, max_attempts: int) -> bool:
        """Atomically count one attempt if fewer than ``max_attempts`` were made.

        Counts on used codes too, so a verification that lost a race to ``consume`` is
        told "invalid" by ``consume``, not "locked" by this."""

    def consume(self, key: str, now: datetime) -> bool:
        """Atomically mark the code used; True for exactly one caller, and only while live."""

    def invalidate(self, identifier: str, purpose: str) -> int:
        """Invalidate every live code for identifier and purpose; how many."""

    def purge_expired(self, now: datetime) -> int:
        """Delete records no longer needed for codes or limits; how many."""


def _retry_after(times: list[datetime], limit: int, window: int, now: datetime) -> float:
    """Seconds until fewer than ``limit`` of ``times`` (ascending) fall in the window."""
    oldest_that_must_leave = times[len(times) - limit]
    return (oldest_that_must_leave + timedelta(seconds=window) - now).total_seconds()


class DatabaseOTPStore:
    """:class:`~robust_mail.models.OneTimePassword` rows in the database ``using``.

    Limits are checked *after* inserting, counting the new row: two concurrent requests
    then both see each other and both back off, so a limit is never exceeded (at worst
    both retry). Rows stay for a day after they expire so the daily limit keeps counting.
    """

    def __init__(self, using: str = "default") -> None:
        self.using = using

    def _rows(self) -> models.QuerySet[Any]:
        from robust_mail.models import OneTimePassword

        return OneTimePassword.objects.using(self.using)

    def add(self, code: NewCode, limits: IssueLimits) -> str:
        with transaction.atomic(using=self.using):
            row = self._rows().create(
                identifier=code.identifier,
                purpose=code.purpose,
                code_hash=code.code_hash,
                created_at=code.created_at,
                expires_at=code.expires_at,
                ip_address=code.ip_address,
                user_agent=code.user_agent[:255],
            )
        try:
            self._check_limits(row.pk, code, limits)
        except RateLimited:
            self._rows().filter(pk=row.pk).delete()
            raise
        return str(row.pk)

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
        checks: list[tuple[int, int, dict[str, Any], str]] = [
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
        row = self._rows().filter(pk=int(key)).values("identifier", "purpose").first()
        if row is None:
            return
        self._live(row["identifier"], row["purpose"]).filter(pk__lt=int(key)).update(
            invalidated=True
        )

    def _live(self, identifier: str, purpose: str) -> models.QuerySet[Any]:
        return self._rows().filter(
            identifier=identifier, purpose=purpose, consumed_at__isnull=True, invalidated=False
        )

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
            .filter(pk=int(key), consumed_at__isnull=True, invalidated=False, expires_at__gt=now)
            .update(consumed_at=now)
        )
        return updated == 1

    def invalidate(self, identifier: str, purpose: str) -> int:
        return int(self._live(identifier, purpose).update(invalidated=True))

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


@dataclass(frozen=True)
class _CachedCode:
    code: StoredCode
    ip_address: str | None
    hits: tuple[Hit, ...]
    cooldown_key: str | None


class CacheOTPStore:
    """Codes in the Django cache ``cache_alias`` (Redis through ``django.core.cache``).

    Records expire with the code. Attempts are ``incr`` counters; single use is
    ``cache.add`` of a "consumed" marker (SET NX on Redis), so it is atomic wherever
    ``add`` is. Limits are fixed-window counters of :class:`~robust_mail.ratelimit.RateLimiter`
    and the cooldown a key created with ``add``. Needs a shared cache with atomic
    ``add``/``incr`` — Redis or memcached, not LocMem outside tests.
    """

    def __init__(self, cache_alias: str = "default", *, prefix: str = "robust_mail:otp") -> None:
        self.cache_alias = cache_alias
        self.prefix = prefix

    @property
    def cache(self) -> Any:
        return caches[self.cache_alias]

    def _k(self, *parts: str) -> str:
        # Identifiers are addresses: hash them out of the key names.
        digest = hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).hexdigest()
        return f"{self.prefix}:{digest[:40]}"

    def add(self, code: NewCode, limits: IssueLimits) -> str:
        now_ts = code.created_at.timestamp()
        limiter = RateLimiter(self.cache_alias, clock=lambda: now_ts, prefix=f"{self.prefix}:rl")
        cooldown_key = None
        hits: list[Hit] = []
        try:
            if limits.cooldown > 0:
                cooldown_key = self._k("cooldown", code.identifier, code.purpose)
                if not self.cache.add(cooldown_key, now_ts, timeout=limits.cooldown):
                    since = self.cache.get(cooldown_key)
                    waited = now_ts - float(since) if since is not None else 0.0
                    cooldown_key = None
                    raise RateLimited(
                        "a code was sent moments ago", retry_after=limits.cooldown - waited
                    )
            wanted = [
                (limits.per_hour, HOUR, f"id:{code.identifier}"),
                (limits.per_day, DAY, f"id:{code.identifier}"),
            ]
            if code.ip_address:
                wanted.append((limits.per_ip_per_hour, HOUR, f"ip:{code.ip_address}"))
            for limit, window, key in wanted:
                if limit > 0:
                    hit = limiter.hit(key, Rate(limit, window))
                    if hit is not None:
                        hits.append(hit)
        except RateLimited:
            self._release(tuple(hits), cooldown_key)
            raise
        key = uuid.uuid4().hex
        stored = StoredCode(
            key=key,
            identifier=code.identifier,
            purpose=code.purpose,
            code_hash=code.code_hash,
            created_at=code.created_at,
            expires_at=code.expires_at,
            attempts=0,
        )
        ttl = max(1.0, (code.expires_at - code.created_at).total_seconds())
        record = _CachedCode(stored, code.ip_address, tuple(hits), cooldown_key)
        self.cache.set(self._k("code", key), record, timeout=ttl + 60)
        self.cache.set(self._k("attempts", key), 0, timeout=ttl + 60)
        self._push(code.identifier, code.purpose, key, ttl + 60)
        return key

    def _push(self, identifier: str, purpose: str, key: str, ttl: float) -> None:
        # The list of candidate keys, newest last. Lost updates here only hide a code
        # (the user asks again), never reveal or revive one.
        index = self._k("index", identifier, purpose)
        keys = [k for k in self.cache.get(index, []) if self.cache.get(self._k("code", k))]
        self.cache.set(index, [*keys, key], timeout=ttl)

    def _release(self, hits: tuple[Hit, ...], cooldown_key: str | None) -> None:
        limiter = RateLimiter(self.cache_alias, prefix=f"{self.prefix}:rl")
        for hit in hits:
            limiter.release(hit)
        if cooldown_key is not None:
            self.cache.delete(cooldown_key)

    def _record(self, key: str) -> _CachedCode | None:
        record = self.cache.get(self._k("code", key))
        if not isinstance(record, _CachedCode) or self.cache.get(self._k("dead", key)):
            return None
        return record

    def withdraw(self, key: str) -> None:
        record = self.cache.get(self._k("code", key))
        if isinstance(record, _CachedCode):
            self._release(record.hits, record.cooldown_key)
        self.cache.delete_many([self._k("code", key), self._k("attempts", key)])

    def activate(self, key: str) -> None:
        record = self._record(key)
        if record is None:
            return
        index = self._k("index", record.code.identifier, record.code.purpose)
        for other in self.cache.get(index, []):
            if other == key:
                break
            self._kill(other)

    def _kill(self, key: str) -> None:
        record = self.cache.get(self._k("code", key))
        if isinstance(record, _CachedCode):
            ttl = max(1.0, (record.code.expires_at - record.code.created_at).total_seconds())
            self.cache.set(self._k("dead", key), True, timeout=ttl + 60)

    def latest(self, identifier: str, purpose: str) -> StoredCode | None:
        for key in reversed(self.cache.get(self._k("index", identifier, purpose), [])):
            record = self._record(key)
            if record is None or self.cache.get(self._k("consumed", key)) is not None:
                continue
            attempts = self.cache.get(self._k("attempts", key), 0)
            return replace(record.code, attempts=int(attempts))
        return None

    def count_attempt(self, key: str, max_attempts: int) -> bool:
        if self._record(key) is None:
            return False
        try:
            count = int(self.cache.incr(self._k("attempts", key)))
        except ValueError:
            return False
        return count <= max_attempts

    def consume(self, key: str, now: datetime) -> bool:
        record = self._record(key)
        if record is None or record.code.expires_at <= now:
            return False
        ttl = max(1.0, (record.code.expires_at - record.code.created_at).total_seconds())
        # SET NX: exactly one caller creates the marker.
        return bool(self.cache.add(self._k("consumed", key), now.timestamp(), timeout=ttl + 60))

    def invalidate(self, identifier: str, purpose: str) -> int:
        keys = self.cache.get(self._k("index", identifier, purpose), [])
        count = 0
        for key in keys:
            if self._record(key) is not None and self.cache.get(self._k("consumed", key)) is None:
                self._kill(key)
                count += 1
        return count

    def purge_expired(self, now: datetime) -> int:
        # The cache expires records by itself.
        return 0
