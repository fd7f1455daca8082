"""The outbox delivery task, for Django's tasks framework.

``django.tasks`` on Django ≥ 6.0, the ``django-tasks`` backport on 5.2 (when both
are installed, the backport is used only if the configured default backend is
built on it, as ``django-tasks-rq`` 0.12 is). Without either, this module still
imports: ``deliver_outbox_message`` is then a plain function and messages wait
for ``robust_mail_worker``.

When a task is enqueued: only when the project sets ``TASKS`` itself. Django
6.x has a default ``TASKS`` (the ``ImmediateBackend``, which runs a task inside
the enqueuing call); following it silently would turn every background send
into a synchronous one in the request, so an implicit default is ignored. An
``ImmediateBackend`` the project *configures* is honoured: the message is then
delivered right after the commit, in the same process (handy in tests and
development). Whatever the backend, ``robust_mail_worker`` remains the sweeper
for retries and for tasks a backend lost.
"""

from __future__ import annotations

import importlib
import logging
from datetime import datetime
from types import ModuleType
from typing import Any, cast

from django.conf import settings
from django.utils.module_loading import import_string

__all__ = [
    "deliver_outbox_message",
    "probe",
    "schedule_delivery",
    "task_framework",
    "tasks_configured",
]

logger = logging.getLogger("robust_mail.outbox")


def _import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _choose_framework() -> ModuleType | None:
    modern = _import("django.tasks")
    backport = _import("django_tasks")
    if modern is not None and backport is not None and tasks_configured():
        base = _import("django_tasks.backends.base")
        path = getattr(settings, "TASKS", {}).get("default", {}).get("BACKEND", "")
        try:
            backend_class = import_string(path)
        except ImportError:
            backend_class = None
        is_class = isinstance(backend_class, type)
        if base is not None and is_class and issubclass(backend_class, base.BaseTaskBackend):
            return backport
    return modern or backport


def tasks_configured() -> bool:
    """True when the project configured ``TASKS`` itself (not Django's implicit default)."""
    overridden = cast(Any, settings).is_overridden("TASKS")
    return bool(overridden and getattr(settings, "TASKS", None))


def deliver_outbox_message(message_pk: int, using: str | None = None) -> str | None:
    """Deliver outbox message ``message_pk`` if it is due; return its status afterwards.

    ``using``: the database the message was queued in (``enqueue(using=...)``); None, the
    router's choice, as in tasks enqueued by earlier versions.
    Safe to run more than once and concurrently with workers: the message is
    claimed first, so only one runner sends it. A deferred message is
    re-enqueued for its next attempt when the backend can run tasks later;
    otherwise ``robust_mail_worker`` retries it.
    """
    from robust_mail.outbox_delivery import process_pk

    row = process_pk(message_pk, using=using)
    if row is None:
        return None
    if row.status == "queued":
        try:
            schedule_delivery(row.pk, run_after=row.next_attempt_at, using=using)
        except Exception:
            logger.exception("could not re-enqueue outbox message %s", row.pk)
    return str(row.status)


#: The framework in use (a module), or None.
task_framework: ModuleType | None = None
#: Why the task could not be defined, when it could not (reported by a system check).
task_error: Exception | None = None
_task: Any = None

_deliver = deliver_outbox_message

try:
    task_framework = _choose_framework()
    if task_framework is not None:
        _task = task_framework.task(_deliver)
        # Task runners find the task by its function's module path, i.e. this name.
        deliver_outbox_message = _task
except Exception as exc:
    # E.g. TASKS without a "default" backend: keep the plain function; the worker delivers.
    task_error = exc
    _task = None


def probe() -> Exception | None:
    """Why the delivery task cannot run on the configured backend now, or None if it can."""
    if task_framework is None:
        return ImportError("no tasks framework is installed")
    if task_error is not None:
        return task_error
    try:
        task_framework.task(_deliver)
    except Exception as exc:
        return exc
    return None


def schedule_delivery(
    message_pk: int, *, run_after: datetime | None = None, using: str | None = None
) -> bool:
    """Enqueue the delivery task for one message; False when it is left to the worker.

    Called after the enqueuing transaction commits. ``run_after`` is honoured only
    by backends that support deferred tasks; for the others the worker retries.
    ``using``: the message's database, passed on to the task.
    """
    if _task is None or not tasks_configured():
        return False
    task = _task
    if run_after is not None:
        if not task.get_backend().supports_defer:
            return False
        task = task.using(run_after=run_after)
    if using is None:
        task.enqueue(message_pk)
    else:
        task.enqueue(message_pk, using=using)
    return True
