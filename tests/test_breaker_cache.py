"""CacheStore over Django's cache, the breaker registry, and degrading when the cache fails."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import pytest
from django.core.cache import caches
from django.test import override_settings

from robust_mail import state
from robust_mail.breaker import BreakerState, BreakerStore, CircuitBreaker
from robust_mail.signals import circuit_state_changed
from robust_mail.state import CacheGuard, CacheStore, get_breaker
from tests.forking import in_child

BROKEN_CACHE = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    # Nothing listens on port 1: every operation fails at once with "connection refused".
    "broken": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": "redis://127.0.0.1:1/0",
        "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
    },
}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_cache_store_is_a_breaker_store() -> None:
    assert isinstance(CacheStore("default"), BreakerStore)


def test_cache_store_get_set_add_delete_incr() -> None:
    store = CacheStore("default")

    assert store.get("k") is None
    store.set("k", {"retry_at": 1.5}, None)
    assert store.get("k") == {"retry_at": 1.5}
    assert not store.add("k", "other", None)
    store.delete("k")
    assert store.add("k", "mine", 30)
    assert store.get("k") == "mine"
    assert store.incr("n", 1, None) == 1
    assert store.incr("n", 4, None) == 5
    assert store.get_many(["n", "k", "absent"]) == {"n": 5, "k": "mine"}
    store.delete_many(["n", "k"])
    assert store.get_many(["n", "k"]) == {}


def test_cache_store_writes_to_the_named_cache() -> None:
    CacheStore("default").set("robust_mail:probe", 1, None)
    assert caches["default"].get("robust_mail:probe") == 1


def test_cache_store_incr_counts_every_increment_from_many_threads() -> None:
    store = CacheStore("default")

    def bump() -> None:
        for _ in range(200):
            store.incr("n", 1, None)

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert store.get("n") == 1600


def test_short_timeouts_are_rounded_up_not_down_to_expire_at_once() -> None:
    store = CacheStore("default")
    store.set("k", "v", 0.2)
    assert store.get("k") == "v"


@override_settings(CACHES=BROKEN_CACHE)
def test_failing_cache_degrades_to_process_state_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = CacheStore("broken", cache_guard=CacheGuard("broken"))
    caplog.set_level(logging.WARNING, logger="robust_mail.state")

    store.set("k", "v", None)
    assert store.get("k") == "v"
    assert store.add("t", 1, 30)
    assert not store.add("t", 2, 30)
    assert store.incr("n", 2, None) == 2
    store.delete("k")
    assert store.get("k") is None

    warnings = [r for r in caplog.records if r.name == "robust_mail.state"]
    assert len(warnings) == 1
    assert "'broken'" in warnings[0].getMessage()
    assert store.guard.degraded


@override_settings(CACHES=BROKEN_CACHE)
def test_down_cache_is_probed_again_only_after_the_probe_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    guard = CacheGuard("broken", probe_interval=5.0, clock=clock)
    tried: list[str] = []

    def op(cache: Any) -> str:
        tried.append("cache")
        return str(cache.get("x"))

    assert guard.call(op, lambda: "local") == "local"
    assert guard.call(op, lambda: "local") == "local"
    clock.now = 4.9
    assert guard.call(op, lambda: "local") == "local"
    assert tried == ["cache"]

    clock.now = 5.0
    guard.call(op, lambda: "local")
    assert tried == ["cache", "cache"]


def test_guard_recovers_logs_and_forgets_the_fallback_state(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    guard = CacheGuard("default", probe_interval=1.0, clock=clock)
    store = CacheStore("default", cache_guard=guard)
    caplog.set_level(logging.INFO, logger="robust_mail.state")
    failing = True

    def op(cache: Any) -> None:
        if failing:
            raise ConnectionError("down")

    guard.call(op, lambda: None)
    store.fallback.set("k", "during outage", None)
    failing = False
    clock.now = 2.0
    guard.call(op, lambda: None)

    assert not guard.degraded
    assert store.fallback.get("k") is None
    messages = [r.getMessage() for r in caplog.records if r.name == "robust_mail.state"]
    assert len(messages) == 2
    assert "answers again" in messages[1]


@override_settings(CACHES=BROKEN_CACHE)
def test_breaker_over_a_broken_cache_keeps_working_in_process() -> None:
    breaker = CircuitBreaker(
        "primary", failure_threshold=2, store=CacheStore("broken", cache_guard=CacheGuard("x"))
    )

    assert breaker.allow()
    breaker.record_failure()
    breaker.record_failure()

    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()


def test_get_breaker_returns_one_breaker_per_provider_and_settings() -> None:
    a = get_breaker("primary", failure_threshold=3, reset_timeout=10)
    assert get_breaker("primary", failure_threshold=3, reset_timeout=10.0) is a
    assert get_breaker("backup", failure_threshold=3, reset_timeout=10) is not a

    changed = get_breaker("primary", failure_threshold=1, reset_timeout=10)
    assert changed is not a
    assert changed.failure_threshold == 1


def test_get_breaker_reads_a_config_object() -> None:
    class Breaker:
        failure_threshold = 2
        reset_timeout = 7.0

    class Retry:
        deadline = 30.0

    class Config:
        breaker = Breaker()
        retry = Retry()
        cache = "default"

    breaker = get_breaker("primary", Config())  # type: ignore[arg-type]

    assert (breaker.failure_threshold, breaker.reset_timeout) == (2, 7.0)
    assert breaker.store is state.get_store("default")


def test_breakers_from_the_registry_share_state_through_the_cache() -> None:
    get_breaker("primary", failure_threshold=1).record_failure()
    state.reset()  # as if another process: fresh objects, same cache

    assert get_breaker("primary", failure_threshold=1).state is BreakerState.OPEN


def test_registry_breaker_transitions_send_the_signal_and_count_opens() -> None:
    from robust_mail import metrics

    received: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        received.append({"sender": sender, **kwargs})

    circuit_state_changed.connect(receiver)
    try:
        breaker = get_breaker("primary", failure_threshold=1, reset_timeout=0)
        breaker.record_failure()
        assert breaker.allow()
        breaker.record_success()
    finally:
        circuit_state_changed.disconnect(receiver)

    assert [(r["old_state"], r["new_state"]) for r in received] == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]
    assert all(r["provider"] == "primary" and r["sender"] is CircuitBreaker for r in received)
    assert metrics.snapshot()["primary"]["breaker_opened"] == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_is_not_stuck_on_locks_another_thread_held_at_fork() -> None:
    # Holding every process-wide lock of breakers, state, metrics and the dispatcher's
    # resolvers across fork() is what the child sees when another thread held them then.
    from robust_mail import metrics
    from robust_mail.breaker import MemoryStore
    from robust_mail.conf import DNSConfig
    from robust_mail.dispatch import resolver_for

    store = MemoryStore()
    cache_guard = CacheGuard("default")
    resolver = resolver_for(DNSConfig())

    def use_everything() -> None:
        get_breaker("forked", failure_threshold=2).record_failure()
        store.set("key", 1, None)
        cache_guard.call(_broken_cache, lambda: None)  # logs the outage under its lock
        metrics.incr("forked", "sent")
        resolver_for(DNSConfig()).resolve("localhost", ipv4_only=True)

    with (
        state._lock,
        store._lock,
        cache_guard._lock,
        metrics._known_lock,
        resolver._lock,
    ):
        status = in_child(use_everything)

    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _broken_cache(cache: Any) -> None:
    raise ConnectionError("cache down")


def test_a_half_open_trial_is_reserved_for_as_long_as_a_delivery_may_take(settings) -> None:
    from robust_mail.conf import get_config
    from robust_mail.state import get_breaker

    settings.ROBUST_MAIL = {
        "PROVIDERS": [{"NAME": "slow", "HOST": "127.0.0.1", "TIMEOUT": 20}],
        "RETRY": {"DEADLINE": 120},
        "CIRCUIT_BREAKER": {"RESET_TIMEOUT": 10},
    }

    breaker = get_breaker("slow", get_config())

    # Shorter, and a trial still under way would lose its reservation to a second one.
    assert breaker.trial_timeout == 120
