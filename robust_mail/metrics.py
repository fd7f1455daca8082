"""Delivery counters and a latency histogram per provider, kept in the shared cache.

Every process adds to the same counters (atomic cache ``incr``), so ``robust_mail_status``
and the Prometheus collector see the whole deployment. When the cache fails, each process
keeps its counts in memory and writes them once the cache answers again (see
:func:`flush`): metrics never stop or slow mail, never raise for a cache problem, and lose
no count to an outage; meanwhile :func:`snapshot` shows this process's own counts and
:func:`degraded` says so.

Counts are added up in memory and written to the cache by a background thread every
:data:`FLUSH_INTERVAL` seconds, by :func:`snapshot` (which flushes before it reads) and at
interpreter exit, so recording a message's metrics costs no cache round trip: with Redis,
Django's ``incr`` is two (EXISTS, INCRBY) per counter, six per message. The price: other
processes see a count up to ``FLUSH_INTERVAL`` late, and a process killed outright loses at
most that much of its counts.

Counters (``incr``): see :data:`COUNTERS`. Latency (``observe``) is a histogram with fixed
bucket bounds :data:`BUCKETS` in seconds; each observation adds to two counters (its bucket
and the running sum, kept in microseconds because cache counters are integers).
"""

from __future__ import annotations

import atexit
import bisect
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from robust_mail.state import CacheStore, get_store, shared_incr

__all__ = [
    "BUCKETS",
    "COUNTERS",
    "FLUSH_INTERVAL",
    "degraded",
    "deployment_snapshot",
    "flush",
    "incr",
    "observe",
    "percentile",
    "reset",
    "snapshot",
]

logger = logging.getLogger("robust_mail.metrics")

#: Seconds between writes of this process's counts to the shared cache.
FLUSH_INTERVAL = 1.0

#: What each counter counts, per provider.
COUNTERS: dict[str, str] = {
    "sent": "messages the provider accepted (fully or partially)",
    # Once per message and provider, after its retries: each failed attempt before the
    # last is a "retried".
    "failed": "messages that failed at this provider, after its retries",
    "retried": "retries after a transient failure",
    # Counted on the provider that takes the message over; a skip past an open breaker is
    # not an attempt, so it is not counted (the breaker_opened counter tells that story).
    "failed_over": "messages this provider was tried for after an earlier provider failed",
    "fallback": "messages handled by the fallback (outbox or console) after this provider, "
    "the last one tried, failed or was skipped",
    "breaker_opened": "times the provider's circuit breaker opened",
    "refused_recipients": "recipients the provider refused while accepting the message",
    "ambiguous": "attempts that may or may not have delivered (no reply after DATA)",
}

#: Upper bounds (seconds) of the latency buckets; a last, unbounded bucket follows.
BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

_PREFIX = "robust_mail:metrics:"
_PROVIDERS_KEY = _PREFIX + "providers"
_RECHECK = 60.0  # seconds between checks that a provider is still in the index
_known: dict[tuple[str, str], float] = {}  # (alias, provider) -> when to check again
_known_lock = threading.Lock()

# Counts not yet written to the cache: (alias, key) -> amount, and the providers they
# belong to. _flush_lock makes flushes (and reset) one at a time, so a count is never
# written after a reset that should have discarded it.
_pending: dict[tuple[str, str, str], int] = {}  # (alias, provider, key) -> amount
_pending_providers: set[tuple[str, str]] = set()  # (alias, provider) not yet in the index
_pending_lock = threading.Lock()
_flush_lock = threading.Lock()
_flusher: threading.Thread | None = None


#: Cache key suffix (and snapshot label) of each bucket, the unbounded one last.
_LABELS: tuple[str, ...] = (*(format(bound, "g") for bound in BUCKETS), "+Inf")


def _key(provider: str, name: str) -> str:
    # Quoted so that any provider name makes a valid key on every cache backend.
    return f"{_PREFIX}{quote(provider, safe='')}:{name}"


def _alias() -> str:
    # The configured cache alias; metrics must work (and never raise) even when the
    # configuration is broken, so anything unusual means the default cache.
    try:
        from robust_mail.conf import get_config

        return str(get_config().cache)
    except Exception:
        return "default"


