"""Which robust_mail configurations a project sends with: the classic one, MAILERS aliases.

Before Django 6.1 there is one: ``ROBUST_MAIL`` (with Django's ``EMAIL_*`` settings). On
6.1 with ``MAILERS``, each alias whose backend is one of robust_mail's has its own in its
``OPTIONS``, and ``ROBUST_MAIL`` may still be set for what is not per mailer (OTP, outbox,
cache). The system checks, the outbox's delivery, ``robust_mail_status`` and the
Prometheus collector all need the same answer; it is here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, cast

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from robust_mail.conf import RobustMailConfig, get_config, mailers_setting

__all__ = [
    "ROBUST_BACKENDS",
    "classic_form_in_use",
    "configurations",
    "providers_in_use",
    "robust_mailers",
]

#: The backends whose MAILERS OPTIONS are a robust_mail configuration (Django 6.1).
ROBUST_BACKENDS = frozenset(
    {"robust_mail.backends.RobustEmailBackend", "robust_mail.backends.OutboxEmailBackend"}
)
#: OPTIONS that Django's BaseEmailBackend itself takes: not part of our configuration.
DJANGO_OPTIONS = frozenset({"fail_silently"})


def classic_form_in_use() -> bool:
    """True when ``ROBUST_MAIL`` / ``EMAIL_BACKEND`` configure a robust_mail backend."""
    # is_overridden() reads no setting, so it never triggers Django 6.1's EMAIL_* warnings.
    overridden = cast(Any, settings).is_overridden
    if overridden("ROBUST_MAIL"):
        return True
    if mailers_setting() is not None:
        return False  # Django 6.1 with MAILERS: EMAIL_BACKEND does not exist
    return bool(overridden("EMAIL_BACKEND") and settings.EMAIL_BACKEND in ROBUST_BACKENDS)


def robust_mailers() -> Iterator[tuple[str, Any]]:
    """``(alias, options)`` of every MAILERS alias served by robust_mail, in order.

    ``options`` without Django's own (``fail_silently``); as written when not a mapping
    (the checks report it).
    """
    for alias, entry in (mailers_setting() or {}).items():
        if isinstance(entry, Mapping) and entry.get("BACKEND") in ROBUST_BACKENDS:
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
