"""System checks of the OTP helper: every id has a test (E020-E022, W021-W024; W020 in
test_ratelimit)."""

from __future__ import annotations

import pytest
from django.core.checks import run_checks

from robust_mail.otp_checks import check_otp, check_otp_limit_cache
from tests.conftest import needs_mailers


def _ids() -> set[str]:
    # databases=[]: on Django 6.1 the model checks would otherwise query the test database.
    return {m.id for m in run_checks(databases=[]) if m.id and m.id.startswith("robust_mail.")}


def test_default_settings_raise_no_otp_check():
    assert not {i for i in _ids() if i[-3:-1] == "02"}


def test_e020_short_secret(settings):
    settings.ROBUST_MAIL = {"OTP": {"SECRET": "too-short"}}

    (message,) = [m for m in check_otp() if m.id == "robust_mail.E020"]
    assert "token_urlsafe" in message.hint
    assert "too-short" not in message.msg  # never print the secret
    assert "robust_mail.E020" in _ids()


def test_long_secret_passes(settings):
    settings.ROBUST_MAIL = {"OTP": {"SECRET": "x" * 48}}

    assert check_otp() == []


def test_e021_missing_key_when_secret_is_none_and_secret_key_empty(settings):
    settings.SECRET_KEY = ""

    assert [m.id for m in check_otp()] == ["robust_mail.E021"]


def test_w022_secret_equal_to_secret_key(settings):
    settings.SECRET_KEY = "s" * 50
    settings.ROBUST_MAIL = {"OTP": {"SECRET": "s" * 50}}

    assert [m.id for m in check_otp()] == ["robust_mail.W022"]


def test_w023_short_codes(settings):
    settings.ROBUST_MAIL = {"OTP": {"LENGTH": 4}}

    assert [m.id for m in check_otp()] == ["robust_mail.W023"]


@pytest.mark.parametrize("length", [6, 8])
def test_six_or_more_characters_are_fine(settings, length):
    settings.ROBUST_MAIL = {"OTP": {"LENGTH": length}}

    assert check_otp() == []


def test_broken_configuration_is_left_to_the_core_checks(settings):
    settings.ROBUST_MAIL = {"OTP": {"LENGTH": "six"}}

    assert check_otp() == []


def test_e022_store_that_cannot_be_imported(settings):
    settings.ROBUST_MAIL = {"OTP": {"STORE": "robust_mail.nowhere.Store"}}

    assert [m.id for m in check_otp()] == ["robust_mail.E022"]


def test_w021_cache_store_on_a_per_process_cache_outside_debug(settings):
    settings.ROBUST_MAIL = {"OTP": {"STORE": "robust_mail.otp_store.CacheOTPStore"}}

    assert [m.id for m in check_otp()] == ["robust_mail.W021"]
    settings.DEBUG = True
    assert check_otp() == []


def test_cache_store_on_redis_is_fine(settings):
    settings.ROBUST_MAIL = {"OTP": {"STORE": "robust_mail.otp_store.CacheOTPStore"}}
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",
        }
    }

    assert check_otp() == []


DUMMY = {"default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}}
REDIS = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": "redis://127.0.0.1:1/0",
    }
}


@pytest.mark.parametrize("caches", [None, DUMMY], ids=["locmem", "dummy"])
def test_w024_otp_limits_in_an_unshared_cache_outside_debug(settings, caches):
    # The tests' default cache is LocMem: per process, like a deployment that forgot CACHES.
    if caches is not None:
        settings.CACHES = caches
    settings.ROBUST_MAIL = {"OTP": {}}

    (message,) = check_otp_limit_cache()
    assert message.id == "robust_mail.W024"
    assert "MAX_NOTICES_PER_HOUR" in message.msg and "RedisCache" in message.hint
    assert "robust_mail.W024" in _ids()
    settings.DEBUG = True
    assert check_otp_limit_cache() == []


def test_w024_when_codes_sign_users_in(settings):
    settings.AUTHENTICATION_BACKENDS = [
        "django.contrib.auth.backends.ModelBackend",
        "robust_mail.auth_backends.EmailCodeBackend",
    ]

    assert [m.id for m in check_otp_limit_cache()] == ["robust_mail.W024"]


def test_no_w024_without_otp_or_on_a_shared_cache(settings):
    assert check_otp_limit_cache() == []  # mail only: the OTP limits are not used
    settings.ROBUST_MAIL = {"OTP": {}}
    settings.CACHES = REDIS
    assert check_otp_limit_cache() == []


def test_no_w024_beside_w021_for_the_cache_store(settings):
    settings.ROBUST_MAIL = {"OTP": {"STORE": "robust_mail.otp_store.CacheOTPStore"}}

    assert "robust_mail.W021" in _ids()
    assert check_otp_limit_cache() == []


def test_e023_otp_mailer_must_be_a_robust_mailers_alias(settings):
    settings.ROBUST_MAIL = {"OTP": {"MAILER": "codes"}}
    settings.MAILERS = {"default": {"BACKEND": "django.core.mail.backends.locmem.EmailBackend"}}

    (error,) = [m for m in check_otp() if m.id == "robust_mail.E023"]

    assert "'codes'" in error.msg


@needs_mailers
@pytest.mark.django_db
def test_codes_go_through_the_otp_mailer_alias(smtp_server, settings):
    from robust_mail.models import OutboxMessage
    from robust_mail.otp import OTPService

    server = smtp_server()
    settings.ROBUST_MAIL = {"OTP": {"MAILER": "codes", "COOLDOWN": 0}}
    settings.MAILERS = {
        "default": {"BACKEND": "django.core.mail.backends.locmem.EmailBackend"},
        "codes": {
            "BACKEND": "robust_mail.backends.RobustEmailBackend",
            "OPTIONS": {"providers": [f"smtp://127.0.0.1:{server.port}?name=codes"]},
        },
    }
    assert [m.id for m in check_otp() if m.id == "robust_mail.E023"] == []

    OTPService().issue("alice@example.com", background=False)
    OTPService().issue("alice@example.com", background=True)

    assert len(server.messages) == 1  # not Django's default (locmem) mailer
    assert OutboxMessage.objects.get().mailer == "codes"
