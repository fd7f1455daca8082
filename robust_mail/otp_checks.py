"""System checks for one-time passwords and rate limits (ids E020-E029, W020-W029).

Ids are stable and never reused:

- ``robust_mail.E020`` OTP ``SECRET`` is set but shorter than 32 characters.
- ``robust_mail.E021`` no key for codes: ``SECRET`` is None and ``SECRET_KEY`` is empty.
- ``robust_mail.E022`` the OTP ``STORE`` (when conf.py has one) cannot be imported.
- ``robust_mail.E023`` the OTP ``MAILER`` is not a MAILERS alias served by robust_mail.
- ``robust_mail.W020`` rate limits are on, DEBUG is off, and the cache that counts them is
  per-process or not atomic (LocMem, database, file, dummy).
- ``robust_mail.W021`` the cache OTP store is used with such a cache.
- ``robust_mail.W022`` OTP ``SECRET`` equals ``SECRET_KEY`` (one leak then exposes both).
- ``robust_mail.W023`` codes shorter than 6 characters.
- ``robust_mail.W024`` OTP is in use (an ``OTP`` section in ``ROBUST_MAIL``, or
  ``EmailCodeBackend`` in ``AUTHENTICATION_BACKENDS``) with another store than the cache
  store, DEBUG is off, and the ``CACHE`` that counts code attempts per IP address and
  ``MAX_NOTICES_PER_HOUR`` is dummy (nothing is counted) or LocMem (per process).

A configuration that does not even read is reported by ``checks.py`` (E001-E019); these
checks then stay quiet rather than repeat it.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register
from django.utils.module_loading import import_string

from robust_mail.conf import RobustMailConfig, mailers_setting, read_config, setting_label
from robust_mail.mailers import delivering_configurations, robust_mailers

__all__ = ["check_otp", "check_otp_limit_cache", "check_rate_limit_cache"]

MIN_SECRET_LENGTH = 32

#: Cache backends whose counters are per process (LocMem), lost (dummy) or not atomic.
WEAK_CACHES = {
    "django.core.cache.backends.locmem.LocMemCache": "per process",
    "django.core.cache.backends.db.DatabaseCache": "not atomic",
    "django.core.cache.backends.filebased.FileBasedCache": "not atomic",
    "django.core.cache.backends.dummy.DummyCache": "a no-op",
}


def _config() -> RobustMailConfig | None:
    try:
        return read_config()[0]
    except Exception:  # a broken settings module is someone else's error to report
        return None


def _weak_cache(alias: str) -> str | None:
    backend = str(settings.CACHES.get(alias, {}).get("BACKEND", ""))
    return WEAK_CACHES.get(backend)


#: Caches on which the OTP limits kept in ``CACHE`` do not hold at all across processes.
UNSHARED_CACHES = {
    "django.core.cache.backends.locmem.LocMemCache": "per process",
    "django.core.cache.backends.dummy.DummyCache": "a no-op",
}

EMAIL_CODE_BACKEND = "robust_mail.auth_backends.EmailCodeBackend"


def _secret_key() -> str:
    try:
        return str(settings.SECRET_KEY or "")
    except Exception:  # Django raises ImproperlyConfigured for an empty SECRET_KEY
        return ""


@register("robust_mail")
def check_otp(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    config = _config()
    if config is None:
        return []
    otp = config.otp
    messages: list[CheckMessage] = []
    if otp.secret is not None and len(otp.secret) < MIN_SECRET_LENGTH:
        messages.append(
            Error(
                f"ROBUST_MAIL['OTP']['SECRET'] is shorter than {MIN_SECRET_LENGTH} characters.",
                hint="Use a long random value from the environment, e.g. "
                "python -c 'import secrets; print(secrets.token_urlsafe(48))', "
                "or None to derive the key from SECRET_KEY.",
                id="robust_mail.E020",
            )
        )
    if otp.secret is None and not _secret_key():
        messages.append(
            Error(
                "One-time codes have no key: OTP SECRET is None and SECRET_KEY is empty.",
                hint="Set SECRET_KEY, or ROBUST_MAIL['OTP']['SECRET'].",
                id="robust_mail.E021",
            )
        )
    if otp.secret is not None and otp.secret == _secret_key():
        messages.append(
            Warning(
                "ROBUST_MAIL['OTP']['SECRET'] is the same as SECRET_KEY.",
                hint="Leave SECRET as None (a separate key is derived from SECRET_KEY) "
                "or give it its own value.",
                id="robust_mail.W022",
            )
        )
    if otp.length < 6:
        messages.append(
            Warning(
                f"One-time codes are only {otp.length} characters long.",
                hint="Use LENGTH 6 or more: with 3 attempts a 4-digit code is guessed "
                "once in about 3,300 tries.",
                id="robust_mail.W023",
            )
        )
    messages += _check_otp_mailer(otp.mailer)
    store = getattr(otp, "store", None)
    if store:
        try:
            store_class = import_string(store)
        except ImportError as exc:
            messages.append(
                Error(
                    f"ROBUST_MAIL['OTP']['STORE'] {store!r} cannot be imported: {exc}",
                    hint="Use robust_mail.otp_store.DatabaseOTPStore or CacheOTPStore.",
                    id="robust_mail.E022",
                )
            )
        else:
            from robust_mail.otp_cache_store import CacheOTPStore

            weak = _weak_cache(config.cache)
            if (
                isinstance(store_class, type)
                and issubclass(store_class, CacheOTPStore)
                and weak
                and not settings.DEBUG
            ):
                messages.append(
                    Warning(
                        f"The cache OTP store uses cache {config.cache!r}, which is {weak}.",
                        hint="Point ROBUST_MAIL['CACHE'] at Redis or memcached, "
                        "or use DatabaseOTPStore.",
                        id="robust_mail.W021",
                    )
                )
    return messages


def _otp_in_use() -> bool:
    # Codes can be issued without either sign (PasswordResetService with the defaults):
    # docs/otp.md tells those projects to add "OTP": {} so that this check runs.
    configured = getattr(settings, "ROBUST_MAIL", None)
    if isinstance(configured, dict) and "OTP" in configured:
        return True
    for dotted in getattr(settings, "AUTHENTICATION_BACKENDS", []):
        try:
            backend = import_string(dotted)
        except ImportError:
            continue  # Django's own checks report it
        # By name: importing auth_backends here would pull in the admin's forms for
        # projects that only use ModelBackend.
        names = {f"{cls.__module__}.{cls.__qualname__}" for cls in getattr(backend, "__mro__", ())}
        if EMAIL_CODE_BACKEND in names:
            return True
    return False


def _uses_cache_store(otp: Any) -> bool:
    from robust_mail.otp_cache_store import CacheOTPStore

    try:
        store = import_string(otp.store) if getattr(otp, "store", None) else None
    except ImportError:
        return False  # E022
    return isinstance(store, type) and issubclass(store, CacheOTPStore)


def _check_otp_mailer(mailer: str | None) -> list[CheckMessage]:
    if mailer is None:
        return []
    served = dict(robust_mailers())
    if mailer in served:
        return []
    why = (
        "MAILERS is not set (it arrived in Django 6.1)"
        if mailers_setting() is None
        else "it is not a MAILERS alias with robust_mail's backend (codes are queued "
        "through it, which only robust_mail's backends can do)"
    )
    return [
        Error(
            f"ROBUST_MAIL['OTP']['MAILER'] is {mailer!r}, but {why}.",
            hint=f"Name one of {sorted(served)}, or leave MAILER as None."
            if served
            else "Leave MAILER as None.",
            id="robust_mail.E023",
        )
    ]


@register("robust_mail")
def check_otp_limit_cache(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    config = _config()
    if config is None or settings.DEBUG or not _otp_in_use():
        return []
    backend = str(settings.CACHES.get(config.cache, {}).get("BACKEND", ""))
    unshared = UNSHARED_CACHES.get(backend)
    # With the cache store, W021 already says the cache is unfit, for more than this.
    if unshared is None or _uses_cache_store(config.otp):
        return []
    return [
        Warning(
            f"One-time codes count attempts per IP address and MAX_NOTICES_PER_HOUR in "
            f"cache {config.cache!r}, which is {unshared}: those limits do not hold "
            "across processes.",
            hint="Point ROBUST_MAIL['CACHE'] at a shared cache with atomic increments "
            "(django.core.cache.backends.redis.RedisCache or memcached).",
            id="robust_mail.W024",
        )
    ]


@register("robust_mail")
def check_rate_limit_cache(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    if settings.DEBUG:
        return []
    messages: list[CheckMessage] = []
    # ROBUST_MAIL's limits, and each MAILERS alias's: each counts in its own CACHE.
    for alias, config in delivering_configurations():
        limits = config.rate_limits
        weak = _weak_cache(config.cache)
        if weak is None or not (limits.global_rate or limits.per_recipient):
            continue
        label = setting_label("CACHE") if alias is None else setting_label("cache", alias=alias)
        messages.append(
            Warning(
                f"Rate limits are counted in cache {config.cache!r}, which is {weak}: "
                "each process (or racing requests) keeps its own count.",
                hint=f"Point {label} at a shared cache with atomic increments "
                "(django.core.cache.backends.redis.RedisCache or memcached).",
                id="robust_mail.W020",
            )
        )
    return messages
