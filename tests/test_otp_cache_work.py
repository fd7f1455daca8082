"""Enumeration through the cache: a known and an unknown address cost Redis the same.

The SQL and the service's steps are compared in test_password_reset.py and
test_otp_auth.py; this compares what reaches the cache, counted by Redis itself
(``INFO commandstats``), so a round trip made on one path only shows up however it is made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from django.core.cache import caches

from robust_mail.auth_backends import send_login_code
from robust_mail.password_reset import PasswordResetService
from tests.redis_server import RedisServer, redis_server
from tests.test_otp_support import close_cache, mail_server

__all__ = ["mail_server", "redis_server"]  # the fixtures

pytestmark = [pytest.mark.django_db, pytest.mark.redis]

KNOWN = "alice@example.com"
UNKNOWN = "nobody@example.com"

FLOWS: dict[str, Callable[[str], object]] = {
    "password_reset": lambda email: PasswordResetService().initiate(email),
    "login_code": send_login_code,
}


@pytest.fixture
def shared_cache(redis_server: RedisServer, settings: Any) -> Iterator[redis.Redis]:
    """Django's default cache on a real Redis, and a client of our own to read its stats."""
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": redis_server.url,
        }
    }
    client = redis.Redis.from_url(redis_server.url)
    caches["default"].get("warm-up")  # connect now: the handshake is not the work measured
    try:
        yield client
    finally:
        client.close()
        close_cache("default")


def commands(client: redis.Redis, work: Callable[[], object]) -> dict[str, int]:
    """How many of each command Redis ran for ``work`` (our own CONFIG and INFO left out)."""
    client.config_resetstat()
    work()
    stats = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if not name.startswith(("cmdstat_config", "cmdstat_info"))
    }


@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("capped", [False, True], ids=["under-cap", "at-cap"])
def test_known_and_unknown_addresses_make_the_same_cache_calls(
    mail_server, shared_cache, django_user_model, flow, capped
):
    django_user_model.objects.create_user("alice", KNOWN, "a-password-1")
    mail_server(OTP={"MAX_NOTICES_PER_HOUR": 1})
    if capped:
        # What an attacker can do first: use up the notices with addresses of their own.
        FLOWS[flow]("flood@example.org")

    known = commands(shared_cache, lambda: FLOWS[flow](KNOWN))
    unknown = commands(shared_cache, lambda: FLOWS[flow](UNKNOWN))

    assert known == unknown
    assert known  # the notice counter is asked on both paths


@pytest.mark.parametrize("flow", FLOWS)
def test_an_address_whose_account_may_not_get_a_code_makes_the_same_cache_calls(
    mail_server, shared_cache, django_user_model, flow
):
    # An inactive account gets the notice, not a code, and the cache sees what it sees
    # for an account that gets its code.
    django_user_model.objects.create_user("alice", KNOWN, "a-password-1")
    django_user_model.objects.create_user("off", "off@example.com", "a-password-2", is_active=False)
    mail_server(OTP={"MAX_NOTICES_PER_HOUR": 1})

    known = commands(shared_cache, lambda: FLOWS[flow](KNOWN))
    inactive = commands(shared_cache, lambda: FLOWS[flow]("off@example.com"))

    assert inactive == known
    assert known  # the notice counter is asked on both paths
