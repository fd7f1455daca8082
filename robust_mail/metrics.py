"""Delivery counters and a latency histogram per provider, kept in the shared cache.

Every process adds to the same counters (atomic cache ``incr``), so ``robust_mail_status``
and the Prometheus collector see the whole deployment. When the cache fails, counts go to
per-process memory (see :mod:`robust_mail.state`): metrics never stop or slow mail beyond a
cache call, and never raise for a cache problem.

Counters (``incr``): see :data:`COUNTERS`. Latency (``observe``) is a histogram with fixed
bucket bounds :data:`BUCKETS` in seconds; each observation costs two cache increments (its
bucket and the running sum, kept in microseconds because cache counters are integers).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from robust_mail.state import CacheStore, get_store

__all__ = ["BUCKETS", "COUNTERS", "incr", "observe", "percentile", "reset", "snapshot"]

#: What each counter counts, per provider.
COUNTERS: dict[str, str] = {
    "sent": "messages the provider accepted (fully or partially)",
    "failed": "attempts that failed at this provider",
    "retried": "retries after a transient failure",
    "failed_over": "messages handed on to the next provider",
    "fallback": "messages handled by the fallback (outbox or console)",
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


def _register(store: CacheStore, provider: str) -> None:
    """Make sure ``provider`` is in the index ``snapshot`` reads.

    Checked at most once a minute per process (the cache may have been flushed or
    restarted meanwhile), and on every call while the cache is down, so the per-process
    index is complete too.
    """
    marker = (store.alias, provider)
    now = time.monotonic()
    if _known.get(marker, 0.0) > now and not store.guard.degraded:
        return
    providers = store.get(_PROVIDERS_KEY)
    names = set(providers) if isinstance(providers, list | set | tuple) else set()
    if provider not in names:
        store.set(_PROVIDERS_KEY, sorted(names | {provider}), None)
    with _known_lock:
        _known[marker] = now + _RECHECK


def incr(provider: str, name: str, amount: int = 1) -> None:
    """Add ``amount`` to counter ``name`` (one of :data:`COUNTERS`) of ``provider``."""
    if name not in COUNTERS:
        raise ValueError(f"unknown metric {name!r}; expected one of {sorted(COUNTERS)}")
    if amount == 0:
        return
    store = _store()
    _register(store, provider)
    store.incr(_key(provider, name), amount, None)


def observe(provider: str, seconds: float) -> None:
    """Record that one delivery through ``provider`` took ``seconds``."""
    store = _store()
    _register(store, provider)
    index = bisect.bisect_left(BUCKETS, seconds)
    store.incr(_key(provider, "latency:" + _LABELS[index]), 1, None)
    store.incr(_key(provider, "latency:sum_us"), max(0, round(seconds * 1_000_000)), None)


def snapshot(providers: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """Every counter and the latency histogram, per provider.

    Covers the providers any process has reported on, plus ``providers``::

        {"primary": {"sent": 12, "failed": 1, ..., "latency": {
            "count": 12, "sum": 0.84, "buckets": {"0.005": 0, ..., "+Inf": 12}}}}

    Buckets are cumulative (each counts observations up to its bound), as in Prometheus.
    """
    store = _store()
    index = store.get(_PROVIDERS_KEY)
    names = set(index) if isinstance(index, list | set | tuple) else set()
    names.update(providers)
    result: dict[str, dict[str, Any]] = {}
    for provider in sorted(names):
        keys = [_key(provider, name) for name in COUNTERS]
        keys += [_key(provider, "latency:" + label) for label in _LABELS]
        keys.append(_key(provider, "latency:sum_us"))
        values = store.get_many(keys)
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
    """Zero every counter of the known providers (and ``providers``); for tests and ops."""
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
