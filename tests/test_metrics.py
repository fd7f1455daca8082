"""Shared counters, the latency histogram, and the Prometheus collector."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.core.cache import caches
from django.test import override_settings
from prometheus_client import CollectorRegistry, generate_latest

from robust_mail import metrics, state
from robust_mail.prometheus import register
from tests.conftest import needs_mailers

BROKEN_CACHE = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": "redis://127.0.0.1:1/0",
        "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
    }
}


def test_snapshot_is_empty_before_anything_happened() -> None:
    assert metrics.snapshot() == {}


def test_counters_add_up_per_provider() -> None:
    metrics.incr("primary", "sent")
    metrics.incr("primary", "sent")
    metrics.incr("primary", "refused_recipients", 3)
    metrics.incr("backup", "failed_over")

    snapshot = metrics.snapshot()

    assert set(snapshot) == {"primary", "backup"}
    assert snapshot["primary"]["sent"] == 2
    assert snapshot["primary"]["refused_recipients"] == 3
    assert snapshot["primary"]["failed"] == 0
    assert snapshot["backup"]["failed_over"] == 1
    assert set(metrics.COUNTERS) <= set(snapshot["primary"])


def test_snapshot_lists_named_providers_even_without_traffic() -> None:
    snapshot = metrics.snapshot(["idle"])

    assert snapshot["idle"]["sent"] == 0
    assert snapshot["idle"]["latency"]["count"] == 0


def test_unknown_counter_name_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="sent"):
        metrics.incr("primary", "snet")


def test_counters_live_in_the_shared_cache() -> None:
    metrics.incr("primary", "sent", 5)
    state.reset()  # another process: no in-memory state, same cache
    metrics._known.clear()

    assert metrics.snapshot()["primary"]["sent"] == 5
    assert caches["default"].get("robust_mail:metrics:primary:sent") == 5


def test_concurrent_increments_are_all_counted() -> None:
    def bump() -> None:
        for _ in range(250):
            metrics.incr("primary", "sent")

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert metrics.snapshot()["primary"]["sent"] == 2000


def test_counts_reach_the_cache_in_batches_and_snapshot_flushes_first() -> None:
    with metrics._flush_lock:  # hold the background flush off
        metrics.incr("primary", "sent")
        metrics.observe("primary", 0.02)
        assert caches["default"].get("robust_mail:metrics:primary:sent") is None

    snapshot = metrics.snapshot()

    assert snapshot["primary"]["sent"] == 1
    assert snapshot["primary"]["latency"]["count"] == 1
    assert caches["default"].get("robust_mail:metrics:primary:sent") == 1


def test_the_background_flush_writes_counts_without_being_asked() -> None:
    metrics.incr("primary", "sent", 7)

    for _ in range(200):  # the flusher runs every FLUSH_INTERVAL (1 s)
        if caches["default"].get("robust_mail:metrics:primary:sent") == 7:
            break
        threading.Event().wait(0.05)
    assert caches["default"].get("robust_mail:metrics:primary:sent") == 7


def test_reset_discards_counts_not_flushed_yet() -> None:
    with metrics._flush_lock:
        metrics.incr("primary", "sent")
    metrics.reset()

    assert metrics.snapshot() == {}


def test_latency_histogram_buckets_are_cumulative() -> None:
    for seconds in (0.003, 0.005, 0.04, 0.3, 0.3, 90.0):
        metrics.observe("primary", seconds)

    latency = metrics.snapshot()["primary"]["latency"]

    assert latency["count"] == 6
    assert latency["sum"] == pytest.approx(90.648)
    buckets = latency["buckets"]
    assert buckets["0.005"] == 2  # bounds are inclusive
    assert buckets["0.05"] == 3
    assert buckets["0.25"] == 3
    assert buckets["0.5"] == 5
    assert buckets["60"] == 5
    assert buckets["+Inf"] == 6
    assert list(buckets) == [format(b, "g") for b in metrics.BUCKETS] + ["+Inf"]


def test_percentile_is_the_upper_bound_of_the_bucket_holding_it() -> None:
    for _ in range(98):
        metrics.observe("primary", 0.02)
    metrics.observe("primary", 3.0)
    metrics.observe("primary", 100.0)
    latency = metrics.snapshot()["primary"]["latency"]

    assert metrics.percentile(latency, 0.5) == 0.025
    assert metrics.percentile(latency, 0.99) == 5.0
    assert metrics.percentile(latency, 1.0) == float("inf")
    assert metrics.percentile(metrics.snapshot(["none"])["none"]["latency"], 0.5) is None


def test_reset_zeroes_everything() -> None:
    metrics.incr("primary", "sent")
    metrics.observe("primary", 0.1)

    metrics.reset()

    assert metrics.snapshot() == {}
    assert metrics.snapshot(["primary"])["primary"]["sent"] == 0


def test_provider_names_with_spaces_and_colons_are_safe_keys() -> None:
    metrics.incr("eu west: backup", "sent")

    assert metrics.snapshot()["eu west: backup"]["sent"] == 1


@override_settings(CACHES=BROKEN_CACHE)
def test_metrics_never_raise_when_the_cache_is_down() -> None:
    metrics.incr("primary", "sent")
    metrics.incr("primary", "sent")
    metrics.observe("primary", 0.2)

    snapshot = metrics.snapshot()

    assert snapshot["primary"]["sent"] == 2  # counted in this process
    assert snapshot["primary"]["latency"]["count"] == 1
    metrics.reset()


def test_metrics_use_the_configured_cache(settings: Any) -> None:
    # Both through the settings fixture: mixing it with an @override_settings decorator
    # restores them out of order and leaks CACHE="metrics" into every later test.
    settings.ROBUST_MAIL = {"CACHE": "metrics"}
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "metrics": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": "metrics",
        },
    }
    metrics.incr("primary", "sent")
    metrics.flush()  # counts reach the cache in batches (snapshot() flushes by itself)

    assert caches["metrics"].get("robust_mail:metrics:primary:sent") == 1
    assert caches["default"].get("robust_mail:metrics:primary:sent") is None


def test_prometheus_collector_exports_conventional_names() -> None:
    metrics.incr("primary", "sent", 4)
    metrics.incr("primary", "failed")
    metrics.observe("primary", 0.02)
    registry = CollectorRegistry()
    register(registry)

    text = generate_latest(registry).decode()

    assert 'robust_mail_messages_sent_total{provider="primary"} 4.0' in text
    assert 'robust_mail_send_failures_total{provider="primary"} 1.0' in text
    assert 'robust_mail_retries_total{provider="primary"} 0.0' in text
    assert 'robust_mail_send_duration_seconds_bucket{le="0.025",provider="primary"} 1.0' in text
    assert 'robust_mail_send_duration_seconds_count{provider="primary"} 1.0' in text
    assert "# TYPE robust_mail_messages_sent_total counter" in text


def test_registering_the_collector_twice_is_refused_not_exported_twice() -> None:
    # describe() gave no names, so the registry could not see the duplicate and every
    # series appeared twice in a scrape, which Prometheus rejects.
    registry = CollectorRegistry()
    register(registry)

    with pytest.raises(ValueError, match="Duplicated timeseries"):
        register(registry)
    text = generate_latest(registry).decode()
    assert text.count("# TYPE robust_mail_messages_sent_total counter") == 1


def test_prometheus_collector_reports_breaker_states(robust: Any) -> None:
    robust(providers=["smtp://127.0.0.1:1?name=primary", "smtp://127.0.0.1:2?name=backup"])
    from robust_mail.conf import get_config

    state.get_breaker("primary", get_config()).trip()
    registry = CollectorRegistry()
    register(registry)

    text = generate_latest(registry).decode()

    assert 'robust_mail_breaker_state{provider="primary"} 1.0' in text
    assert 'robust_mail_breaker_state{provider="backup"} 0.0' in text
    assert 'robust_mail_messages_sent_total{provider="backup"} 0.0' in text


def test_a_message_left_to_the_fallback_is_counted(smtp_server: Any, robust: Any) -> None:
    from django.core.mail import send_mail

    from tests.conftest import provider

    first, last = smtp_server("refuse"), smtp_server("refuse")
    robust(
        [provider(first, "first"), provider(last, "last")],
        FALLBACK="console",
        RETRY={"ATTEMPTS": 1},
    )

    assert send_mail("s", "b", "f@example.com", ["t@example.com"]) == 1

    snapshot = metrics.snapshot()
    assert snapshot["last"]["fallback"] == 1
    assert snapshot["first"]["fallback"] == 0


MAILERS = {
    "default": {
        "BACKEND": "robust_mail.backends.RobustEmailBackend",
        "OPTIONS": {"providers": ["smtp://127.0.0.1:1?name=a"]},
    },
    "bulk": {
        "BACKEND": "robust_mail.backends.OutboxEmailBackend",
        "OPTIONS": {"providers": ["smtp://127.0.0.1:2?name=b"]},
    },
}


@needs_mailers
def test_prometheus_reports_the_breakers_of_every_mailers_alias(settings: Any) -> None:
    from robust_mail.outbox_delivery import delivery_config

    settings.MAILERS = MAILERS
    state.get_breaker("b", delivery_config("bulk")).trip()
    registry = CollectorRegistry()
    register(registry)

    text = generate_latest(registry).decode()

    assert 'robust_mail_breaker_state{provider="a"} 0.0' in text
    assert 'robust_mail_breaker_state{provider="b"} 1.0' in text
