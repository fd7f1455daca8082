"""The outbox delivery task on Django's tasks framework (or the django-tasks backport)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.mail import EmailMessage
from django.db import transaction

from robust_mail import tasks
from robust_mail.models import OutboxMessage
from robust_mail.outbox import enqueue
from tests.conftest import needs_mailers, provider, require

REPO = Path(__file__).resolve().parent.parent

# Through require (conftest): a missing framework fails CI instead of skipping.
needs_framework = pytest.mark.usefixtures("tasks_framework")


def backend_path(name: str) -> str:
    assert tasks.task_framework is not None
    return f"{tasks.task_framework.__name__}.backends.{name}"


def dummy_backend() -> Any:
    assert tasks.task_framework is not None
    return tasks.task_framework.task_backends["default"]


def message() -> EmailMessage:
    return EmailMessage("s", "b", "f@example.com", ["t@example.com"])


@needs_framework
def test_the_task_is_found_by_its_module_path() -> None:
    task = tasks.deliver_outbox_message
    assert task.module_path == "robust_mail.tasks.deliver_outbox_message"  # type: ignore[attr-defined]


@pytest.mark.django_db(transaction=True)
def test_no_task_is_enqueued_when_the_project_configures_no_tasks(settings: Any) -> None:
    # Django 6.x has an implicit TASKS default (ImmediateBackend): it must not turn
    # background sends into synchronous ones.
    assert not settings.is_overridden("TASKS")
    row = enqueue(message())
    assert not tasks.schedule_delivery(row.pk)
    assert OutboxMessage.objects.get(pk=row.pk).status == "queued"


@needs_framework
@pytest.mark.django_db(transaction=True)
def test_commit_enqueues_one_task_per_message_and_running_it_delivers(
    settings: Any, smtp_server: Any, robust: Any
) -> None:
    server = smtp_server()
    robust([provider(server, "only")])
    settings.TASKS = {"default": {"BACKEND": backend_path("dummy.DummyBackend")}}
    dummy_backend().clear()

    with transaction.atomic():
        row = enqueue(message())
        assert dummy_backend().results == []  # not before the commit
    (result,) = dummy_backend().results
    assert list(result.args) == [row.pk]

    assert tasks.deliver_outbox_message.call(row.pk) == "sent"  # type: ignore[attr-defined]
    assert [m.message_id for m in server.messages] == [row.message_id]
    # Running it again (a duplicate task, or a worker got there first) sends nothing.
    assert tasks.deliver_outbox_message.call(row.pk) is None  # type: ignore[attr-defined]
    assert len(server.messages) == 1


@needs_framework
@pytest.mark.django_db(transaction=True)
def test_a_deferred_message_is_enqueued_again_for_its_next_attempt(
    settings: Any, smtp_server: Any, robust: Any
) -> None:
    server = smtp_server("refuse")
    robust([provider(server, "only")])
    settings.TASKS = {"default": {"BACKEND": backend_path("dummy.DummyBackend")}}
    row = enqueue(message())
    dummy_backend().clear()

    assert tasks.deliver_outbox_message.call(row.pk) == "queued"  # type: ignore[attr-defined]

    row = OutboxMessage.objects.get(pk=row.pk)
    (retry,) = dummy_backend().results
    assert list(retry.args) == [row.pk]
    assert retry.task.run_after == row.next_attempt_at
    assert row.next_attempt_at - row.created_at >= timedelta(seconds=59)


@pytest.mark.django_db(transaction=True)
def test_a_failing_task_backend_never_fails_the_enqueue(
    settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.TASKS = {"default": {"BACKEND": "no.such.Backend"}}
    row = enqueue(message())  # committed at once (autocommit): the task dispatch fails
    assert OutboxMessage.objects.get(pk=row.pk).status == "queued"
    assert "could not enqueue the delivery task" in caplog.text


def test_module_imports_cleanly_without_any_tasks_framework() -> None:
    script = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name in ("django.tasks", "django_tasks") or name.startswith("django_tasks."):
            raise ImportError(f"blocked {name}")
sys.meta_path.insert(0, Block())
import django
django.setup()
from robust_mail import tasks
assert tasks.task_framework is None
assert callable(tasks.deliver_outbox_message)
assert tasks.schedule_delivery(1) is False
print("ok", tasks.deliver_outbox_message.__name__)
"""
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="tests.settings", PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok deliver_outbox_message"


