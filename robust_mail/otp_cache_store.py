"""The cache-backed OTP store: codes in Redis (through Django's cache), out of the database.

See :mod:`robust_mail.otp_store` for the interface it implements.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from django.core.cache import caches

from robust_mail.exceptions import RateLimited
from robust_mail.otp_store import DAY, HOUR, IssueLimits, NewCode, StoredCode
from robust_mail.ratelimit import Hit, Rate, RateLimiter, ip_bucket

__all__ = ["CacheOTPStore"]


@dataclass(frozen=True)
class _CachedCode:
    code: StoredCode
    ip_address: str | None
    hits: tuple[Hit, ...]
    cooldown_key: str | None
    #: The identifier and purpose's ``invalidate()`` count when the code was added: if it
    #: has moved on by ``activate``, the code was voided while its email was on its way.
    generation: int = 0


class CacheOTPStore:
    """Codes in the Django cache ``cache_alias`` (Redis through ``django.core.cache``).

    Records expire with the code. A code is pending until ``activate`` puts its key in the
    index of its identifier and purpose, where ``latest`` looks. Attempts are ``incr``
    counters. Single use, and retiring a replaced code, *delete* the record: ``delete``
    says whether this caller removed it (DEL on Redis), so of concurrent callers exactly
    one consumes it; and a cache that evicts keys (``maxmemory``) can then only lose a
    code, never bring a used or replaced one back, as a lost "used" marker would. Limits
    are fixed-window counters of
    :class:`~robust_mail.ratelimit.RateLimiter` (aligned to UTC: around a boundary an
    identifier can get up to twice a limit, docs/otp.md) and the cooldown a key created
    with ``add``. Needs a shared cache with atomic ``add``/``incr`` — Redis or memcached,
    not LocMem outside tests.
    """

    #: Its attempt counts are cache writes, which no database rollback undoes: the
    #: service counts no second time (see ``OTPStore``).
    counts_outside_transactions = True

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
        # The per-address limit counts IPv4 addresses and IPv6 /64s (see ip_bucket).
        code = replace(code, ip_address=ip_bucket(code.ip_address))
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
        generation = self._generation(code.identifier, code.purpose)
        record = _CachedCode(stored, code.ip_address, tuple(hits), cooldown_key, generation)
        self.cache.set(self._k("code", key), record, timeout=ttl + 60)
        self.cache.set(self._k("attempts", key), 0, timeout=ttl + 60)
        return key  # pending: in the index of live codes only on activate

    def _generation(self, identifier: str, purpose: str) -> int:
        return int(self.cache.get(self._k("generation", identifier, purpose), 0))

    def _push(self, identifier: str, purpose: str, key: str, ttl: float) -> None:
        # The list of activated keys, the last activated last. Lost updates here only hide
        # a code (the user asks again), never reveal or revive one.
        index = self._k("index", identifier, purpose)
        keys = [
            k for k in self.cache.get(index, []) if k != key and self.cache.get(self._k("code", k))
        ]
        self.cache.set(index, [*keys, key], timeout=ttl)

    def _release(self, hits: tuple[Hit, ...], cooldown_key: str | None) -> None:
        limiter = RateLimiter(self.cache_alias, prefix=f"{self.prefix}:rl")
        for hit in hits:
            limiter.release(hit)
        if cooldown_key is not None:
            self.cache.delete(cooldown_key)

    def _record(self, key: str) -> _CachedCode | None:
        record = self.cache.get(self._k("code", key))
        return record if isinstance(record, _CachedCode) else None

    def withdraw(self, key: str) -> None:
        record = self.cache.get(self._k("code", key))
        if isinstance(record, _CachedCode):
            self._release(record.hits, record.cooldown_key)
        self.cache.delete_many([self._k("code", key), self._k("attempts", key)])

    def activate(self, key: str) -> None:
        record = self._record(key)
        if record is None:
            return
        code = record.code
        if record.generation != self._generation(code.identifier, code.purpose):
            self._kill(key)  # invalidate() ran while its email was on its way
            return
        for other in self.cache.get(self._k("index", code.identifier, code.purpose), []):
            if other != key:
                self._kill(other)
        ttl = max(1.0, (code.expires_at - code.created_at).total_seconds())
        self._push(code.identifier, code.purpose, key, ttl + 60)
        # An invalidate() since the check above read the index before this key was in it,
        # and killed everything but this code. It moved the generation first, and this
        # reads it after the push: one of the two sees the other.
        if record.generation != self._generation(code.identifier, code.purpose):
            self._kill(key)

    def _kill(self, key: str) -> bool:
        """Retire a code for good; True if this call did (it was there)."""
        return bool(self.cache.delete(self._k("code", key)))

    def latest(self, identifier: str, purpose: str) -> StoredCode | None:
        for key in reversed(self.cache.get(self._k("index", identifier, purpose), [])):
            record = self._record(key)
            if record is None:
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
        index = self._k("index", record.code.identifier, record.code.purpose)
        if key not in self.cache.get(index, []):
            return False  # pending: never activated, so never sent
        # DEL: exactly one caller removes it.
        return self._kill(key)

    def invalidate(self, identifier: str, purpose: str) -> int:
        # Pending ones too: a code whose email is on its way must not become usable after
        # a password change that was meant to void every code. A new generation voids
        # every code added before it, even one added concurrently (no list to miss it in).
        generation = self._k("generation", identifier, purpose)
        self.cache.add(generation, 0, timeout=DAY)
        try:
            self.cache.incr(generation)
        except ValueError:  # evicted in between: start again
            self.cache.set(generation, 1, timeout=DAY)
        keys = self.cache.get(self._k("index", identifier, purpose), [])
        return sum(1 for key in keys if self._kill(key))

    def purge_expired(self, now: datetime) -> int:
        # The cache expires records by itself.
        return 0
