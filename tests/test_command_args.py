"""Command-line options of robust_mail_purge and robust_mail_worker: nonsense is a CommandError
with a message that names the option, never a traceback, an overflow or a busy loop."""

from __future__ import annotations

import io
from typing import Any

import pytest
from django.core.management import call_command, load_command_class
from django.core.management.base import CommandError

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    "days", ["nan", "inf", "-inf", "1e7", "36501", "-1"], ids=lambda days: f"days={days}"
)
def test_purge_rejects_an_age_that_is_not_a_sane_number_of_days(days: str) -> None:
    with pytest.raises(CommandError, match=r"--older-than must be a number of days from 0"):
        call_command("robust_mail_purge", f"--older-than={days}", stdout=io.StringIO())


@pytest.mark.parametrize("days", ["0", "36500"])
def test_purge_accepts_every_age_from_zero_to_a_century(days: str) -> None:
    out = io.StringIO()
    call_command("robust_mail_purge", "--older-than", days, "--dry-run", stdout=out)
    assert out.getvalue() == "would delete 0 outbox message(s)\n"


@pytest.mark.parametrize("command", ["robust_mail_purge", "robust_mail_worker"])
def test_an_unknown_database_alias_is_a_command_error(command: str) -> None:
    args = ["--older-than", "30"] if command == "robust_mail_purge" else ["--once"]
    with pytest.raises(CommandError, match=r"--database: no database 'nope' in settings"):
        call_command(command, *args, "--database", "nope", stdout=io.StringIO())


@pytest.mark.parametrize(
    "sleep", ["nan", "inf", "-inf", "1e9", "3601", "0", "-1"], ids=lambda sleep: f"sleep={sleep}"
)
def test_worker_rejects_a_sleep_that_is_not_a_sane_number_of_seconds(sleep: str) -> None:
    # nan made the idle worker poll in a busy loop, inf an OverflowError on the first wait.
    with pytest.raises(CommandError, match=r"--sleep must be a number of seconds above 0"):
        call_command("robust_mail_worker", "--once", f"--sleep={sleep}", stdout=io.StringIO())


def test_worker_help_states_the_whole_rule_for_the_default_mailer() -> None:
    command = load_command_class("robust_mail", "robust_mail_worker")
    help_text = " ".join(
        command.create_parser("manage.py", "robust_mail_worker").format_help().split()
    )
    assert (
        "'default' if robust_mail serves it, else the first alias it serves, else ROBUST_MAIL"
        in help_text
    )


@pytest.fixture
def empty_db(tmp_path: Any, django_db_blocker: Any) -> Any:
    """A database alias that exists but was never migrated."""
    from django.db import connections

    alias = "never_migrated"
    path = str(tmp_path / "empty.sqlite3")
    connections.settings[alias] = {
        **connections.settings["default"],
        "NAME": path,
        "TEST": {"NAME": path},
    }
    with django_db_blocker.unblock():
        try:
            yield alias
        finally:
            connections[alias].close()
            del connections[alias]
            del connections.settings[alias]


def test_worker_on_a_database_never_migrated_says_to_migrate(empty_db: str) -> None:
    with pytest.raises(CommandError, match=r"no outbox table .* run `manage.py migrate` first"):
        call_command("robust_mail_worker", "--once", "--database", empty_db, stdout=io.StringIO())