def test_a_backport_backend_selects_the_backport_framework(settings: Any) -> None:
    # django-tasks-rq 0.12 and friends are built on the backport, also on Django 6.x.
    # On Django 5.2 the backport is the only framework; the choice is tested on 6.x, where
    # the dev extras install the backport next to django.tasks (django-tasks-db needs it).
    try:
        import django_tasks as backport
    except ImportError:
        require(False, "django-tasks (the backport) is not installed")
    settings.TASKS = {"default": {"BACKEND": "django_tasks.backends.dummy.DummyBackend"}}
    assert tasks._choose_framework() is backport


def test_django_tasks_is_used_for_its_own_backends(settings: Any) -> None:
    modern = pytest.importorskip("django.tasks", reason="django.tasks is new in Django 6.0")
    settings.TASKS = {"default": {"BACKEND": "django.tasks.backends.dummy.DummyBackend"}}
    assert tasks._choose_framework() is modern


@pytest.fixture
def second_db(request: Any, tmp_path: Path, django_db_blocker: Any) -> Any:
    from tests.postgres_server import database_alias

    request.param = "sqlite"
    with database_alias("second", request, tmp_path, django_db_blocker, "second") as alias:
        yield alias


@needs_framework
def test_the_task_delivers_from_the_database_the_message_was_queued_in(
    settings: Any, smtp_server: Any, robust: Any, second_db: str
) -> None:
    server = smtp_server()
    robust([provider(server, "only")])
    settings.TASKS = {"default": {"BACKEND": backend_path("dummy.DummyBackend")}}
    dummy_backend().clear()

    row = enqueue(message(), using=second_db)

    (result,) = dummy_backend().results
    assert (list(result.args), result.kwargs) == ([row.pk], {"using": second_db})
    assert tasks.deliver_outbox_message.call(*result.args, **result.kwargs) == "sent"  # type: ignore[attr-defined]
    assert [m.message_id for m in server.messages] == [row.message_id]


@pytest.mark.django_db(transaction=True)
def test_the_task_waits_out_a_database_outage_before_recording(
    smtp_server: Any, robust: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The message is sent; then the database is briefly unreachable. Left "sending", it
    # would be sent again once its lease expired: the task retries the write, as the
    # worker does. (The outage is injected: a real one cannot be timed to the write.)
    from django.db import OperationalError

    from robust_mail import outbox_delivery, outbox_record

    server = smtp_server()
    robust([provider(server, "only")])
    row = enqueue(message())
    write = outbox_record.record_many
    calls: list[int] = []

    def unreachable_once(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("server closed the connection unexpectedly")
        return write(*args)

    monkeypatch.setattr(outbox_record, "record_many", unreachable_once)
    monkeypatch.setattr(outbox_record, "DB_RETRY_FIRST", 0.01)

    after = outbox_delivery.process_pk(row.pk)

    assert after is not None and after.status == "sent"
    assert len(calls) == 2 and len(server.messages) == 1


@needs_mailers
@pytest.mark.django_db(transaction=True)
def test_the_task_delivers_with_the_mailer_that_queued_the_message(
    smtp_server: Any, settings: Any
) -> None:
    from robust_mail.outbox_delivery import process_pk

    main, bulk = smtp_server(), smtp_server()
    settings.MAILERS = {
        name: {
            "BACKEND": "robust_mail.backends.OutboxEmailBackend",
            "OPTIONS": {"providers": [{"name": name, "host": "127.0.0.1", "port": server.port}]},
        }
        for name, server in (("default", main), ("bulk", bulk))
    }
    row = enqueue(message(), mailer="bulk")

    after = process_pk(row.pk)

    assert after is not None and (after.status, after.provider) == ("sent", "bulk")
    assert len(bulk.messages) == 1 and main.messages == []
