"""Fixed-window rate limits kept in the Django cache.

A rate is ``N/unit`` (``"100/h"``, ``"10/m"``, ``"1000/d"``, ``"5/s"``). Each window is one
cache key created with ``cache.add`` and counted with ``cache.incr``; on Redis and memcached
both are atomic, so every process and host that shares the cache shares the count. On a
per-process or non-atomic cache (LocMem, database, file) the counts are per process or
racy: :mod:`robust_mail.otp_checks` warns about that outside DEBUG.

Fixed windows let up to ``2 * N`` through around a window boundary; that is the price of
one atomic counter per window, and it is documented in docs/rate-limits.md.

A refused hit is not counted, and :meth:`RateLimiter.release` gives a counted hit back
(a message that was then not sent, a code whose email failed), so limits measure what
actually happened.

Limits per client address key on :func:`ip_bucket`: the IPv4 address, or the IPv6 /64.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from django.core.cache import caches
from django.core.cache.backends.dummy import DummyCache

from robust_mail.exceptions import RateLimited
from robust_mail.state import guard, incr_keeping_expiry

__all__ = [
    "Hit",
    "Rate",
    "RateLimiter",
    "check_message_rates",
    "ip_bucket",
    "parse_rate",
]

logger = logging.getLogger("robust_mail.ratelimit")

# The same forms conf.py accepts for RATE_LIMITS.
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class Rate:
    """At most ``limit`` events per window of ``seconds``."""

    limit: int
    seconds: int

    def __post_init__(self) -> None:
        if self.limit < 1 or self.seconds < 1:
            raise ValueError("a rate needs a limit and a window of at least 1")

    def __str__(self) -> str:
        return f"{self.limit}/{self.seconds}s"


def parse_rate(text: str) -> Rate:
    """Parse ``"N/unit"`` with unit ``s``, ``m``, ``h`` or ``d``: ``parse_rate("100/h")``.

    Raises ``ValueError`` with the accepted forms for anything else, including ``0/h``.
    """
    match = _RATE.match(str(text).lower())
    if match is None or match.group(2) not in _UNITS:
        raise ValueError(f"invalid rate {text!r}: expected N/s, N/m, N/h or N/d, e.g. '100/h'")
    limit = int(match.group(1))
    if limit < 1:
        raise ValueError(f"invalid rate {text!r}: the limit must be at least 1")
    return Rate(limit=limit, seconds=_UNITS[match.group(2)])


#: The IPv6 prefix a per-address limit counts as one client. A /64 is one IPv6 subnet
#: (one LAN; the least an ISP hands a customer): a single host can pick any of its 2**64
#: addresses — privacy extensions do so all the time — so counting full IPv6 addresses
#: would give every attacker an unlimited supply of fresh ones.
IPV6_PREFIX = 64


def ip_bucket(address: str | None) -> str | None:
    """The client a per-address limit counts: an IPv4 address (/32) as it is, an IPv6
    address as its /64 network address (``2001:db8:1:2:3:4:5:6`` → ``2001:db8:1:2::``).

    IPv4-mapped IPv6 (``::ffff:192.0.2.1``) counts as the IPv4 address; a zone index is
    dropped. None or empty gives None. Anything that is not an IP address is returned
    stripped but otherwise unchanged (it is still a key, just not one we can group).
    For an IP address the result is itself a valid address, so it can be stored in a
    ``GenericIPAddressField``; and ``ip_bucket(ip_bucket(x)) == ip_bucket(x)``.
    """
    if not address:
        return None
    text = str(address).strip()
    try:
        parsed = ipaddress.ip_address(text)
    except ValueError:
        return text or None
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        host_bits = 128 - IPV6_PREFIX
        return str(ipaddress.IPv6Address(int(parsed) >> host_bits << host_bits))
    return str(parsed)


@dataclass(frozen=True)
class Hit:
    """One counted hit, for :meth:`RateLimiter.release`."""

    cache_key: str
    count: int
    #: When this window ends (clock seconds).
    resets_at: float
    #: How long the counter is kept after ``resets_at`` (seconds).
    kept_after: float = 60.0


def _keep_for(rate: Rate) -> float:
    """How long a window's counter outlives the window.

    Keys are unique per window, so keeping one longer costs only memory; expiring it a
    second after the window ends let a host whose clock is a few seconds behind create it
    again from 0 and count the same window twice (3N around a boundary, not 2N).
    """
    return float(max(60, rate.seconds))


class _Counter(Protocol):
    def add(self, key: str, value: int, timeout: float | None = ...) -> bool: ...
    def incr(self, key: str, delta: int = ...) -> int: ...
    def decr(self, key: str, delta: int = ...) -> int: ...


class _Vanishing(RuntimeError):
    """A counter evicted again and again between creating and counting it."""


class RateLimiter:
    """Atomic fixed-window counters in the Django cache ``cache_alias``.

    ``fail_open``: when the cache itself fails (Redis down), log and let the hit through
    instead of raising — right for mail in general (a dead cache must not stop mail),
    wrong for a security control, which passes ``fail_open=False``.
    """

    def __init__(
        self,
        cache_alias: str = "default",
        *,
        clock: Callable[[], float] = time.time,
        prefix: str = "robust_mail:rl",
        fail_open: bool = False,
    ) -> None:
        self.cache_alias = cache_alias
        self.clock = clock
        self.prefix = prefix
        self.fail_open = fail_open

    @property
    def cache(self) -> _Counter:
        return caches[self.cache_alias]

    def cache_key(self, key: str, rate: Rate, now: float) -> tuple[str, float]:
        """The counter's cache key for the window containing ``now``, and when it ends."""
        start = math.floor(now / rate.seconds) * rate.seconds
        # Hashed: keys may hold addresses (privacy) and spaces or be long (memcached).
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:40]
        return f"{self.prefix}:{digest}:{rate.seconds}:{start}", float(start + rate.seconds)

    def hit(self, key: str, rate: Rate, *, amount: int = 1) -> Hit | None:
        """Count ``amount`` events for ``key``; raise :class:`RateLimited` if over ``rate``.

        A refused hit is not counted. Returns the :class:`Hit` to release later, or None
        when the cache failed and ``fail_open`` let the hit through uncounted.

        With ``fail_open`` the cache is used through its :func:`robust_mail.state.guard`,
        which breakers and metrics share: once it has failed, hits go through uncounted
        without asking it again until the next probe, so a dead or blackholed Redis costs
        one socket timeout every few seconds, not one per message.
        """
        if isinstance(self.cache, DummyCache):
            # Keeps nothing, so counts nothing: limits are off (docs/rate-limits.md; checks
            # W020 and W024 say so outside DEBUG), whether or not the caller fails open.
            return None
        now = self.clock()
        cache_key, resets_at = self.cache_key(key, rate, now)
        timeout = resets_at - now + _keep_for(rate)
        if self.fail_open:

            def count_in(cache: Any) -> int | None:
                try:
                    return self._incr(cache_key, amount, timeout=timeout, cache=cache)
                except _Vanishing:
                    return None  # the cache answers (evictions), it is not down

            count = guard(self.cache_alias).call(count_in, lambda: None)
            if count is None:
                logger.debug("rate limit cache %r down; hit let through", self.cache_alias)
                return None
        else:
            count = self._incr(cache_key, amount, timeout=timeout)
        if count > rate.limit:
            self._decr(cache_key, amount, timeout=timeout)
            raise RateLimited(f"over the rate limit of {rate}", retry_after=resets_at - now)
        return Hit(
            cache_key=cache_key, count=count, resets_at=resets_at, kept_after=_keep_for(rate)
        )

    def release(self, hit: Hit | None, *, amount: int = 1) -> None:
        """Give back a counted hit whose event did not happen after all."""
        if hit is not None:
            timeout = hit.resets_at - self.clock() + hit.kept_after
            self._decr(hit.cache_key, amount, timeout=timeout)

    def _incr(self, cache_key: str, amount: int, *, timeout: float, cache: Any = None) -> int:
        cache = cache if cache is not None else self.cache
        for _ in range(3):
            cache.add(cache_key, 0, timeout=max(1.0, timeout))
            try:
                return incr_keeping_expiry(cache, cache_key, amount, timeout)
            except ValueError:
                # Evicted or expired between add and incr: create it again.
                continue
        raise _Vanishing(f"rate limit counter {cache_key!r} keeps disappearing")

    def _decr(self, cache_key: str, amount: int, *, timeout: float) -> None:
        def give_back(cache: Any) -> None:
            # ValueError: the window has expired meanwhile, nothing to give back.
            with contextlib.suppress(ValueError):
                incr_keeping_expiry(cache, cache_key, -amount, max(1.0, timeout))

        if self.fail_open:
            # Through the guard, like hits: a cache known to be down is not asked (no
            # socket timeout per released hit); the hit then simply stays counted.
            guard(self.cache_alias).call(give_back, lambda: None)
            return
        try:
            give_back(self.cache)
        except Exception:
            logger.warning("rate limit cache %r failed on release", self.cache_alias)


