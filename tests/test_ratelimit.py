"""Rate limits: parsing, fixed windows with an injected clock, real Redis, and W020."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest
from django.core.cache import caches
from django.core.cache.backends.locmem import LocMemCache
from django.core.checks import run_checks
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from robust_mail.conf import RateLimitConfig
from robust_mail.exceptions import RateLimited
from robust_mail.ratelimit import Rate, RateLimiter, check_message_rates, parse_rate
from robust_mail.state import shared_incr
from tests.conftest import needs_mailers, provider
from tests.redis_server import redis_server
from tests.test_otp_support import close_cache

__all__ = ["redis_server"]  # the fixture


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("100/h", Rate(100, 3600)),
        ("5/s", Rate(5, 1)),
        ("10/m", Rate(10, 60)),
        ("1000/d", Rate(1000, 86400)),
        (" 7 / h ", Rate(7, 3600)),
    ],
)
def test_parse_rate(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "100", "0/h", "-1/h", "10/w", "h/10", "1.5/h", "10/5m"])
def test_parse_rate_rejects_other_forms(text):
    with pytest.raises(ValueError, match=r"N/s, N/m, N/h or N/d|at least 1"):
        parse_rate(text)


def test_limiter_allows_up_to_the_limit_then_says_when_to_retry():
    clock = Clock(7200.0 + 600)  # 600 s into an hour window
    limiter = RateLimiter("default", clock=clock)
    rate = parse_rate("3/h")

    hits = [limiter.hit("k", rate) for _ in range(3)]
    with pytest.raises(RateLimited) as refused:
        limiter.hit("k", rate)

    assert [h.count for h in hits if h] == [1, 2, 3]
    assert refused.value.retry_after == pytest.approx(3000)


def test_new_window_starts_a_new_count():
    clock = Clock(0.0)
    limiter = RateLimiter("default", clock=clock)
    rate = parse_rate("1/m")
    limiter.hit("k", rate)

    clock.now = 60.0

    assert limiter.hit("k", rate).count == 1


def test_refused_hits_are_not_counted_and_released_hits_are_given_back():
    limiter = RateLimiter("default", clock=Clock(0.0))
    rate = parse_rate("2/h")
    first = limiter.hit("k", rate)
    limiter.hit("k", rate)
    for _ in range(5):
        with pytest.raises(RateLimited):
            limiter.hit("k", rate)

    limiter.release(first)

    assert limiter.hit("k", rate).count == 2


def test_keys_are_separate_and_hashed():
    limiter = RateLimiter("default", clock=Clock(0.0))
    rate = parse_rate("1/h")
    limiter.hit("rcpt:a@example.com", rate)
    limiter.hit("rcpt:b@example.com", rate)

    key, _ = limiter.cache_key("rcpt:a@example.com", rate, 0.0)
    assert "example.com" not in key


def test_message_rates_count_messages_and_each_recipient_case_insensitively():
    config = RateLimitConfig(global_rate="3/h", per_recipient="1/h")
    clock = Clock(0.0)

    check_message_rates(["A@example.com", "a@example.com "], config, "default", clock=clock)
    with pytest.raises(RateLimited):
        check_message_rates(["a@EXAMPLE.com"], config, "default", clock=clock)
    check_message_rates(["b@example.com"], config, "default", clock=clock)
    check_message_rates(["c@example.com"], config, "default", clock=clock)
    with pytest.raises(RateLimited) as refused:
        check_message_rates(["d@example.com"], config, "default", clock=clock)

    assert refused.value.retry_after == pytest.approx(3600)


def test_a_refused_message_uses_up_no_limit():
    config = RateLimitConfig(global_rate="2/h", per_recipient="1/h")
    clock = Clock(0.0)
    check_message_rates(["a@example.com"], config, "default", clock=clock)

    with pytest.raises(RateLimited):
        check_message_rates(["b@example.com", "a@example.com"], config, "default", clock=clock)

    # The refusal counted neither the global limit nor b@.
    check_message_rates(["b@example.com"], config, "default", clock=clock)


class RecordingCache(LocMemCache):
    """LocMem that notes every key it increments (``incr`` and ``decr`` alike)."""

    incremented: ClassVar[list[str]] = []

    def incr(self, key: str, delta: int = 1, version: int | None = None) -> int:
        type(self).incremented.append(key)
        return super().incr(key, delta, version)


def test_a_recipient_over_its_limit_never_takes_a_global_slot(settings):
    # Counted GLOBAL first and given back after the recipient refused, the slot was held
    # meanwhile: a flood at one address got other people's mail refused near the limit.
    settings.CACHES = {**settings.CACHES, "rec": {"BACKEND": f"{__name__}.RecordingCache"}}
    config = RateLimitConfig(global_rate="100/h", per_recipient="1/h")
    clock = Clock(0.0)
    check_message_rates(["a@example.com"], config, "rec", clock=clock)
    global_key, _ = RateLimiter("rec").cache_key("global", parse_rate("100/h"), 0.0)
    RecordingCache.incremented.clear()

    with pytest.raises(RateLimited):
        check_message_rates(["a@example.com"], config, "rec", clock=clock)

    assert RecordingCache.incremented
    assert not [key for key in RecordingCache.incremented if global_key in key]


def test_a_window_counter_outlives_its_window_by_a_minute():
    # Expiring a second after the window let a host whose clock is a few seconds behind
    # create the same window's counter again from 0: 3N through around a boundary.
    limiter = RateLimiter("default")
    hit = limiter.hit("skew", parse_rate("5/s"))
    assert hit is not None
    expires_at = caches["default"]._expire_info[caches["default"].make_key(hit.cache_key)]

    assert expires_at - time.time() >= 60
    assert hit.kept_after == 60


@pytest.mark.django_db
def test_counters_keep_their_expiry_on_the_database_cache(settings):
    # Django's generic incr (database and file caches) re-sets the key with the cache's
    # default TIMEOUT (300 s): a daily limit, and metrics counters, vanished after 5 min.
    settings.CACHES = {
        **settings.CACHES,
        "dbc": {"BACKEND": "django.core.cache.backends.db.DatabaseCache", "LOCATION": "rl_c"},
    }
    call_command("createcachetable", "--database", "default", verbosity=0)
    cache = caches["dbc"]
    hit = RateLimiter("dbc").hit("daily", parse_rate("3/d"))
    assert hit is not None
    shared_incr(cache, "metric", 1, None)
    shared_incr(cache, "metric", 1, None)

    with connection.cursor() as cursor:
        cursor.execute("SELECT cache_key, expires FROM rl_c")
        # As DatabaseCache reads them back: naive UTC on SQLite.
        expires = {k: v if v.tzinfo else v.replace(tzinfo=UTC) for k, v in cursor.fetchall()}
    now = timezone.now()
    day_ends = datetime.fromtimestamp(hit.resets_at, UTC)
    assert expires[cache.make_key(hit.cache_key)] >= day_ends  # not now + 300 s
    assert expires[cache.make_key("metric")] > now + timedelta(days=365)  # never expires
    assert cache.get("metric") == 2


@pytest.mark.parametrize("fail_open", [True, False])
def test_the_dummy_cache_turns_limits_off(settings, fail_open):
    # It keeps nothing: every count vanished and the limiter raised a private error.
    settings.CACHES = {
        **settings.CACHES,
        "dummy": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"},
    }
    limiter = RateLimiter("dummy", fail_open=fail_open)

    assert [limiter.hit("k", parse_rate("1/h")) for _ in range(3)] == [None] * 3


def test_no_limits_configured_counts_nothing():
    assert check_message_rates(["a@example.com"], RateLimitConfig(), "default") == []


# --- real Redis --------------------------------------------------------------------------


@pytest.fixture
def redis_cache(redis_server: Any, settings: Any) -> Iterator[str]:
    settings.CACHES = {
        **settings.CACHES,
        "shared": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": redis_server.url,
        },
    }
    try:
        yield "shared"
    finally:
        close_cache("shared")


@pytest.mark.redis
def test_windows_on_real_redis(redis_cache):
    clock = Clock(3600.0 * 10)
    limiter = RateLimiter(redis_cache, clock=clock)
    rate = parse_rate("2/h")
    limiter.hit("k", rate)
    limiter.hit("k", rate)
    with pytest.raises(RateLimited):
        limiter.hit("k", rate)

    clock.now += 3600

    assert limiter.hit("k", rate).count == 1


@pytest.mark.redis
def test_counters_on_real_redis_are_shared_by_every_limiter(redis_cache):
    """Two limiters stand for two processes: they share one count."""
    clock = Clock(0.0)
    one = RateLimiter(redis_cache, clock=clock)
    two = RateLimiter(redis_cache, clock=clock)
    rate = parse_rate("3/m")

    one.hit("k", rate)
    two.hit("k", rate)
    one.hit("k", rate)

    with pytest.raises(RateLimited):
        two.hit("k", rate)


@pytest.mark.redis
def test_concurrent_hits_on_real_redis_never_exceed_the_limit(redis_cache):
    import threading

    limiter = RateLimiter(redis_cache, clock=Clock(0.0))
    rate = parse_rate("10/h")
    allowed: list[bool] = []
    barrier = threading.Barrier(40)

    def work() -> None:
        barrier.wait()
        try:
            limiter.hit("k", rate)
            allowed.append(True)
        except RateLimited:
            allowed.append(False)
        finally:
            close_cache(redis_cache)

    threads = [threading.Thread(target=work) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert allowed.count(True) == 10 and len(allowed) == 40


@pytest.mark.redis
@pytest.mark.django_db
def test_dispatcher_defers_mail_over_the_global_limit_on_real_redis(
    redis_cache, smtp_server, robust
):
    from django.core.mail import send_mail

    server = smtp_server()
    robust([provider(server, "only")], CACHE=redis_cache, RATE_LIMITS={"GLOBAL": "2/h"})

    send_mail("s", "b", "f@example.com", ["a@example.com"])
    send_mail("s", "b", "f@example.com", ["b@example.com"])
    with pytest.raises(RateLimited):
        send_mail("s", "b", "f@example.com", ["c@example.com"])

    assert len(server.messages) == 2


# --- W020 --------------------------------------------------------------------------------


def _ids() -> set[str]:
    # databases=[]: on Django 6.1 the model checks would otherwise query the test database.
    return {m.id for m in run_checks(databases=[]) if m.id and m.id.startswith("robust_mail.")}


@pytest.mark.parametrize(
    "backend",
    [
        "django.core.cache.backends.locmem.LocMemCache",
        "django.core.cache.backends.db.DatabaseCache",
        "django.core.cache.backends.filebased.FileBasedCache",
        "django.core.cache.backends.dummy.DummyCache",
    ],
)
def test_w020_warns_about_per_process_or_racy_caches_outside_debug(settings, backend):
    settings.CACHES = {"default": {"BACKEND": backend, "LOCATION": "/tmp/robust-mail-w020"}}
    settings.ROBUST_MAIL = {"RATE_LIMITS": {"GLOBAL": "100/h"}}

    assert "robust_mail.W020" in _ids()


def test_w020_is_quiet_with_redis_in_debug_or_without_limits(settings):
    settings.ROBUST_MAIL = {"RATE_LIMITS": {"GLOBAL": "100/h"}}
    settings.DEBUG = True
    assert "robust_mail.W020" not in _ids()

    settings.DEBUG = False
    settings.ROBUST_MAIL = {}
    assert "robust_mail.W020" not in _ids()

    settings.ROBUST_MAIL = {"RATE_LIMITS": {"PER_RECIPIENT": "5/h"}}
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",
        }
    }
    assert "robust_mail.W020" not in _ids()


@pytest.mark.parametrize(
    ("address", "bucket"),
    [
        ("192.0.2.1", "192.0.2.1"),
        (" 192.0.2.1 ", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::"),
        ("2001:DB8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::"),
        ("2001:db8::1", "2001:db8::"),
        ("fe80::1%eth0", "fe80::"),
        ("::1", "::"),
        ("", None),
        (None, None),
    ],
)
def test_ip_bucket_is_the_ipv4_address_or_the_ipv6_slash_64(address, bucket):
    from robust_mail.ratelimit import ip_bucket

    assert ip_bucket(address) == bucket


def test_ip_bucket_keeps_what_is_not_an_address():
    from robust_mail.ratelimit import ip_bucket

    # Not ours to judge (a test client's "testserver", say): kept as the key it was.
    assert ip_bucket("unknown") == "unknown"


def test_a_dead_cache_is_not_asked_again_for_every_message(settings, monkeypatch):
    # Blackholed, each ask would cost the socket timeout: after one failure the limiter
    # lets mail through without asking until the cache's guard probes it again.
    from robust_mail import state

    settings.CACHES = {
        **settings.CACHES,
        "dead": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",
            "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
        },
    }
    state.reset()
    asked: list[str] = []
    incr = RateLimiter._incr

    def counting(self: RateLimiter, *args: Any, **kwargs: Any) -> int:
        asked.append(self.cache_alias)
        return incr(self, *args, **kwargs)

    monkeypatch.setattr(RateLimiter, "_incr", counting)
    config = RateLimitConfig(global_rate="1/h", per_recipient="1/h")
    try:
        for _ in range(5):
            assert check_message_rates(["a@example.com"], config, "dead") == []
    finally:
        close_cache("dead")
        state.reset()

    assert asked == ["dead"]


@pytest.mark.django_db
def test_a_message_no_provider_took_gives_its_hits_back(smtp_server, robust):
    from django.core.mail import send_mail

    from robust_mail.models.outbox import OutboxMessage
    from robust_mail.worker import Worker

    server = smtp_server("refuse")
    robust([provider(server, "only")], FALLBACK="outbox", RATE_LIMITS={"GLOBAL": "2/h"})
    send_mail("s", "b", "f@example.com", ["a@example.com"])  # provider down: queued
    assert OutboxMessage.objects.get().status == "queued"

    server.mode = "accept"
    Worker(once=True, report=lambda line: None).run()  # sent now: counted once, here
    send_mail("s", "b", "f@example.com", ["b@example.com"])  # the second of 2/h

    assert len(server.messages) == 2
    with pytest.raises(RateLimited):  # a third would be over the limit: it was counted
        send_mail("s", "b", "f@example.com", ["c@example.com"])


@pytest.mark.parametrize(("mode", "counted"), [("accept", True), ("rcpt_550", False)])
def test_a_sent_message_stays_counted_and_a_refused_one_does_not(
    smtp_server, robust, mode, counted
):
    from django.core.mail import EmailMessage

    server = smtp_server(mode)
    robust([provider(server, "only")], RATE_LIMITS={"PER_RECIPIENT": "1/h"})
    EmailMessage("s", "b", "f@example.com", ["a@example.com"]).send(fail_silently=True)

    again = EmailMessage("s", "b", "f@example.com", ["a@example.com"])
    again.send(fail_silently=True)

    assert again.delivery_result.rate_limited is counted


def test_messages_a_stopped_run_left_alone_give_their_hits_back(smtp_server, robust):
    from django.core.mail import EmailMessage

    from robust_mail.conf import get_config
    from robust_mail.dispatch import Dispatcher

    server = smtp_server()
    robust([provider(server, "only")], RATE_LIMITS={"GLOBAL": "2/h"})
    batch = [(EmailMessage("s", "b", "f@example.com", [f"{n}@example.com"]), None) for n in "ab"]

    left = Dispatcher(get_config()).deliver_many(batch, proceed=lambda: False)

    assert left == [None, None] and server.messages == []
    sent = Dispatcher(get_config()).deliver_many(batch)  # the whole 2/h is still there
    assert [r.status for r in sent] == ["sent", "sent"]


@pytest.mark.django_db
def test_fail_silently_with_the_outbox_fallback_queues_a_message_over_the_limit(
    smtp_server, robust
):
    from django.core.mail import send_mail

    from robust_mail.models.outbox import OutboxMessage

    server = smtp_server()
    robust([provider(server, "only")], FALLBACK="outbox", RATE_LIMITS={"GLOBAL": "1/h"})
    send_mail("s", "b", "f@example.com", ["a@example.com"])

    with pytest.raises(RateLimited):  # a caller that can handle it is told
        send_mail("s", "b", "f@example.com", ["b@example.com"])
    # fail_silently=True (as AdminEmailHandler sends): the caller cannot; it is queued.
    assert send_mail("error report", "b", "f@example.com", ["c@example.com"], fail_silently=True)

    (row,) = OutboxMessage.objects.all()
    assert row.subject == "error report" and row.status == "queued"
    # No provider failed: nothing for the "every provider is down" alert to count.
    from robust_mail import metrics

    assert all(counts["fallback"] == 0 for counts in metrics.snapshot().values())
    assert row.next_attempt_at > row.created_at  # not before the window reopens
    assert len(server.messages) == 1


@needs_mailers
def test_w020_is_checked_for_every_mailers_alias_and_names_its_cache_setting(settings):
    settings.DEBUG = False
    settings.MAILERS = {
        "bulk": {
            "BACKEND": "robust_mail.backends.OutboxEmailBackend",
            "OPTIONS": {
                "providers": ["smtp://127.0.0.1:2525?name=b"],
                "rate_limits": {"global": "10/h"},
            },
        }
    }

    (warning,) = [m for m in run_checks(tags=["robust_mail"]) if m.id == "robust_mail.W020"]

    assert "MAILERS['bulk']['OPTIONS']['cache']" in warning.hint


@pytest.mark.parametrize("limit", [{"GLOBAL": "1/h"}, {"PER_RECIPIENT": "1/h"}], ids=str)
def test_two_messages_sharing_a_message_id_are_each_counted(smtp_server, robust, limit):
    from django.core.mail import EmailMessage, get_connection

    server = smtp_server()
    robust([provider(server, "only")], RATE_LIMITS=limit)
    same = {"Message-ID": "<same@example.com>"}
    batch = [EmailMessage("s", "b", "f@example.com", ["a@example.com"], headers=same)] * 2

    get_connection(fail_silently=True).send_messages(batch)  # the second is over the limit
    third = EmailMessage("s", "b", "f@example.com", ["a@example.com"])
    third.send(fail_silently=True)

    assert len(server.messages) == 1
    assert third.delivery_result.rate_limited  # the one sent stayed counted


@pytest.mark.django_db
def test_email_service_fail_silently_queues_a_message_over_the_limit(smtp_server, robust):
    from robust_mail.models.outbox import OutboxMessage
    from robust_mail.service import EmailService

    server = smtp_server()
    robust([provider(server, "only")], FALLBACK="outbox", RATE_LIMITS={"GLOBAL": "1/h"})
    assert EmailService.send_email("first", "b", ["a@example.com"])

    assert EmailService.send_email("second", "b", ["b@example.com"], fail_silently=True)

    assert OutboxMessage.objects.get().subject == "second"
    with pytest.raises(RateLimited):  # without fail_silently the caller is told
        EmailService.send_email("third", "b", ["c@example.com"])


@needs_mailers
def test_each_mailers_alias_counts_its_own_limits_in_a_shared_cache(smtp_server, settings):
    from django.core.mail import send_mail

    server = smtp_server()
    limited = {
        "providers": [f"smtp://127.0.0.1:{server.port}?name=p"],
        "rate_limits": {"global": "1/h"},
    }
    settings.MAILERS = {
        alias: {"BACKEND": "robust_mail.backends.RobustEmailBackend", "OPTIONS": limited}
        for alias in ("default", "bulk")
    }

    send_mail("s", "b", "f@example.com", ["a@example.com"])  # default's one message
    send_mail("s", "b", "f@example.com", ["a@example.com"], using="bulk")  # bulk's own

    assert len(server.messages) == 2
    with pytest.raises(RateLimited):
        send_mail("s", "b", "f@example.com", ["a@example.com"], using="bulk")
