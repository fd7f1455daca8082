"""Shared state in the Django cache, degrading to per-process state when the cache fails.

Breakers (and metrics) keep their state in the cache named by ``ROBUST_MAIL["CACHE"]`` so
that every process and machine sharing it (Redis) sees the same thing. The cache is a
convenience, never a dependency of sending: any cache error is logged once per outage on the
``robust_mail.state`` logger, and until the cache answers again each process uses its own
memory. While the cache is down it is probed at most once every ``PROBE_INTERVAL`` seconds
(one caller claims each probe), so a black-holed cache server costs one socket timeout per
interval, not one per message or per thread.
Configure short socket timeouts on the cache for the same reason (see
docs/pooling-and-breakers.md).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from django.core.cache import BaseCache, caches

from robust_mail.breaker import MIN_TRIAL_TIMEOUT, BreakerState, CircuitBreaker, MemoryStore

if TYPE_CHECKING:
    from robust_mail.conf import RobustMailConfig

__all__ = [
    "CacheGuard",
    "CacheStore",
    "get_breaker",
    "get_store",
    "guard",
    "incr_keeping_expiry",
    "reset",
    "shared_incr",
]

logger = logging.getLogger("robust_mail.state")

T = TypeVar("T")

#: Seconds between attempts to reach a cache that failed.
PROBE_INTERVAL = 5.0


class CacheGuard:
    """Runs operations on one Django cache alias and tracks whether it is reachable."""

    def __init__(
        self,
        alias: str,
        *,
        probe_interval: float = PROBE_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.alias = alias
        self.probe_interval = probe_interval
        self.clock = clock
        self._lock = threading.Lock()
        _all_guards.add(self)
        self._down_since: float | None = None
        self._next_probe = 0.0
        self._on_recover: list[Callable[[], None]] = []

    @property
    def degraded(self) -> bool:
        """Whether the last operation on the cache failed."""
        return self._down_since is not None

    def on_recover(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever the cache answers again after an outage."""
        self._on_recover.append(callback)

    def call(self, op: Callable[[BaseCache], T], fallback: Callable[[], T]) -> T:
        """``op(cache)``, or ``fallback()`` if the cache fails or is known to be down."""
        if self._down_since is not None and not self._claim_probe():
            return fallback()
        try:
            result = op(caches[self.alias])
        except Exception as exc:
            self._failed(exc)
            return fallback()
        if self._down_since is not None:
            self._recovered()
        return result

    def _claim_probe(self) -> bool:
        """While the cache is down: whether this caller is the one to try it now.

        One caller per interval: the others keep to per-process state until its answer
        is in, so threads arriving together at a black-holed cache do not each wait for
        a socket timeout.
        """
        with self._lock:
            if self._down_since is None:
                return True  # it answered meanwhile
            now = self.clock()
            if now < self._next_probe:
                return False
            self._next_probe = now + self.probe_interval
            return True

    def _failed(self, exc: Exception) -> None:
        with self._lock:
            first = self._down_since is None
            now = self.clock()
            if first:
                self._down_since = now
            self._next_probe = now + self.probe_interval
        if first:
            logger.warning(
                "cache %r failed (%s: %s); using per-process state until it answers again",
                self.alias,
                type(exc).__name__,
                exc,
            )

    def _recovered(self) -> None:
        with self._lock:
            if self._down_since is None:
                return
            outage = self.clock() - self._down_since
            self._down_since = None
        logger.info("cache %r answers again after %.1f s; shared state resumed", self.alias, outage)
        for callback in self._on_recover:
            callback()


class CacheStore:
    """:class:`~robust_mail.breaker.BreakerStore` over ``django.core.cache.caches[alias]``.

    ``add`` and ``incr`` are as atomic as the cache backend makes them: Redis and Memcached
    are atomic across processes, LocMemCache within one process. On a cache error every
    operation goes to a per-process :class:`~robust_mail.breaker.MemoryStore` instead
    (forgotten when the cache recovers), so nothing ever raises.
    """

    def __init__(self, alias: str = "default", *, cache_guard: CacheGuard | None = None) -> None:
        self.alias = alias
        self.guard = cache_guard if cache_guard is not None else guard(alias)
        self.fallback = MemoryStore()
        self.guard.on_recover(self.fallback.clear)

    def __repr__(self) -> str:
        return f"CacheStore({self.alias!r})"

    def get(self, key: str) -> Any:
        return self.guard.call(lambda cache: cache.get(key), lambda: self.fallback.get(key))

    def set(self, key: str, value: Any, timeout: float | None) -> None:
        self.guard.call(
            lambda cache: cache.set(key, value, _seconds(timeout)),
            lambda: self.fallback.set(key, value, timeout),
        )

    def add(self, key: str, value: Any, timeout: float | None) -> bool:
        return self.guard.call(
            lambda cache: bool(cache.add(key, value, _seconds(timeout))),
            lambda: self.fallback.add(key, value, timeout),
        )

    def delete(self, key: str) -> None:
        self.guard.call(lambda cache: cache.delete(key), lambda: self.fallback.delete(key))

    def get_many(self, keys: list[str]) -> dict[str, Any]:
        """The values of the present keys (one round trip on the cache)."""
        return self.guard.call(
            lambda cache: dict(cache.get_many(keys)),
            lambda: {k: v for k in keys if (v := self.fallback.get(k)) is not None},
        )

    def delete_many(self, keys: list[str]) -> None:
        def op(cache: BaseCache) -> None:
            cache.delete_many(keys)

        def fallback() -> None:
            for key in keys:
                self.fallback.delete(key)

        self.guard.call(op, fallback)

    def incr(self, key: str, delta: int, timeout: float | None) -> int:
        def op(cache: BaseCache) -> int:
            return shared_incr(cache, key, delta, timeout)

        return self.guard.call(op, lambda: self.fallback.incr(key, delta, timeout))