class _RateLimits(Protocol):
    @property
    def global_rate(self) -> str | None: ...
    @property
    def per_recipient(self) -> str | None: ...


def check_message_rates(
    recipients: Iterable[str],
    config: _RateLimits,
    cache_alias: str,
    *,
    clock: Callable[[], float] = time.time,
    scope: str | None = None,
) -> list[Hit]:
    """Count one message against ``GLOBAL`` and each recipient against ``PER_RECIPIENT``.

    ``scope``: whose limits these are (a MAILERS alias); each scope counts on its own, so
    two aliases sharing a cache do not share counters. None: ROBUST_MAIL's.

    Recipients are compared case-insensitively and counted once per message. Raises
    :class:`RateLimited` (with the ``retry_after`` of the limit that refused) and counts
    nothing when any limit refuses, so a deferred message does not use up the window it is
    waiting for. A failing cache lets the message through (logged). Returns the hits, which
    the caller may :meth:`~RateLimiter.release` if the message is then not sent.
    """
    limiter = RateLimiter(cache_alias, clock=clock, fail_open=True)
    # None keeps ROBUST_MAIL's keys as they always were: counts survive an upgrade.
    owner = "" if scope is None else f"mailer:{scope}|"
    wanted: list[tuple[str, Rate]] = []
    # Recipients before GLOBAL: a message refused for one over-limit recipient must not
    # hold a GLOBAL slot meanwhile, or a flood aimed at one address (a resend button) gets
    # other people's mail refused whenever GLOBAL is near its limit.
    if config.per_recipient:
        rate = parse_rate(config.per_recipient)
        for address in sorted({r.strip().lower() for r in recipients if r and r.strip()}):
            wanted.append((f"{owner}rcpt:{address}", rate))
    if config.global_rate:
        wanted.append((f"{owner}global", parse_rate(config.global_rate)))
    hits: list[Hit] = []
    try:
        for key, rate in wanted:
            hit = limiter.hit(key, rate)
            if hit is not None:
                hits.append(hit)
    except RateLimited:
        for hit in hits:
            limiter.release(hit)
        raise
    return hits
