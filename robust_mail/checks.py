"""Django system checks for robust_mail's settings.

Registered when this module is imported (``apps.py`` imports it in ``ready()``). The
validation itself lives in ``conf.read_config`` and is shared with ``get_config``; this
module only turns its problems into check messages and adds what needs the rest of the
settings (caches, other mailers, files on disk, DEBUG).

Ids are stable and never reused; each has a test in ``tests/test_checks.py`` and a row in
``docs/settings.md``. This module uses E001-E019 and W001-W009; E020-E029 / W020-W029
belong to the OTP and rate-limit checks, E030-E039 / W030-W039 to the outbox checks.

=====  ==================================================================
E001   no provider configured
E002   a provider has both USE_TLS and USE_SSL
E003   unknown key (top level, a section, or a provider)
E004   a provider URL cannot be parsed
E005   a provider timeout is None or ≤ 0
E006   FALLBACK is not None, "console" or "outbox"
E007   two providers share a name
E008   a value has the wrong type or is out of range
E009   CACHE names an alias that is not in CACHES
E010   a MAILER provider names a missing MAILERS alias, its own, or one of robust_mail's
E011   an SSL_CAFILE / SSL_CERTFILE / SSL_KEYFILE file does not exist or cannot be loaded
E012   one provider NAME for different servers or accounts in two configurations (MAILERS)
W001   FALLBACK "console" while DEBUG is False
W002   a provider sends its password without TLS to a host that is not local
W003   a provider's TIMEOUT is not shorter than RETRY DEADLINE
W004   the shared cache is a RedisCache without socket timeouts
W005   MAILERS is set on a Django before 6.1, which ignores it
=====  ==================================================================
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

import django
from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register

from robust_mail.conf import RobustMailConfig, mailers_setting, read_config, setting_label
from robust_mail.mailers import (
    classic_form_in_use,
    configurations,
    is_robust_backend,
    robust_mailers,
)
from robust_mail.providers import ProviderConfig
from robust_mail.tls import check_tls_files


@register("mail", "robust_mail")
def check_settings(app_configs: object = None, **kwargs: object) -> list[CheckMessage]:
    """Check ``ROBUST_MAIL`` (when used) and every MAILERS alias served by robust_mail."""
    messages: list[CheckMessage] = []
    messages += _check_early_mailers()
    if classic_form_in_use():
        messages += _check_one(None, alias=None)
    for alias, options in robust_mailers():
        messages += _check_one(options, alias=alias)
    messages += _check_names_across_mailers()
    return messages


def _check_names_across_mailers() -> list[CheckMessage]:
    # Breakers and counters are keyed by provider name: within one configuration E007
    # keeps names apart; across MAILERS aliases one name must mean one server.
    seen: dict[str, tuple[str, tuple[object, ...]]] = {}
    messages: list[CheckMessage] = []
    for alias, config in configurations():
        where = setting_label(alias=alias) if alias is not None else "ROBUST_MAIL"
        for provider in config.providers:
            # The account too: one name for two accounts on one server would share a
            # breaker (one account's bad password would stop the other's mail).
            server = (provider.host, provider.port, provider.mailer, provider.username)
            first = seen.setdefault(provider.name, (where, server))
            if first[1] != server:
                messages.append(
                    Error(
                        f"Provider name {provider.name!r} is used for different servers "
                        f"or accounts in "
                        f"{first[0]} and {where}: they would share one circuit breaker (one "
                        "failing would stop sends to the other) and one set of counters.",
                        hint="Give each server and account its own NAME; the same name is "
                        "fine only for the same host, port and USERNAME.",
                        id="robust_mail.E012",
                    )
                )
    return messages


def _check_early_mailers() -> list[CheckMessage]:
    if mailers_setting() is not None or not hasattr(settings, "MAILERS"):
        return []
    return [
        Warning(
            f"MAILERS is set, but Django {django.get_version()} does not read it (MAILERS "
            "arrived in Django 6.1): mail is sent as EMAIL_BACKEND, EMAIL_* and ROBUST_MAIL "
            "say.",
            hint="Remove MAILERS until you upgrade to Django 6.1, or keep the classic "
            "settings complete until then.",
            id="robust_mail.W005",
        )
    ]


def _check_one(options: Any, *, alias: str | None) -> list[CheckMessage]:
    config, problems = read_config(options, alias=alias)
    messages: list[CheckMessage] = [
        Error(p.message, hint=p.hint or None, id=f"robust_mail.{p.code}") for p in problems
    ]
    if config is not None:
        where = setting_label(alias=alias, options=options is not None)
        lower = options is not None
        messages += _check_environment(config, where, alias=alias, lower=lower)
    return messages


def _check_environment(
    config: RobustMailConfig, where: str, *, alias: str | None, lower: bool
) -> list[CheckMessage]:
    """What a valid configuration can still get wrong about the rest of the project."""

    def key(name: str) -> str:
        return name.lower() if lower else name

    out: list[CheckMessage] = []
    if config.fallback == "console" and not settings.DEBUG:
        out.append(
            Warning(
                f"{where}[{key('FALLBACK')!r}] is 'console' while DEBUG is False: a message "
                "that no provider accepts would be printed to the console, not sent.",
                hint="Use 'outbox' in production to keep such messages and retry them, "
                "or None to raise DeliveryFailed.",
                id="robust_mail.W001",
            )
        )
    caches = getattr(settings, "CACHES", {})
    if config.cache not in caches:
        out.append(
            Error(
                f"{where}[{key('CACHE')!r}] is {config.cache!r}, which is not an alias in CACHES.",
                hint=f"Use one of {', '.join(map(repr, caches)) or 'the CACHES aliases'}; "
                "breakers, rate limits and metrics are shared through it.",
                id="robust_mail.E009",
            )
        )
    for provider in config.providers:
        here = f"{where} provider {provider.name!r}"
        if provider.mailer is not None:
            out += _check_mailer(here, provider.mailer, alias=alias)
            continue
        missing = False
        for attr in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(provider, attr)
            if path is not None and not os.path.isfile(path):
                missing = True
                out.append(
                    Error(
                        f"{here}: {key(attr.upper())} {path!r} does not exist or is not a file.",
                        hint="Give the path of a readable PEM file; relative paths are "
                        "resolved from the working directory of the process.",
                        id="robust_mail.E011",
                    )
                )
        if not missing:
            files = " / ".join(key(a) for a in ("SSL_CAFILE", "SSL_CERTFILE", "SSL_KEYFILE"))
            out += _check_tls_files(f"{here}: its {files}", provider)
        plain = not (provider.use_tls or provider.use_ssl)
        if provider.username and plain and not _is_local(provider.host):
            out.append(
                Warning(
                    f"{here} logs in to {provider.host!r} without TLS: the password "
                    "would cross the network in plain text.",
                    hint="Set USE_TLS (STARTTLS, port 587) or USE_SSL (port 465), or "
                    "use a smtp+tls:// or smtps:// URL.",
                    id="robust_mail.W002",
                )
            )
        if provider.timeout >= config.retry.deadline:
            out.append(
                Warning(
                    f"{here}: {key('TIMEOUT')} ({provider.timeout:g}s) is not shorter than "
                    f"{key('RETRY')}[{key('DEADLINE')!r}] ({config.retry.deadline:g}s): the "
                    "deadline cuts every slow step short, so this provider's failures never "
                    "count towards its circuit breaker.",
                    hint="Keep TIMEOUT well below the DEADLINE, e.g. TIMEOUT 10 with DEADLINE 30.",
                    id="robust_mail.W003",
                )
            )
    out += _check_redis_timeouts(config.cache, caches)
    return out


def _check_tls_files(files: str, provider: ProviderConfig) -> list[CheckMessage]:
    # A file that exists but is not PEM (or a key that does not match its certificate)
    # would otherwise fail every TLS connection to this provider, at send time.
    if not (provider.ssl_cafile or provider.ssl_certfile):
        return []
    try:
        check_tls_files(provider)
    except (OSError, ssl.SSLError, ValueError) as exc:
        return [
            Error(
                f"{files} cannot be loaded ({type(exc).__name__}: {exc}).",
                hint="Give PEM files: a CA bundle for SSL_CAFILE, the client certificate "
                "and its unencrypted key for SSL_CERTFILE / SSL_KEYFILE.",
                id="robust_mail.E011",
            )
        ]
    return []


def _check_redis_timeouts(alias: str, caches: Mapping[str, Any]) -> list[CheckMessage]:
    # A Redis that stops answering would otherwise hang every send on a cache call.
    entry = caches.get(alias) or {}
    backend = str(entry.get("BACKEND", ""))
    if "redis" not in backend.lower():
        return []
    # django-redis reads its own upper-case OPTIONS; Django's RedisCache hands OPTIONS to
    # redis-py as they are. Both hand LOCATION to redis-py's from_url, which reads the
    # timeouts from the URL's query too.
    django_redis = backend.startswith("django_redis.")
    wanted = ("SOCKET_TIMEOUT", "SOCKET_CONNECT_TIMEOUT")
    keys = wanted if django_redis else tuple(k.lower() for k in wanted)
    options = entry.get("OPTIONS") or {}
    urls = _locations(entry.get("LOCATION"))
    missing = [
        key
        for key in keys
        if key not in options
        and not (urls and all(key.lower() in parse_qs(urlsplit(u).query) for u in urls))
    ]
    if not missing:
        return []
    example = ", ".join(f"{k!r}: 0.5" for k in keys)
    return [
        Warning(
            f"CACHES[{alias!r}] is a Redis cache without {' and '.join(missing)}: if Redis "
            "stops answering, every send waits on it.",
            hint=f"Add OPTIONS {{{example}}}"
            + (" (django-redis reads them in upper case)" if django_redis else "")
            + ", or ?socket_timeout=0.5&socket_connect_timeout=0.5 in LOCATION; "
            "robust_mail falls back to per-process state when the cache fails fast.",
            id="robust_mail.W004",
        )
    ]


def _locations(location: object) -> list[str]:
    if isinstance(location, str):
        return [u.strip() for u in location.split(",") if u.strip()]
    if isinstance(location, list | tuple):
        return [u for u in location if isinstance(u, str)]
    return []


def _check_mailer(here: str, target: str, *, alias: str | None) -> list[CheckMessage]:
    mailers = mailers_setting()
    hint: str | None
    if mailers is None:
        problem = f"{here} delegates to mailer {target!r}, but MAILERS is not defined."
        hint = "MAILER providers need Django 6.1's MAILERS setting."
    elif target == alias:
        problem = f"{here} delegates to its own mailer {target!r}."
        hint = "Name another MAILERS alias, such as a non-SMTP backend used as fallback."
    elif target not in mailers:
        problem = f"{here} delegates to mailer {target!r}, which is not in MAILERS."
        hint = f"Use one of {', '.join(map(repr, mailers))}." if mailers else None
    elif is_robust_backend(_backend_of(mailers[target])):
        # Its own failover, retries and pins inside ours: the Message-ID it sends is not
        # the one our result reports, and two aliases delegating to each other loop.
        problem = f"{here} delegates to mailer {target!r}, which is itself robust_mail's."
        hint = (
            "Delegate to another kind of backend (an HTTP API's, say), or list that "
            "alias's providers here instead."
        )
    else:
        return []
    return [Error(problem, hint=hint, id="robust_mail.E010")]


def _backend_of(entry: object) -> object:
    return entry.get("BACKEND") if isinstance(entry, Mapping) else None


def _is_local(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