def _seconds(timeout: float | None) -> int | None:
    # Some backends truncate to whole seconds; round up so a short timeout never becomes 0
    # ("expire at once") by accident.
    return None if timeout is None else max(1, math.ceil(timeout))


def incr_keeping_expiry(cache: BaseCache, key: str, delta: int, timeout: float | None) -> int:
    """``cache.incr``, the key keeping ``timeout`` (seconds from now; None: no expiry).

    Redis, memcached and LocMem count in place. Django's generic ``incr`` (the database and
    file caches) is a get and a ``set`` with the cache's default TIMEOUT (300 s), which
    replaced a counter's own expiry: rate-limit windows and metrics counters vanished after
    five minutes. There the expiry is set again.
    """
    value = int(cache.incr(key, delta))
    if type(cache).incr is BaseCache.incr:
        cache.touch(key, _seconds(timeout))
    return value


def shared_incr(cache: BaseCache, key: str, delta: int, timeout: float | None) -> int:
    """Atomic add-or-create: Django's ``incr`` refuses missing keys with ValueError."""
    for _ in range(3):
        try:
            return incr_keeping_expiry(cache, key, delta, timeout)
        except ValueError:
            if cache.add(key, delta, _seconds(timeout)):
                return delta
            # Someone else created it between our incr and add: increment theirs.
    raise RuntimeError(f"cache {cache!r} neither increments nor adds {key!r}")


# -- registries --------------------------------------------------------------------------

_lock = threading.Lock()
_all_guards: weakref.WeakSet[CacheGuard] = weakref.WeakSet()
_guards: dict[str, CacheGuard] = {}
_stores: dict[str, CacheStore] = {}
_breakers: dict[tuple[str, int, float, float, str], CircuitBreaker] = {}


def guard(alias: str) -> CacheGuard:
    """The process-wide :class:`CacheGuard` of a cache alias (breakers and metrics share it)."""
    with _lock:
        if alias not in _guards:
            _guards[alias] = CacheGuard(alias)
        return _guards[alias]


def get_store(alias: str) -> CacheStore:
    existing = _stores.get(alias)
    if existing is not None:
        return existing
    store = CacheStore(alias)
    with _lock:
        return _stores.setdefault(alias, store)


def get_breaker(
    name: str,
    config: RobustMailConfig | None = None,
    *,
    failure_threshold: int | None = None,
    reset_timeout: float | None = None,
    cache: str | None = None,
) -> CircuitBreaker:
    """The process-wide breaker of provider ``name``.

    Settings come from ``config`` (``config.breaker`` and ``config.cache``), then from the
    keyword arguments, which win; anything unset takes the defaults (5 failures, 60 s,
    cache ``"default"``). The settings are part of the registry key, so a test that
    overrides them gets a breaker with the new thresholds; the state itself lives in the
    cache under the provider's name. Transitions send ``circuit_state_changed``, count
    ``breaker_opened`` and are logged on ``robust_mail.state``.
    """
    trial: float | None = None
    if config is not None:
        failure_threshold = failure_threshold or config.breaker.failure_threshold
        reset_timeout = config.breaker.reset_timeout if reset_timeout is None else reset_timeout
        cache = cache or config.cache
        # A half-open trial is one delivery, which may take up to the whole DEADLINE: its
        # reservation must outlast it, or a second trial starts against a struggling server.
        trial = config.retry.deadline
    threshold = failure_threshold or 5
    timeout = 60.0 if reset_timeout is None else float(reset_timeout)
    trial = max(timeout, MIN_TRIAL_TIMEOUT, trial or 0.0)
    alias = cache or "default"
    key = (name, threshold, timeout, trial, alias)
    breaker = _breakers.get(key)
    if breaker is None:
        breaker = CircuitBreaker(
            name,
            failure_threshold=threshold,
            reset_timeout=timeout,
            store=get_store(alias),
            on_change=_announce,
            trial_timeout=trial,
        )
        with _lock:
            breaker = _breakers.setdefault(key, breaker)
    return breaker


def _announce(provider: str, old: BreakerState, new: BreakerState) -> None:
    # Imported here: metrics and signals sit above this module.
    from robust_mail import metrics
    from robust_mail.signals import circuit_state_changed, emit

    log = logger.warning if new is BreakerState.OPEN else logger.info
    log("circuit breaker of provider %r: %s -> %s", provider, old, new)
    if new is BreakerState.OPEN:
        metrics.incr(provider, "breaker_opened")
    emit(circuit_state_changed, CircuitBreaker, provider=provider, old_state=old, new_state=new)


def reset() -> None:
    """Forget every breaker, store and guard of this process (for tests).

    State already written to a shared cache is not touched: clear the cache for that.
    """
    with _lock:
        _breakers.clear()
        _stores.clear()
        _guards.clear()


def _after_fork_in_child() -> None:
    # A lock another thread of the parent held at fork() stays held forever in the child:
    # replace them (the child has a single thread now). MemoryStore does the same.
    global _lock
    _lock = threading.Lock()
    for cache_guard in list(_all_guards):
        cache_guard._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
