"""System checks of the outbox: robust_mail.E030, W030, W031, W032."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.checks import CheckMessage, run_checks

from robust_mail import tasks
from robust_mail.outbox_checks import check_outbox
from tests.conftest import needs_mailers


def outbox_messages() -> list[CheckMessage]:
    """Through Django's registry, which also proves the check is registered."""
    return [m for m in run_checks(tags=["robust_mail"]) if m.id and 30 <= int(m.id[-3:]) < 40]


def only(check_id: str) -> CheckMessage:
    found = outbox_messages()
    assert [m.id for m in found] == [check_id], [(m.id, m.msg) for m in found]
    return found[0]


def test_default_settings_pass_the_outbox_checks() -> None:
    assert check_outbox() == []
    assert outbox_messages() == []


def test_e030_lease_not_longer_than_the_retry_deadline(settings: Any) -> None:
    settings.ROBUST_MAIL = {"RETRY": {"DEADLINE": 60}, "OUTBOX": {"LEASE": 60}}
    message = only("robust_mail.E030")
    assert "ROBUST_MAIL['OUTBOX']['LEASE'] (60s)" in message.msg
    assert "ROBUST_MAIL['RETRY']['DEADLINE'] (60s)" in message.msg
    assert "send it again" in (message.hint or "")


def test_w030_lease_shorter_than_two_worst_case_deliveries(settings: Any) -> None:
    # One worst case: 30 + 10 x 20 = 230 s. A lease of 300 s holds one, but a worker keeps
    # one worst case in hand before starting a message: the lease must hold two.
    settings.ROBUST_MAIL = {
        "PROVIDERS": [{"NAME": "slow", "HOST": "127.0.0.1", "PORT": 2525, "TIMEOUT": 20}],
        "RETRY": {"DEADLINE": 30},
        "OUTBOX": {"LEASE": 300},
    }
    message = only("robust_mail.W030")
    assert "460s" in message.msg
    assert "Raise LEASE to at least 460s" in (message.hint or "")

    settings.ROBUST_MAIL = {**settings.ROBUST_MAIL, "OUTBOX": {"LEASE": 460}}
    assert "robust_mail.W030" not in [m.id for m in check_outbox()]


def test_w031_tasks_configured_without_a_tasks_framework(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.TASKS = {"default": {"BACKEND": "somewhere.Backend"}}
    monkeypatch.setattr(tasks, "task_framework", None)  # as if neither package were installed
    message = only("robust_mail.W031")
    assert "robust_mail_worker" in message.msg
    assert "robust-mail[tasks]" in (message.hint or "")


def test_w032_tasks_backend_that_cannot_run_the_delivery_task(
    settings: Any, tasks_framework: Any
) -> None:
    settings.TASKS = {
        "other": {"BACKEND": f"{tasks_framework.__name__}.backends.dummy.DummyBackend"}
    }
    message = only("robust_mail.W032")
    assert "default" in message.msg
    assert "'default' backend" in (message.hint or "")


@needs_mailers
def test_e030_is_checked_for_every_mailers_alias_and_names_it(settings: Any) -> None:
    ok = {"providers": ["smtp://127.0.0.1:2525?name=a"]}
    short = {
        "providers": ["smtp://127.0.0.1:2526?name=b"],
        "outbox": {"lease": 10},
        "retry": {"deadline": 30},
    }
    settings.MAILERS = {
        "default": {"BACKEND": "robust_mail.backends.RobustEmailBackend", "OPTIONS": ok},
        "bulk": {"BACKEND": "robust_mail.backends.OutboxEmailBackend", "OPTIONS": short},
    }

    found = outbox_messages()

    # A worker running with bulk's 10 s lease (--mailer bulk) claims every alias's messages.
    assert {m.id for m in found} == {"robust_mail.E030"}
    assert all("MAILERS['bulk']['OPTIONS']['outbox']['lease'] (10s)" in m.msg for m in found)
    own = [m.msg for m in found if "also claims" not in m.msg]
    assert own == [
        "MAILERS['bulk']['OPTIONS']['outbox']['lease'] (10s) is not longer than "
        "MAILERS['bulk']['OPTIONS']['retry']['deadline'] (30s)."
    ]
    assert any("also claims messages of MAILERS['default']" in m.msg for m in found)


@needs_mailers
def test_w030_checks_each_alias_against_the_shortest_lease_a_worker_may_claim_with(
    settings: Any,
) -> None:
    # bulk's own lease holds two of its slow deliveries; default's, which a plain worker
    # claims bulk's messages with, does not.
    slow = {
        "providers": ["smtp://127.0.0.1:2526?name=b&timeout=25"],
        "retry": {"deadline": 120},
        "outbox": {"lease": 900},
    }
    settings.MAILERS = {
        "default": {
            "BACKEND": "robust_mail.backends.RobustEmailBackend",
            "OPTIONS": {"providers": ["smtp://127.0.0.1:2525?name=a"]},
        },
        "bulk": {"BACKEND": "robust_mail.backends.OutboxEmailBackend", "OPTIONS": slow},
    }

    message = only("robust_mail.W030")

    assert "MAILERS['default']['OPTIONS']['outbox']['lease'] (300s)" in message.msg
    assert "also claims messages of MAILERS['bulk']" in message.msg


@needs_mailers
def test_w033_and_a_refused_enqueue_when_nothing_can_deliver_the_outbox(settings: Any) -> None:
    from django.core.mail import EmailMessage

    from robust_mail.conf import ConfigurationError
    from robust_mail.outbox import enqueue

    settings.ROBUST_MAIL = {"OTP": {"LENGTH": 8}}  # robust_mail for codes only
    settings.MAILERS = {"default": {"BACKEND": "django.core.mail.backends.locmem.EmailBackend"}}

    warning = only("robust_mail.W033")
    assert "Nothing can deliver robust_mail's outbox" in warning.msg
    # A sign-in code queued here would wait until it went dead: refused instead.
    with pytest.raises(ConfigurationError, match="no configuration can deliver queued"):
        enqueue(EmailMessage("code", "123456", "f@example.com", ["t@example.com"]))


def test_w034_naive_local_time_with_daylight_saving(settings: Any) -> None:
    settings.USE_TZ = False
    settings.TIME_ZONE = "Europe/Paris"

    warning = only("robust_mail.W034")

    assert "'Europe/Paris'" in warning.msg
    assert "USE_TZ = True" in (warning.hint or "")


@pytest.mark.parametrize("use_tz, zone", [(True, "Europe/Paris"), (False, "UTC")])
def test_no_w034_with_aware_times_or_a_zone_without_daylight_saving(
    settings: Any, use_tz: bool, zone: str
) -> None:
    settings.USE_TZ = use_tz
    settings.TIME_ZONE = zone

    assert "robust_mail.W034" not in [m.id for m in outbox_messages()]