def _store() -> CacheStore:
    return get_store(_alias())


def _register(store: CacheStore, provider: str) -> bool:
    """Make sure ``provider`` is in the index ``snapshot`` reads; False if the cache is down.

    Checked at most once a minute per process (the cache may have been flushed or
    restarted meanwhile).
    """
    marker = (store.alias, provider)
    now = time.monotonic()
    if _known.get(marker, 0.0) > now:
        return True

    def add_to_index(cache: Any) -> bool:
        providers = cache.get(_PROVIDERS_KEY)
        names = set(providers) if isinstance(providers, list | set | tuple) else set()
        if provider not in names:
            cache.set(_PROVIDERS_KEY, sorted(names | {provider}), None)
        return True

    if not store.guard.call(add_to_index, lambda: False):
        return False
    with _known_lock:
        _known[marker] = now + _RECHECK
    return True


def _write(store: CacheStore, key: str, amount: int) -> bool:
    """Add ``amount`` to ``key`` in the shared cache; False (nothing counted) if it is down."""

    def add(cache: Any) -> bool:
        shared_incr(cache, key, amount, None)
        return True

    return bool(store.guard.call(add, lambda: False))


def incr(provider: str, name: str, amount: int = 1) -> None:
    """Add ``amount`` to counter ``name`` (one of :data:`COUNTERS`) of ``provider``."""
    if name not in COUNTERS:
        raise ValueError(f"unknown metric {name!r}; expected one of {sorted(COUNTERS)}")
    if amount == 0:
        return
    _add(provider, {_key(provider, name): amount})


def observe(provider: str, seconds: float) -> None:
    """Record that one delivery through ``provider`` took ``seconds``."""
    index = bisect.bisect_left(BUCKETS, seconds)
    _add(
        provider,
        {
            _key(provider, "latency:" + _LABELS[index]): 1,
            _key(provider, "latency:sum_us"): max(0, round(seconds * 1_000_000)),
        },
    )


def _add(provider: str, amounts: dict[str, int]) -> None:
    global _flusher
    alias = _alias()
    with _pending_lock:
        for key, amount in amounts.items():
            marker = (alias, provider, key)
            _pending[marker] = _pending.get(marker, 0) + amount
        _pending_providers.add((alias, provider))
        start = _flusher is None
        if start:
            _flusher = threading.Thread(
                target=_flush_forever, name="robust_mail metrics flusher", daemon=True
            )
    if start:
        assert _flusher is not None
        _flusher.start()


def flush() -> None:
    """Write the counts this process has added up to the shared cache now.

    While the cache is down they stay here, added up, and are written once it answers:
    written to per-process memory instead, they would be forgotten at recovery, and a
    counter read meanwhile would go back and then forward (a false reset for Prometheus).
    """
    with _flush_lock:
        with _pending_lock:
            counts, providers = dict(_pending), set(_pending_providers)
            _pending.clear()
            _pending_providers.clear()
        kept_providers = {m for m in sorted(providers) if not _register(get_store(m[0]), m[1])}
        kept = {
            marker: amount
            for marker, amount in counts.items()
            if not _write(get_store(marker[0]), marker[2], amount)
        }
        if kept or kept_providers:
            with _pending_lock:
                for marker, amount in kept.items():
                    _pending[marker] = _pending.get(marker, 0) + amount
                _pending_providers.update(kept_providers)


def degraded() -> bool:
    """True while the metrics' cache is down: :func:`snapshot` then shows this process's
    counts since the outage began, not the deployment's."""
    return _store().guard.degraded


def deployment_snapshot(providers: Iterable[str] = ()) -> tuple[dict[str, dict[str, Any]], bool]:
    """:func:`snapshot`, and whether it is the deployment's counts.

    False when the cache was down before or after the read (it may fail, or answer again,
    while being read): the snapshot may then hold only this process's counts.
    """
    down = degraded()
    counts = snapshot(providers)
    return counts, not (down or degraded())


def _unwritten(alias: str) -> tuple[dict[str, int], set[str]]:
    """This process's counts (and their providers) waiting for cache ``alias`` to answer."""
    with _pending_lock:
        counts: dict[str, int] = {}
        providers = {provider for (a, provider) in _pending_providers if a == alias}
        for (a, provider, key), amount in _pending.items():
            if a == alias:
                counts[key] = counts.get(key, 0) + amount
                providers.add(provider)
        return counts, providers


