"""One contract, every OTP store: the database, the cache on LocMem, the cache on real Redis."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.core.cache import caches

from robust_mail.exceptions import RateLimited
from robust_mail.otp import OTPService, Reason
from robust_mail.otp_store import (
    CacheOTPStore,
    DatabaseOTPStore,
    IssueLimits,
    NewCode,
    OTPStore,
)
from tests.redis_server import redis_server
from tests.test_otp_support import Clock, close_cache

__all__ = ["redis_server"]  # the fixture

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
NO_LIMITS = IssueLimits(cooldown=0, per_hour=1000, per_day=1000, per_ip_per_hour=1000)


def live(store: OTPStore, code: NewCode, limits: IssueLimits = NO_LIMITS) -> str:
    """Add ``code`` and activate it, as the service does once its email has gone."""
    key = store.add(code, limits)
    store.activate(key)
    return key


def new(
    identifier: str = "a@example.com",
    purpose: str = "login",
    *,
    at: datetime = T0,
    ttl: int = 600,
    code_hash: str = "h" * 64,
    ip: str | None = None,
) -> NewCode:
    return NewCode(
        identifier=identifier,
        purpose=purpose,
        code_hash=code_hash,
        created_at=at,
        expires_at=at + timedelta(seconds=ttl),
        ip_address=ip,
    )


@pytest.fixture(params=["database", "cache-locmem", "cache-redis"])
def store(request: pytest.FixtureRequest, settings: Any) -> Iterator[OTPStore]:
    if request.param == "database":
        yield DatabaseOTPStore()
        return
    if request.param == "cache-locmem":
        yield CacheOTPStore("default")
        return
    redis = request.getfixturevalue("redis_server")
    settings.CACHES = {
        **settings.CACHES,
        "otp": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": redis.url},
    }
    try:
        yield CacheOTPStore("otp")
    finally:
        caches["otp"].clear()
        close_cache("otp")


pytestmark = [pytest.mark.django_db, pytest.mark.redis]


class TestStoreContract:
    def test_added_code_is_the_latest(self, store):
        key = live(store, new())

        latest = store.latest("a@example.com", "login")

        assert latest is not None
        assert (latest.key, latest.code_hash, latest.attempts) == (key, "h" * 64, 0)
        assert latest.expires_at == T0 + timedelta(seconds=600)
        assert store.latest("a@example.com", "password_reset") is None
        assert store.latest("b@example.com", "login") is None

    def test_newer_code_is_the_latest_and_activation_retires_older(self, store):
        old = live(store, new(code_hash="1" * 64))
        newer = live(store, new(at=T0 + timedelta(seconds=1), code_hash="2" * 64))

        assert store.latest("a@example.com", "login").key == newer
        store.withdraw(newer)

        # The older one was retired by activating the newer: nothing is live.
        assert store.latest("a@example.com", "login") is None
        assert not store.consume(old, T0)

    def test_a_pending_code_cannot_be_found_or_used_until_activated(self, store):
        # Its email is still being sent: nobody can have it, so nobody may try it, and
        # attempts on it would vanish with it if the email failed.
        old = live(store, new(code_hash="1" * 64))
        pending = store.add(new(at=T0 + timedelta(seconds=1), code_hash="2" * 64), NO_LIMITS)

        assert store.latest("a@example.com", "login").key == old
        assert not store.consume(pending, T0)

        store.activate(pending)

        assert store.latest("a@example.com", "login").key == pending
        assert store.consume(pending, T0)

    def test_invalidate_voids_a_code_whose_email_is_still_on_its_way(self, store):
        # A password change voids every code: one whose email is being sent must not
        # become usable once the send completes.
        pending = store.add(new(), NO_LIMITS)

        store.invalidate("a@example.com", "login")
        store.activate(pending)

        assert store.latest("a@example.com", "login") is None
        assert not store.consume(pending, T0)

    def test_a_voided_code_activated_late_leaves_the_newer_code_live(self, store):
        # Code A's email is slow; meanwhile its codes are voided (a password change) and
        # the user asks again: B is live when A's send finally completes.
        slow = store.add(new(code_hash="1" * 64), NO_LIMITS)
        store.invalidate("a@example.com", "login")
        newer = live(store, new(at=T0 + timedelta(seconds=1), code_hash="2" * 64))

        store.activate(slow)

        assert store.latest("a@example.com", "login").key == newer
        assert store.consume(newer, T0)

    def test_a_pending_code_alone_is_not_found(self, store):
        store.add(new(), NO_LIMITS)

        assert store.latest("a@example.com", "login") is None

    def test_the_code_activated_last_is_the_live_one(self, store):
        # Two codes whose emails crossed (the first send was slow): the last one sent works.
        first = store.add(new(code_hash="1" * 64), NO_LIMITS)
        second = store.add(new(at=T0 + timedelta(seconds=1), code_hash="2" * 64), NO_LIMITS)
        store.activate(second)
        store.activate(first)

        assert store.latest("a@example.com", "login").key == first
        assert not store.consume(second, T0)

    def test_withdrawing_before_activation_brings_the_older_code_back(self, store):
        old = store.add(new(code_hash="1" * 64), NO_LIMITS)
        store.activate(old)
        newer = store.add(new(at=T0 + timedelta(seconds=1), code_hash="2" * 64), NO_LIMITS)

        store.withdraw(newer)

        assert store.latest("a@example.com", "login").key == old

    def test_attempts_are_counted_up_to_the_maximum(self, store):
        key = live(store, new())

        counted = [store.count_attempt(key, 3) for _ in range(5)]

        assert counted == [True, True, True, False, False]
        assert store.latest("a@example.com", "login").attempts >= 3

    def test_consume_succeeds_once(self, store):
        key = live(store, new())

        assert store.consume(key, T0)
        assert not store.consume(key, T0)
        assert store.latest("a@example.com", "login") is None

    def test_expired_code_cannot_be_consumed(self, store):
        key = live(store, new(ttl=60))

        assert not store.consume(key, T0 + timedelta(seconds=60))

    def test_invalidate_retires_every_live_code(self, store):
        key = live(store, new())

        assert store.invalidate("a@example.com", "login") == 1
        assert store.latest("a@example.com", "login") is None
        assert not store.consume(key, T0)

    def test_cooldown_refuses_and_keeps_nothing(self, store):
        limits = IssueLimits(cooldown=60, per_hour=10, per_day=10, per_ip_per_hour=10)
        first = live(store, new(), limits)

        with pytest.raises(RateLimited) as refused:
            store.add(new(at=T0 + timedelta(seconds=10), code_hash="2" * 64), limits)

        assert 0 < refused.value.retry_after <= 60
        assert store.latest("a@example.com", "login").key == first

    def test_withdrawn_code_uses_up_no_limit(self, store):
        limits = IssueLimits(cooldown=60, per_hour=1, per_day=1, per_ip_per_hour=1)
        key = store.add(new(ip="192.0.2.1"), limits)

        store.withdraw(key)

        store.add(new(ip="192.0.2.1"), limits)

    def test_hourly_limit_per_identifier(self, store):
        limits = IssueLimits(cooldown=0, per_hour=2, per_day=10, per_ip_per_hour=10)
        store.add(new(purpose="login"), limits)
        store.add(new(purpose="password_reset"), limits)

        with pytest.raises(RateLimited):
            store.add(new(purpose="other"), limits)
        store.add(new("b@example.com"), limits)

    def test_ip_limit_spans_identifiers(self, store):
        limits = IssueLimits(cooldown=0, per_hour=10, per_day=10, per_ip_per_hour=2)
        store.add(new("a@example.com", ip="192.0.2.1"), limits)
        store.add(new("b@example.com", ip="192.0.2.1"), limits)

        with pytest.raises(RateLimited):
            store.add(new("c@example.com", ip="192.0.2.1"), limits)
        store.add(new("c@example.com", ip="192.0.2.2"), limits)

    def test_ip_limit_counts_an_ipv6_slash_64_as_one_address(self, store):
        limits = IssueLimits(cooldown=0, per_hour=10, per_day=10, per_ip_per_hour=2)
        store.add(new("a@example.com", ip="2001:db8:1:2::1"), limits)
        store.add(new("b@example.com", ip="2001:db8:1:2:ffff:ffff:ffff:fffe"), limits)

        # One host (one /64) picking a fresh address per request is still one address.
        with pytest.raises(RateLimited):
            store.add(new("c@example.com", ip="2001:db8:1:2:abcd::9"), limits)
        with pytest.raises(RateLimited):
            store.add(new("c@example.com", ip="2001:DB8:1:2:0:0:0:7"), limits)
        store.add(new("c@example.com", ip="2001:db8:1:3::1"), limits)  # the next /64

    def test_ip_limit_counts_ipv4_per_address(self, store):
        limits = IssueLimits(cooldown=0, per_hour=10, per_day=10, per_ip_per_hour=1)
        store.add(new("a@example.com", ip="192.0.2.1"), limits)

        with pytest.raises(RateLimited):
            store.add(new("b@example.com", ip="::ffff:192.0.2.1"), limits)  # the same, mapped
        store.add(new("b@example.com", ip="192.0.2.2"), limits)

    def test_service_works_end_to_end_on_the_store(self, store):
        otp = OTPService(store=store, clock=Clock(T0))
        code = str(otp.issue("a@example.com", send=False).code)
        wrong = "000000" if code != "000000" else "111111"

        assert otp.verify("a@example.com", wrong).reason is Reason.INVALID
        assert otp.verify("a@example.com", code).ok
        assert not otp.verify("a@example.com", code).ok


@pytest.fixture
def redis_store(redis_server: Any, settings: Any) -> Iterator[CacheOTPStore]:
    """A cache store on cache "otp", a real Redis."""
    settings.CACHES = {
        **settings.CACHES,
        "otp": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": redis_server.url,
        },
    }
    yield CacheOTPStore("otp")
    close_cache("otp")


def test_cache_store_consume_is_won_by_one_of_fifty_threads_on_redis(redis_store):
    store = redis_store
    key = live(store, new())
    barrier = threading.Barrier(50)
    results: list[bool] = []

    def work() -> None:
        try:
            barrier.wait()
            results.append(store.consume(key, T0))
        finally:
            close_cache("otp")

    threads = [threading.Thread(target=work) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    close_cache("otp")

    assert results.count(True) == 1 and len(results) == 50


def test_store_setting_picks_the_store(settings):
    settings.CACHES = {
        **settings.CACHES,
        "codes": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    }
    settings.ROBUST_MAIL = {
        "CACHE": "codes",
        "OTP": {"STORE": "robust_mail.otp_store.CacheOTPStore"},
    }

    store = OTPService().store

    assert isinstance(store, CacheOTPStore) and store.cache_alias == "codes"
    settings.ROBUST_MAIL = {}
    assert isinstance(OTPService().store, DatabaseOTPStore)


def test_cache_store_eviction_never_brings_a_used_or_replaced_code_back(redis_store, redis_server):
    # Redis under maxmemory evicts keys (volatile-lru: every key here has a TTL). Whatever
    # one key it loses, a code that was used, or replaced by a newer one, must stay dead:
    # losing a key may only lose a code.
    import redis as redis_client

    store = redis_store
    direct = redis_client.Redis.from_url(redis_server.url)

    def after_each_eviction(check: Any) -> None:
        for evicted in direct.keys("*"):
            saved, ttl = direct.dump(evicted), direct.pttl(evicted)
            direct.delete(evicted)
            check(evicted)
            direct.restore(evicted, max(ttl, 0), saved)

    def used_stays_used(evicted: bytes) -> None:
        assert not store.consume(used, T0), evicted
        assert store.latest("a@example.com", "login") is None, evicted

    def replaced_stays_replaced(evicted: bytes) -> None:
        assert not store.consume(replaced, T0), evicted
        latest = store.latest("a@example.com", "login")
        assert latest is None or latest.key == newer, evicted

    try:
        used = live(store, new())
        assert store.consume(used, T0)
        after_each_eviction(used_stays_used)

        replaced = live(store, new())
        newer = live(store, new())
        after_each_eviction(replaced_stays_replaced)
        assert store.latest("a@example.com", "login").key == newer  # type: ignore[union-attr]
    finally:
        direct.close()
