"""System checks for the outbox and its delivery task (ids E030 to E039, W030 to W039).

Registered when imported (``apps.py`` imports this module in ``ready()``).

=====  ==================================================================
E030   OUTBOX LEASE is not longer than RETRY DEADLINE
W030   OUTBOX LEASE is shorter than two worst-case deliveries
W031   TASKS is set but no tasks framework is installed
W032   the delivery task could not be defined for the TASKS backend
W033   nothing can deliver the outbox (MAILERS without a robust alias, no PROVIDERS)
W034   USE_TZ is False and TIME_ZONE has daylight saving time (leases jump by an hour)
=====  ==================================================================
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

from robust_mail.conf import RobustMailConfig, setting_label
from robust_mail.mailers import delivering_configurations
from robust_mail.outbox_delivery import (
    NOTHING_DELIVERS,
    STEPS_PER_ATTEMPT,
    can_deliver,
    worst_case_delivery,
)


@register("mail", "robust_mail")
def check_outbox(app_configs: object = None, **kwargs: Any) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    messages += _check_lease()
    messages += _check_tasks()
    messages += _check_deliverable()
    messages += _check_local_clock()
    return messages


def _check_local_clock() -> list[CheckMessage]:
    # With USE_TZ False, timezone.now() is naive local time, and leases, retry times and
    # MAX_AGE are compared in it: when the clocks go forward, every live lease looks an
    # hour older, and another worker takes over messages still being sent.
    if settings.USE_TZ:
        return []
    try:
        zone = timezone.get_default_timezone()
    except Exception:  # a TIME_ZONE Django itself cannot load: Django reports it
        return []
    year = timezone.now().year
    offsets = {zone.utcoffset(datetime(year, month, 1)) for month in (1, 7)}
    if len(offsets) < 2:
        return []
    return [
        Warning(
            f"USE_TZ is False and TIME_ZONE {settings.TIME_ZONE!r} changes its clocks for "
            "daylight saving time: when they go forward, the outbox's leases look an hour "
            "older and a second worker may send messages still being sent.",
            hint="Set USE_TZ = True (Django's default), or a TIME_ZONE without daylight "
            "saving time such as 'UTC'.",
            id="robust_mail.W034",
        )
    ]


def _check_deliverable() -> list[CheckMessage]:
    try:
        if can_deliver():
            return []
    except ImproperlyConfigured:
        return []  # reported by robust_mail.checks
    return [
        Warning(
            f"Nothing can deliver robust_mail's outbox: {NOTHING_DELIVERS}. Background "
            "sends, sign-in codes and password-reset codes are refused.",
            hint="Give a MAILERS alias robust_mail.backends.RobustEmailBackend (or "
            "OutboxEmailBackend) with providers in its OPTIONS, or set ROBUST_MAIL['PROVIDERS'].",
            id="robust_mail.W033",
        )
    ]


def _check_lease() -> list[CheckMessage]:
    # Every configuration that delivers outbox messages: ROBUST_MAIL's, and each MAILERS
    # alias's (a message queued through an alias is delivered with its options). Any
    # worker may claim any message, with its own configuration's LEASE (--mailer picks
    # it): each configuration's deliveries must fit in the shortest LEASE.
    try:
        found = delivering_configurations()
    except ImproperlyConfigured:
        return []  # reported by robust_mail.checks
    if not found:
        return []
    lease_alias, lease_config = min(found, key=lambda item: item[1].outbox.lease)
    lease = (lease_config.outbox.lease, _labels(lease_alias)[0])
    messages: list[CheckMessage] = []
    for alias, config in found:
        also = (
            ""
            if alias == lease_alias
            else f" (a worker with that LEASE also claims messages of {_whose(alias)})"
        )
        messages += _lease_problems(config, lease, _labels(alias)[1], also)
    return messages


def _whose(alias: str | None) -> str:
    return "ROBUST_MAIL" if alias is None else f"MAILERS[{alias!r}]"


def _labels(alias: str | None) -> tuple[str, str]:
    if alias is None:
        return setting_label("OUTBOX", "LEASE"), setting_label("RETRY", "DEADLINE")
    return (
        setting_label("outbox", "lease", alias=alias),
        setting_label("retry", "deadline", alias=alias),
    )


def _lease_problems(
    config: RobustMailConfig, lease_of: tuple[float, str], deadline_label: str, also: str
) -> list[CheckMessage]:
    lease, lease_label = lease_of
    deadline = config.retry.deadline
    if lease <= deadline:
        return [
            Error(
                f"{lease_label} ({lease:g}s) is not longer than {deadline_label} "
                f"({deadline:g}s){also}.",
                hint=(
                    "A worker may still be sending a message when its lease expires, and "
                    "another worker would send it again. Make LEASE several times DEADLINE."
                ),
                id="robust_mail.E030",
            )
        ]
    worst = worst_case_delivery(config)
    if lease < 2 * worst:
        # A worker starts no message with less than one worst-case delivery left on its
        # lease; for the first message of a batch to have that, LEASE needs twice it.
        return [
            Warning(
                f"{lease_label} ({lease:g}s) is shorter than two worst-case deliveries "
                f"({2 * worst:g}s; one is RETRY DEADLINE plus {STEPS_PER_ATTEMPT} provider "
                f"TIMEOUTs for a last attempt){also}.",
                hint=(
                    f"Raise LEASE to at least {2 * worst:g}s: a worker then never starts a "
                    "message that a slow provider could keep sending past its lease, when "
                    "another worker may have taken it over."
                ),
                id="robust_mail.W030",
            )
        ]
    return []


def _check_tasks() -> list[CheckMessage]:
    from robust_mail import tasks

    if not tasks.tasks_configured():
        return []
    if tasks.task_framework is None:
        return [
            Warning(
                "TASKS is set, but neither django.tasks (Django 6.0+) nor the django-tasks "
                "backport is installed: outbox messages are delivered only by "
                "robust_mail_worker.",
                hint="pip install 'robust-mail[tasks]', or run manage.py robust_mail_worker.",
                id="robust_mail.W031",
            )
        ]
    error = tasks.probe()
    if error is not None:
        return [
            Warning(
                f"The outbox delivery task cannot run on the TASKS backend: {error}",
                hint=(
                    "Give TASKS a 'default' backend that accepts module-level tasks; until "
                    "then robust_mail_worker delivers the outbox."
                ),
                id="robust_mail.W032",
            )
        ]
    return []