def _flush_forever() -> None:
    while True:
        time.sleep(FLUSH_INTERVAL)
        try:
            flush()
        except Exception:  # never let the flusher die: the next round may work
            logger.warning("writing metrics to the cache failed", exc_info=True)


def snapshot(providers: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """Every counter and the latency histogram, per provider.

    Covers the providers any process has reported on, plus ``providers``::

        {"primary": {"sent": 12, "failed": 1, ..., "latency": {
            "count": 12, "sum": 0.84, "buckets": {"0.005": 0, ..., "+Inf": 12}}}}

    Buckets are cumulative (each counts observations up to its bound), as in Prometheus.
    This process's pending counts are flushed first; other processes' are at most
    :data:`FLUSH_INTERVAL` seconds behind.
    """
    flush()
    store = _store()
    index = store.get(_PROVIDERS_KEY)
    names = set(index) if isinstance(index, list | set | tuple) else set()
    names.update(providers)
    local, local_providers = _unwritten(store.alias) if store.guard.degraded else ({}, set())
    names.update(local_providers)
    result: dict[str, dict[str, Any]] = {}
    for provider in sorted(names):
        keys = [_key(provider, name) for name in COUNTERS]
        keys += [_key(provider, "latency:" + label) for label in _LABELS]
        keys.append(_key(provider, "latency:sum_us"))
        values = store.get_many(keys)
        if local:
            values = {key: int(values.get(key, 0)) + local.get(key, 0) for key in keys}
        entry: dict[str, Any] = {
            name: int(values.get(_key(provider, name), 0)) for name in COUNTERS
        }
        cumulative: dict[str, int] = {}
        running = 0
        for label in _LABELS:
            running += int(values.get(_key(provider, "latency:" + label), 0))
            cumulative[label] = running
        entry["latency"] = {
            "count": running,
            "sum": int(values.get(_key(provider, "latency:sum_us"), 0)) / 1_000_000,
            "buckets": cumulative,
        }
        result[provider] = entry
    return result


def percentile(latency: dict[str, Any], q: float) -> float | None:
    """Upper bound (seconds) of the bucket holding quantile ``q`` of a snapshot's latency.

    ``None`` when nothing was observed; ``inf`` when it lies beyond the last bound.
    """
    count = int(latency["count"])
    if count == 0:
        return None
    rank = q * count
    for label, seen in latency["buckets"].items():
        if seen >= rank and seen > 0:
            return float("inf") if label == "+Inf" else float(label)
    return float("inf")


def reset(providers: Iterable[str] = ()) -> None:
    """Zero every counter of the known providers (and ``providers``); for tests and ops.

    Counts this process has not flushed yet are discarded too.
    """
    with _flush_lock:
        with _pending_lock:
            _pending.clear()
            _pending_providers.clear()
        store = _store()
        index = store.get(_PROVIDERS_KEY)
        names = set(index) if isinstance(index, list | set | tuple) else set()
        names.update(providers)
        keys = [_PROVIDERS_KEY]
        for provider in names:
            keys += [_key(provider, name) for name in COUNTERS]
            keys += [_key(provider, "latency:" + label) for label in _LABELS]
            keys.append(_key(provider, "latency:sum_us"))
        store.delete_many(keys)
        with _known_lock:
            _known.clear()


def _flush_at_exit() -> None:
    try:
        flush()
    except Exception:  # at exit there is nobody left to tell but the log
        logger.warning("writing metrics to the cache at exit failed", exc_info=True)


def _after_fork_in_child() -> None:
    # The parent flushes its own pending counts: the child must not count them again. A
    # lock another thread held at fork() would stay held forever here: replace them all.
    global _known_lock, _pending_lock, _flush_lock, _flusher
    _known_lock = threading.Lock()
    _pending_lock = threading.Lock()
    _flush_lock = threading.Lock()
    _pending.clear()
    _pending_providers.clear()
    _flusher = None  # the parent's thread does not exist here; started again when needed


atexit.register(_flush_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
