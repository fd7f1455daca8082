"""Which robust_mail configurations a project sends with: the classic one, MAILERS aliases.

Before Django 6.1 there is one: ``ROBUST_MAIL`` (with Django's ``EMAIL_*`` settings). On
6.1 with ``MAILERS``, each alias whose backend is one of robust_mail's has its own in its
``OPTIONS``, and ``ROBUST_MAIL`` may still be set for what is not per mailer (OTP, outbox,
cache). The system checks, the outbox's delivery, ``robust_mail_status`` and the
Prometheus collector all need the same answer; it is here.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any, cast

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from robust_mail.conf import RobustMailConfig, get_config, mailers_setting

__all__ = [
    "ROBUST_BACKENDS",
    "classic_form_in_use",
    "configurations",
    "delivering_configurations",
    "is_robust_backend",
    "providers_in_use",
    "robust_mailers",
]

#: The backends whose MAILERS OPTIONS are a robust_mail configuration (Django 6.1).
ROBUST_BACKENDS = frozenset(
    {"robust_mail.backends.RobustEmailBackend", "robust_mail.backends.OutboxEmailBackend"}
)
#: OPTIONS that Django's BaseEmailBackend itself takes: not part of our configuration.
DJANGO_OPTIONS = frozenset({"fail_silently"})


@functools.lru_cache(maxsize=64)
def is_robust_backend(path: object) -> bool:
    """Whether the dotted ``path`` names one of robust_mail's backends, or a subclass (a
    project's own ``MyBackend(RobustEmailBackend)`` is served by robust_mail too)."""
    if path in ROBUST_BACKENDS:
        return True
    if not isinstance(path, str):
        return False
    try:
        backend = import_string(path)
    except ImportError:
        return False  # Django reports a backend that cannot be imported
    from robust_mail.backends import _RobustBackendBase  # it imports this module's users

    return isinstance(backend, type) and issubclass(backend, _RobustBackendBase)


def delivering_configurations() -> list[tuple[str | None, RobustMailConfig]]:
    """The configurations that deliver mail and outbox messages: :func:`configurations`
    without ROBUST_MAIL's once an alias is served by robust_mail (ROBUST_MAIL then only
    holds what is not per mailer: OTP, the metrics' CACHE)."""
    found = configurations()
    if any(alias is not None for alias, _ in found):
        return [(alias, config) for alias, config in found if alias is not None]
    return found


def classic_form_in_use() -> bool:
    """True when ``ROBUST_MAIL`` / ``EMAIL_BACKEND`` configure a robust_mail backend."""
    # is_overridden() reads no setting, so it never triggers Django 6.1's EMAIL_* warnings.
    overridden = cast(Any, settings).is_overridden
    if overridden("ROBUST_MAIL"):
        return True
    if mailers_setting() is not None:
        return False  # Django 6.1 with MAILERS: EMAIL_BACKEND does not exist
    return bool(overridden("EMAIL_BACKEND") and is_robust_backend(settings.EMAIL_BACKEND))


def robust_mailers() -> Iterator[tuple[str, Any]]:
    """``(alias, options)`` of every MAILERS alias served by robust_mail, in order.

    ``options`` without Django's own (``fail_silently``); as written when not a mapping
    (the checks report it).
    """
    for alias, entry in (mailers_setting() or {}).items():
        if isinstance(entry, Mapping) and is_robust_backend(entry.get("BACKEND")):
            options = entry.get("OPTIONS", {})
            if isinstance(options, Mapping):
                options = {k: v for k, v in options.items() if k not in DJANGO_OPTIONS}
            yield str(alias), options


def configurations() -> list[tuple[str | None, RobustMailConfig]]:
    """Every configuration in use that reads without errors: ``(None, classic)`` first
    when the classic form is in use, then ``(alias, config)`` per robust MAILERS alias.

    Broken ones are left out: the system checks report them.
    """
    # get_config: cached, since a worker claim and a delivery task ask on every call.
    found: list[tuple[str | None, RobustMailConfig]] = []
    wanted: list[tuple[str | None, Any]] = []
    if classic_form_in_use() or mailers_setting() is None:
        wanted.append((None, None))
    wanted += robust_mailers()
    for alias, options in wanted:
        try:
            found.append((alias, get_config(options, alias=alias)))
        except ImproperlyConfigured:  # ConfigurationError too; the checks report it
            continue
    return found


def providers_in_use() -> dict[str, RobustMailConfig]:
    """Each provider name of every configuration in use, with the first configuration
    that names it (whose cache holds its breaker). One name is one server across
    configurations (check E012)."""
    owners: dict[str, RobustMailConfig] = {}
    for _, config in configurations():
        for provider in config.providers:
            owners.setdefault(provider.name, config)
    return owners
