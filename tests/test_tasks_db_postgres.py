"""The delivery task on the database tasks backend: django-tasks-db workers on PostgreSQL.

``OutboxEmailBackend`` queues the messages; robust_mail enqueues one delivery task
per message once the transaction commits; two ``db_worker`` processes run them, and
no ``robust_mail_worker`` runs. On Django 5.2 the task is defined with the
``django-tasks`` backport, on 6.x with ``django.tasks``. Without django-tasks-db or
PostgreSQL it is skipped, except under CI=true, where it fails.
"""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import provider, require
from tests.postgres_server import PostgresServer, postgres_server
from tests.test_outbox_postgres import MAIL, pg, pg_rows, wait_until
from tests.test_worker_processes import Project, finish

__all__ = ["pg", "postgres_server"]  # the fixtures

pytestmark = pytest.mark.postgres

COUNT = 300

SEND_MAIL = """
import sys
import django
django.setup()
from django.core.mail import send_mail
from django.db import transaction
with transaction.atomic():  # as a view would: the tasks are enqueued only after the commit
    for i in range(int(sys.argv[1])):
        send_mail(f"m{i}", "body", "f@example.com", [f"r{i}@example.com"])
"""


def importable(module: str) -> bool:
    try:
        __import__(module)
    except (ImportError, ValueError):  # django-tasks-db raises ValueError without a framework
        return False
    return True


def task_rows(server: PostgresServer, dbname: str) -> list[tuple[Any, ...]]:
    return server.query(
        dbname, "SELECT status, worker_ids, return_value FROM django_tasks_database_dbtaskresult"
    )


def sessions(server: PostgresServer, dbname: str) -> int:
    ((found,),) = server.query(
        "postgres",
        # Autovacuum workers appear there too; only clients count.
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = %s AND backend_type = 'client backend'",
        (dbname,),
    )
    return int(found)


def test_two_db_workers_deliver_every_message_once_on_postgres(
    tmp_path: Path, pg: PostgresServer, smtp_server: Any
) -> None:
    require(importable("django_tasks_db"), "django-tasks-db is not installed")
    server = smtp_server()
    dbname = pg.create_database()
    project = Project(
        tmp_path, pg.django_settings(dbname), {"PROVIDERS": [provider(server, "local")], **MAIL}
    )
    project.add_settings("""
        EMAIL_BACKEND = "robust_mail.backends.OutboxEmailBackend"
        INSTALLED_APPS = [*INSTALLED_APPS, "django_tasks_db"]
        TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}
    """)
    project.manage("migrate", "--verbosity", "0")
    workers = [
        project.popen(
            *("-m", "django", "db_worker", "--worker-id", f"w{i}"),
            # --verbosity 0: a log line per task would fill the pipe and stall the worker.
            *("--interval", "0.2", "--no-startup-delay", "--verbosity", "0"),
        )
        for i in (1, 2)
    ]

    def polling() -> bool:
        for worker in workers:
            assert worker.poll() is None, f"a db_worker exited early:\n{finish(worker)[2]}"
        return sessions(pg, dbname) == 2

    try:
        # Both workers polling before the first task exists, so that both take a share.
        wait_until(polling, 30, "both workers to poll")
        project.run("-c", SEND_MAIL, str(COUNT))
        server.wait_for(COUNT, timeout=60)
        wait_until(
            lambda: {status for _, status, _, _ in pg_rows(pg, dbname)} == {"sent"},
            30,
            "the outcomes",
        )
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)  # db_worker finishes its current task, then exits
        results = [finish(worker) for worker in workers]

    for code, _, err in results:
        assert code == 0 or _stopped_inside_its_own_commit(err), err
    rows = pg_rows(pg, dbname)
    assert len(rows) == COUNT
    received = Counter(m.message_id for m in server.messages)
    assert set(received) == {mid for mid, _, _, _ in rows}
    assert set(received.values()) == {1}
    assert {attempts for _, _, attempts, _ in rows} == {1}
    tasks = task_rows(pg, dbname)
    assert len(tasks) == COUNT  # one task per message, each run once and to completion
    assert {(status, value) for status, _, value in tasks} == {("SUCCESSFUL", "sent")}
    assert {worker for _, ids, _ in tasks for worker in ids} == {"w1", "w2"}


def _stopped_inside_its_own_commit(err: str) -> bool:
    """django-tasks-db's db_worker stops on SIGTERM with sys.exit() wherever it is; landing
    inside the COMMIT of its own polling transaction, that ends in a ProgrammingError and a
    non-zero exit (seen once in CI). Its shutdown, not a failed delivery: tolerated only
    when that is the whole story, with no frame of robust_mail's in the traceback."""
    return (
        "in shutdown" in err
        and "can't change 'autocommit' now" in err
        and "/robust_mail/" not in err
    )
