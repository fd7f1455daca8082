"""Settings → frozen dataclasses. Every robust_mail setting is read here and nowhere else.

Two forms carry the same keys:

* classic (every Django version): ``settings.ROBUST_MAIL`` with upper-case keys; without
  ``PROVIDERS``, one provider named ``"default"`` is built from Django's ``EMAIL_*``;
* Django 6.1 ``MAILERS``: a backend's ``OPTIONS`` with the same keys in lower case
  (``settings.EMAIL_*`` is never read for it).

``get_config()`` is lazy (settings are read on first use) and cached; the cache is dropped
on Django's ``setting_changed`` signal, so ``override_settings`` just works. Nothing here
ever assigns to ``django.conf.settings``.

The defaults live in the dataclass fields below and only there. :func:`read_config`
does the reading and validation once, for :func:`get_config` (which raises) and for
the system checks in ``checks.py`` (which report).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

import django
from django.conf import global_settings, settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

from robust_mail import _conf_fields as f
from robust_mail._conf_providers import PROVIDER_KEYS, read_provider, read_providers
from robust_mail.exceptions import RobustMailError
from robust_mail.providers import ProviderConfig

__all__ = [
    "PROVIDER_KEYS",
    "TOP_LEVEL_KEYS",
    "BreakerConfig",
    "ConfigurationError",
    "DNSConfig",
    "OTPConfig",
    "OutboxConfig",
    "PoolConfig",
    "Problem",
    "ProviderConfig",
    "RateLimitConfig",
    "RetryConfig",
    "RobustMailConfig",
    "clear_cache",
    "get_config",
    "read_config",
    "setting_label",
    "validate",
]

Problem = f.Problem


@dataclass(frozen=True)
class DNSConfig:
    nameservers: tuple[str, ...] | None = None  # None: the system's resolvers
    port: int = 53
    timeout: float = 2.0
    stale_ttl: float = 86400.0  # how long a last-known-good answer may stand in


@dataclass(frozen=True)
class RetryConfig:
    attempts: int = 3  # per provider, the first try included
    backoff: float = 1.0
    max_backoff: float = 4.0
    deadline: float = 30.0  # for the whole message, across providers


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 5
    reset_timeout: float = 60.0


@dataclass(frozen=True)
class PoolConfig:
    size: int = 5
    idle_timeout: float = 60.0
    max_messages: int | None = None  # per connection; None: unlimited


@dataclass(frozen=True)
class OutboxConfig:
    retry_schedule: tuple[float, ...] = (60.0, 300.0, 1800.0, 7200.0, 21600.0)
    max_age: float = 259200.0  # then dead-lettered
    lease: float = 300.0
    batch: int = 100


@dataclass(frozen=True)
class RateLimitConfig:
    global_rate: str | None = None  # "N/s|m|h|d"; see ratelimit.parse_rate()
    per_recipient: str | None = None


@dataclass(frozen=True)
class OTPConfig:
    length: int = 6
    ttl: float = 600.0
    max_attempts: int = 3
    cooldown: float = 60.0
    max_per_hour: int = 5
    max_per_day: int = 10
    secret: str | None = field(default=None, repr=False)  # None: derived from SECRET_KEY
    alphabet: str = "digits"  # or "alphanumeric"
    max_per_ip_per_hour: int = 20
    store: str | None = None  # dotted path of the OTP store; None: the database store
    # Email an address without an account that no code was sent, so that both paths of
    # PasswordResetService.initiate do the same work (see docs/otp.md, "Timing").
    notify_unknown: bool = True
    # At most this many of those notices per hour, site-wide (None: no cap); past it the
    # decoy stands in, so a flood of typed addresses cannot make the site a mail cannon.
    max_notices_per_hour: int | None = 100
    # Django 6.1: the MAILERS alias code emails go through (queued ones too, so it must be
    # robust_mail's to queue them); None: the default delivery (see docs/otp.md).
    mailer: str | None = None


@dataclass(frozen=True)
class RobustMailConfig:
    providers: tuple[ProviderConfig, ...] = ()  # tried in this order
    force_ipv4: bool = True
    dns: DNSConfig = field(default_factory=DNSConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    fallback: str | None = None  # "outbox" | "console" | None
    cache: str = "default"
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    rate_limits: RateLimitConfig = field(default_factory=RateLimitConfig)
    otp: OTPConfig = field(default_factory=OTPConfig)
    #: The MAILERS alias these are the OPTIONS of (Django 6.1); None: ROBUST_MAIL. What is
    #: counted per configuration (rate limits) is counted per alias.
    alias: str | None = None


class ConfigurationError(RobustMailError, ImproperlyConfigured):
    """robust_mail is configured wrongly. ``problems`` lists every mistake found.

    Subclasses ImproperlyConfigured, so ``fail_silently`` never swallows it.
    """

    def __init__(self, problems: str | list[Problem] | tuple[Problem, ...]) -> None:
        if isinstance(problems, str):
            self.problems: tuple[Problem, ...] = ()
            super().__init__(problems)
            return
        self.problems = tuple(problems)
        detail = " ".join(str(p) for p in self.problems)
        super().__init__(f"Invalid robust_mail configuration: {detail}")


# --- the schema: (KEY, attribute, converter) per section ------------------------------

_SECTIONS: dict[str, tuple[str, type[Any], tuple[tuple[str, str, f.Converter], ...]]] = {
    "DNS": (
        "dns",
        DNSConfig,
        (
            ("NAMESERVERS", "nameservers", f.optional(f.nameservers)),
            ("PORT", "port", f.port),
            ("TIMEOUT", "timeout", f.seconds()),
            ("STALE_TTL", "stale_ttl", f.seconds(zero=True)),
        ),
    ),
    "RETRY": (
        "retry",
        RetryConfig,
        (
            ("ATTEMPTS", "attempts", f.integer(1)),
            ("BACKOFF", "backoff", f.seconds(zero=True)),
            ("MAX_BACKOFF", "max_backoff", f.seconds(zero=True)),
            ("DEADLINE", "deadline", f.seconds()),
        ),
    ),
    "CIRCUIT_BREAKER": (
        "breaker",
        BreakerConfig,
        (
            ("FAILURE_THRESHOLD", "failure_threshold", f.integer(1)),
            ("RESET_TIMEOUT", "reset_timeout", f.seconds()),
        ),
    ),
    "POOL": (
        "pool",
        PoolConfig,
        (
            ("SIZE", "size", f.integer(1)),
            ("IDLE_TIMEOUT", "idle_timeout", f.seconds()),
            ("MAX_MESSAGES", "max_messages", f.optional(f.integer(1))),
        ),
    ),
    "OUTBOX": (
        "outbox",
        OutboxConfig,
        (
            ("RETRY_SCHEDULE", "retry_schedule", f.schedule),
            ("MAX_AGE", "max_age", f.seconds()),
            ("LEASE", "lease", f.seconds()),
            ("BATCH", "batch", f.integer(1)),
        ),
    ),
    "RATE_LIMITS": (
        "rate_limits",
        RateLimitConfig,
        (
            ("GLOBAL", "global_rate", f.optional(f.rate)),
            ("PER_RECIPIENT", "per_recipient", f.optional(f.rate)),
        ),
    ),
    "OTP": (
        "otp",
        OTPConfig,
        (
            ("LENGTH", "length", f.integer(4, 32)),
            ("TTL", "ttl", f.seconds()),
            ("MAX_ATTEMPTS", "max_attempts", f.integer(1)),
            ("COOLDOWN", "cooldown", f.seconds(zero=True)),
            ("MAX_PER_HOUR", "max_per_hour", f.integer(1)),
            ("MAX_PER_DAY", "max_per_day", f.integer(1)),
            ("SECRET", "secret", f.optional(f.text)),
            ("ALPHABET", "alphabet", f.choice("digits", "alphanumeric")),
            ("MAX_PER_IP_PER_HOUR", "max_per_ip_per_hour", f.integer(1)),
            ("STORE", "store", f.optional(f.text)),
            ("NOTIFY_UNKNOWN", "notify_unknown", f.boolean),
            ("MAX_NOTICES_PER_HOUR", "max_notices_per_hour", f.optional(f.integer(1))),
            ("MAILER", "mailer", f.optional(f.text)),
        ),
    ),
}
TOP_LEVEL_KEYS = ("PROVIDERS", "FORCE_IPV4", "FALLBACK", "CACHE", *_SECTIONS)
#: Sections that only ROBUST_MAIL sets: project-wide, never per MAILERS alias.
_GLOBAL = frozenset({"OTP"})
FALLBACKS = (None, "console", "outbox")

# Classic form without PROVIDERS: provider key -> the Django setting it comes from.
_EMAIL_SETTINGS = {
    "HOST": "EMAIL_HOST",
    "PORT": "EMAIL_PORT",
    "USERNAME": "EMAIL_HOST_USER",
    "PASSWORD": "EMAIL_HOST_PASSWORD",
    "USE_TLS": "EMAIL_USE_TLS",
    "USE_SSL": "EMAIL_USE_SSL",
    "TIMEOUT": "EMAIL_TIMEOUT",
    "SSL_CAFILE": "EMAIL_SSL_CAFILE",  # not a Django setting, accepted for symmetry
    "SSL_CERTFILE": "EMAIL_SSL_CERTFILE",
    "SSL_KEYFILE": "EMAIL_SSL_KEYFILE",
}


def setting_label(*path: str | int, alias: str | None = None, options: bool = False) -> str:
    """How a setting is named in messages: ``ROBUST_MAIL['RETRY']['ATTEMPTS']``."""
    if alias is not None:
        root = f"MAILERS[{alias!r}]['OPTIONS']"
    else:
        root = "OPTIONS" if options else "ROBUST_MAIL"
    return root + "".join(f"[{p!r}]" for p in path)


def read_config(
    options: Mapping[str, Any] | None = None, *, alias: str | None = None
) -> tuple[RobustMailConfig | None, list[Problem]]:
    """Read and validate one configuration; never raises for bad settings.

    ``options=None`` reads ``settings.ROBUST_MAIL`` (and ``EMAIL_*`` when it has no
    providers, unless Django 6.1 ``MAILERS`` is defined: then ``providers`` may be empty,
    since the backends take theirs from their ``OPTIONS``); a mapping is a MAILERS
    ``OPTIONS`` dict (``alias`` only names it in messages). Returns the config, or None
    when there is any problem, and the problems.
    """
    if options is None:
        raw: object = getattr(settings, "ROBUST_MAIL", None)
        reader = f.Reader(setting_label(), lower=False)
        return _read(reader, {} if raw is None else raw, classic=True)
    reader = f.Reader(setting_label(alias=alias, options=True), lower=True)
    config, problems = _read(reader, options, classic=False)
    return (None if config is None else replace(config, alias=alias)), problems


def validate(
    options: Mapping[str, Any] | None = None, *, alias: str | None = None
) -> list[Problem]:
    """Every problem in a configuration (see :func:`read_config`); empty when it is valid."""
    return read_config(options, alias=alias)[1]


def get_config(
    options: Mapping[str, Any] | None = None, *, alias: str | None = None
) -> RobustMailConfig:
    """The configuration, read on first use and cached until a relevant setting changes.

    Raises :class:`ConfigurationError` listing every problem found.
    """
    global _settings_config
    generation = _generation  # a change while building makes what was built stale
    if options is None:
        config = _settings_config
        if config is None:
            config = _build(None, alias)
            with _lock:
                if generation == _generation:
                    _settings_config = config
        return config
    frozen = _freeze(options)
    if frozen is None:  # unhashable leaves: cannot cache, still correct
        return _build(options, alias)
    key = (alias, frozen)  # the same OPTIONS under two aliases are two configurations
    cached = _options_configs.get(key)
    if cached is None:
        cached = _build(options, alias)
        with _lock:
            if generation == _generation:
                if len(_options_configs) >= 64:
                    _options_configs.clear()
                _options_configs[key] = cached
    return cached


def clear_cache() -> None:
    """Forget every cached configuration; the next get_config() reads settings again."""
    global _settings_config, _generation
    with _lock:
        _settings_config = None
        _options_configs.clear()
        _generation += 1


_lock = threading.Lock()
#: Counts clear_cache() calls: a configuration built from settings read before one is
#: returned to its caller but not cached (another thread changed settings meanwhile).
_generation = 0
_settings_config: RobustMailConfig | None = None
_options_configs: dict[object, RobustMailConfig] = {}


def _after_fork_in_child() -> None:
    # Another thread of the parent may have held the lock at fork(): the child's copy
    # would stay held for ever.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _on_setting_changed(*, setting: str, **kwargs: object) -> None:
    if setting in ("ROBUST_MAIL", "MAILERS", "CACHES") or setting.startswith("EMAIL_"):
        clear_cache()


setting_changed.connect(_on_setting_changed, dispatch_uid="robust_mail.conf.clear_cache")


def _build(options: Mapping[str, Any] | None, alias: str | None) -> RobustMailConfig:
    config, problems = read_config(options, alias=alias)
    if config is None:
        raise ConfigurationError(problems)
    return config


class _Unhashable(Exception):
    pass


def _freeze(value: object) -> object:
    """A hashable, type-exact image of an OPTIONS value, or None when it has none."""
    try:
        return _freeze_value(value)
    except _Unhashable:
        return None


def _freeze_value(value: object) -> object:
    if isinstance(value, Mapping):
        return ("map", tuple((k, _freeze_value(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return ("seq", tuple(_freeze_value(v) for v in value))
    try:
        hash(value)
    except TypeError:
        raise _Unhashable from None
    return (type(value), value)  # True and 1 must not share a cache entry


def _read(
    r: f.Reader, raw: object, *, classic: bool
) -> tuple[RobustMailConfig | None, list[Problem]]:
    valid = TOP_LEVEL_KEYS if classic else tuple(k for k in TOP_LEVEL_KEYS if k not in _GLOBAL)
    if not classic and isinstance(raw, Mapping) and "otp" in raw:
        # One-time passwords are issued and checked by OTPService, not by a mailer: an
        # alias's "otp" would be read by nothing.
        r.report(
            "E003",
            f"{r.label()} has the key 'otp', which a MAILERS alias cannot set.",
            "OTP settings are project-wide: set them in ROBUST_MAIL['OTP'].",
        )
        raw = {k: v for k, v in raw.items() if k != "otp"}
    top = r.mapping(raw, (), valid)
    if top is None:
        return None, r.problems
    values: dict[str, Any] = {}
    for key, convert in (
        ("FORCE_IPV4", f.boolean),
        ("FALLBACK", f.choice(*FALLBACKS, code="E006")),
        ("CACHE", f.text),
    ):
        r.take(top, key, r.label(r.key(key)), convert, into=values)
    for key, (attr, cls, spec) in _SECTIONS.items():
        raw_section = top.get(key)
        section_path = (r.key(key),)
        section = r.mapping(
            {} if raw_section is None else raw_section, section_path, [k for k, _, _ in spec]
        )
        if section is None:
            continue
        given: dict[str, Any] = {}
        for sub, sub_attr, convert in spec:
            label = r.label(*section_path, r.key(sub))
            r.take(section, sub, label, convert, into=given, attr=sub_attr)
        values[attr] = cls(**given)
    force_ipv4 = values.get("force_ipv4", RobustMailConfig.force_ipv4)
    raw_providers = top.get("PROVIDERS")
    if raw_providers is None or (isinstance(raw_providers, list | tuple) and not raw_providers):
        values["providers"] = (
            _email_settings_provider(r, force_ipv4) if classic else _no_providers(r)
        )
    else:
        values["providers"] = read_providers(r, raw_providers, force_ipv4)
    if r.problems:
        return None, r.problems
    return RobustMailConfig(**values), r.problems


def _no_providers(r: f.Reader) -> tuple[ProviderConfig, ...]:
    r.report(
        "E001",
        f"{r.label(r.key('PROVIDERS'))} is missing or empty: no provider to send through.",
        f"Add at least one provider dict or URL to {r.label(r.key('PROVIDERS'))}.",
    )
    return ()


def mailers_setting() -> Mapping[str, Any] | None:
    """``settings.MAILERS`` where Django reads it (6.1 and later), else None.

    Before 6.1 Django ignores a MAILERS setting (one written ahead of an upgrade, say), so
    robust_mail does too: the classic ``EMAIL_BACKEND`` / ``EMAIL_*`` / ``ROBUST_MAIL``
    configuration is what sends.
    """
    if django.VERSION < (6, 1) or not hasattr(settings, "MAILERS"):
        return None
    mailers = getattr(settings, "MAILERS", None)
    return mailers if isinstance(mailers, Mapping) else {}


def _email_settings_provider(r: f.Reader, force_ipv4: bool) -> tuple[ProviderConfig, ...]:
    if mailers_setting() is not None:
        # Django 6.1 with MAILERS: EMAIL_* do not exist, and every robust_mail backend takes
        # its providers from its own OPTIONS. ROBUST_MAIL then only carries the settings
        # that are not per mailer (OTP, outbox, cache...), so no providers is not an error;
        # and a localhost:25 provider is never invented.
        return ()
    given: dict[str, object] = {"NAME": "default"}
    for key, setting in _EMAIL_SETTINGS.items():
        value = _django_setting(setting)
        if key in ("USERNAME", "PASSWORD") and value is None:
            value = ""
        if key.startswith("SSL_") and value == "":
            value = None  # an unset environment variable, not a file named ""
        if value is not None:  # EMAIL_TIMEOUT None: our bounded default, never unbounded
            given[key] = value
    if not given.get("HOST"):
        r.report(
            "E001",
            "ROBUST_MAIL['PROVIDERS'] is empty and settings.EMAIL_HOST is empty.",
            "Set ROBUST_MAIL['PROVIDERS'] or EMAIL_HOST.",
        )
        return ()
    provider = read_provider(
        r,
        given,
        lambda k: f"settings.{_EMAIL_SETTINGS.get(k, k)}",
        force_ipv4,
        password_needs_user=False,
    )
    return () if provider is None else (provider,)


def _django_setting(name: str) -> Any:
    """A Django setting: the project's value, else Django's default.

    Django 6.1 warns on every read of a deprecated EMAIL_* setting; a project that never
    set one should not see warnings caused by us, so there it is read only when the
    settings module (or override_settings) sets it. Before 6.1 reading warns about
    nothing, and getattr also sees a value assigned at run time (settings.EMAIL_HOST_USER
    = ... in AppConfig.ready()), which is_overridden() does not report.
    """
    if django.VERSION < (6, 1) or cast(Any, settings).is_overridden(name):
        return getattr(settings, name, None)
    return getattr(global_settings, name, None)
