"""Workers as separate processes on a file database: exclusive claims, SIGTERM, DB down.

Each test writes a small settings module (the test settings plus its own database
and providers) and runs ``python -m django ...`` against it, so what runs is exactly
what a deployment runs: separate processes sharing one database.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import provider, require
from tests.ports import free_port

REPO = Path(__file__).resolve().parent.parent

ENQUEUE = """
import json, sys
import django
django.setup()
from django.core.mail import EmailMessage
from django.db import transaction
from robust_mail.outbox import enqueue
count, start = int(sys.argv[1]), int(sys.argv[2])
with transaction.atomic():
    ids = [
        enqueue(EmailMessage(f"m{i}", "body", "f@example.com", [f"r{i}@example.com"])).message_id
        for i in range(start, start + count)
    ]
print(json.dumps(ids))
"""

CLAIM_ALL = """
import json, time
import django
django.setup()
from django.db import OperationalError
from robust_mail.models import OutboxMessage
from robust_mail.outbox import claim
from robust_mail.outbox_delivery import Outcome, record
got = []
while True:
    try:
        held = claim(limit=5, lease=300)
    except OperationalError:  # SQLite: another process holds the write lock; try again
        time.sleep(0.01)
        continue
    if not held.rows:
        break
    for row in held.rows:
        got.append(row.pk)
        while True:
            try:
                assert record(row, held, Outcome(OutboxMessage.Status.SENT, {}))
                break
            except OperationalError:
                time.sleep(0.01)
print(json.dumps(got))
"""


class Project:
    """A settings module for subprocesses: the test settings with our database and mail."""

    def __init__(self, tmp_path: Path, database: dict[str, Any], robust_mail: dict[str, Any]):
        self.module = f"outbox_settings_{uuid.uuid4().hex[:8]}"
        self.dir = tmp_path
        source = f"""
            from tests.settings import *  # noqa: F403

            DATABASES = {{"default": {database!r}}}
            ROBUST_MAIL = {robust_mail!r}
        """
        (tmp_path / f"{self.module}.py").write_text(textwrap.dedent(source))

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.dir), str(REPO)])
        env["DJANGO_SETTINGS_MODULE"] = self.module
        env.pop("ROBUST_MAIL_TEST_DB", None)
        return env

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, *args],
            env=self.env(),
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"{args[:2]} failed:\n{done.stdout}\n{done.stderr}"
        return done

    def manage(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run("-m", "django", *args, timeout=timeout)

    def add_settings(self, source: str) -> None:
        """Append ``source`` (dedented) to the settings module."""
        with (self.dir / f"{self.module}.py").open("a") as settings_file:
            settings_file.write(textwrap.dedent(source))

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """``python *args`` in the background, with this project's settings."""
        return subprocess.Popen(
            [sys.executable, *args],
            env=self.env(),
            cwd=self.dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def worker(self, *args: str) -> subprocess.Popen[str]:
        return self.popen("-m", "django", "robust_mail_worker", *args)

    def enqueue(self, count: int, start: int = 0) -> list[str]:
        return list(json.loads(self.run("-c", ENQUEUE, str(count), str(start)).stdout))


def finish(process: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def claim_in_processes(env: dict[str, str], cwd: Path, count: int) -> list[int]:
    """Start ``count`` processes that each claim all they can at once; every pk claimed."""
    claimers = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIM_ALL],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    claimed: list[int] = []
    for claimer in claimers:
        code, out, err = finish(claimer, timeout=120)
        assert code == 0, err
        claimed += json.loads(out)
    return claimed


def sqlite_rows(path: Path) -> list[tuple[str, str, int, int]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT message_id, status, attempts, ambiguous FROM robust_mail_outboxmessage"
        ).fetchall()
    conn.close()
    return [tuple(r) for r in rows]


@pytest.fixture
def sqlite_project(tmp_path: Path, smtp_server: Any) -> tuple[Project, Path, Any]:
    server = smtp_server()
    db = tmp_path / "outbox.sqlite3"
    database = {"ENGINE": "django.db.backends.sqlite3", "NAME": str(db), "OPTIONS": {"timeout": 30}}
    mail = {"PROVIDERS": [provider(server, "local")], "RETRY": {"ATTEMPTS": 2, "BACKOFF": 0}}
    project = Project(tmp_path, database, mail)
    project.manage("migrate", "--verbosity", "0")
    return project, db, server


def test_claims_are_exclusive_between_processes_on_sqlite(
    sqlite_project: tuple[Project, Path, Any],
) -> None:
    project, db, _ = sqlite_project
    project.enqueue(150)
    env = project.env()
    claimed = claim_in_processes(env, project.dir, 3)

    assert len(claimed) == 150
    assert len(set(claimed)) == 150  # no message was claimed twice
    assert {status for _, status, _, _ in sqlite_rows(db)} == {"sent"}


def test_worker_once_with_threads_delivers_every_message_once(
    sqlite_project: tuple[Project, Path, Any],
) -> None:
    project, db, server = sqlite_project
    ids = project.enqueue(60)

    done = project.manage("robust_mail_worker", "--once", "--concurrency", "4", "--batch", "15")

    received = Counter(m.message_id for m in server.messages)
    assert set(received) == set(ids)
    assert set(received.values()) == {1}
    assert "batch of 15: sent 15" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("stopped: sent 60,")
    assert {status for _, status, _, _ in sqlite_rows(db)} == {"sent"}


def test_sigterm_finishes_in_flight_messages_and_releases_the_rest(
    sqlite_project: tuple[Project, Path, Any],
) -> None:
    project, db, server = sqlite_project
    server.reply_delay = 0.05
    server.mode = "slow"  # about half a second per message: the worker is busy when stopped
    ids = project.enqueue(30)
    worker = project.worker("--concurrency", "2", "--batch", "10", "--sleep", "0.2")
    server.wait_for(2, timeout=60)

    worker.send_signal(signal.SIGTERM)
    code, _, err = finish(worker)

    assert code == 0, err
    assert "SIGTERM: finishing in-flight messages" in err
    rows = sqlite_rows(db)
    assert "sending" not in {status for _, status, _, _ in rows}  # nothing left leased
    sent = {mid for mid, status, _, _ in rows if status == "sent"}
    assert 2 <= len(sent) < 30
    assert Counter(m.message_id for m in server.messages) == Counter(sent)
    assert {attempts for _, status, attempts, _ in rows if status == "queued"} == {0}

    server.mode = "accept"
    project.manage("robust_mail_worker", "--once")
    received = Counter(m.message_id for m in server.messages)
    assert set(received) == set(ids) and set(received.values()) == {1}


def test_a_second_signal_of_the_other_kind_stops_at_once(
    sqlite_project: tuple[Project, Path, Any],
) -> None:
    # systemd's SIGTERM, then Ctrl-C from someone watching: the second must not wait for
    # the in-flight message (its final dot is never answered here) like the first did.
    project, _, server = sqlite_project
    server.mode = "stall_after_data"
    project.enqueue(3)
    worker = project.worker("--batch", "3", "--sleep", "0.2")
    server.wait_for(1, timeout=60)

    worker.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # its handler runs; the worker goes on waiting for the reply
    assert worker.poll() is None
    worker.send_signal(signal.SIGINT)
    code, _, err = finish(worker, timeout=30)

    assert "SIGTERM: finishing in-flight messages" in err
    assert code == -signal.SIGINT


@pytest.fixture
def unreachable_db_project(tmp_path: Path) -> Project:
    """A project whose database is a PostgreSQL address where nothing listens."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        require(False, "psycopg is not installed")
    port = free_port()  # nothing listens there: not a PostgreSQL server, whatever binds it
    database = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "outbox",
        "USER": "nobody",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "OPTIONS": {"connect_timeout": 2},
    }
    return Project(tmp_path, database, {"PROVIDERS": ["smtp://127.0.0.1:1?name=x"]})


def test_database_down_at_enqueue_raises_a_clear_error(unreachable_db_project: Project) -> None:
    project = unreachable_db_project
    script = """
import django
django.setup()
from django.core.mail import EmailMessage
from robust_mail.outbox import enqueue
try:
    enqueue(EmailMessage("s", "b", "f@example.com", ["t@example.com"]))
except Exception as exc:
    print(type(exc).__name__, "|", exc, "|", type(exc.__cause__).__name__)
else:
    print("queued")
"""
    out = project.run("-c", script).stdout.strip()  # run() bounds a hang
    name, text, cause = (part.strip() for part in out.split("|"))
    assert name == "OutboxUnavailable"
    assert "cannot store the message in the outbox (database 'default')" in text
    assert cause == "OperationalError"


def test_worker_once_gives_up_on_a_database_that_stays_down(
    unreachable_db_project: Project,
) -> None:
    project = unreachable_db_project
    done = subprocess.run(
        [sys.executable, "-m", "django", "robust_mail_worker", "--once"],
        env=project.env(),
        cwd=project.dir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert done.stderr.count("cannot claim messages") == 2  # retried, then gave up
    assert "OperationalError" in done.stderr


SEND_WITH_THE_DATABASE_DOWN = """
import logging
import django
django.setup()
from django.core.mail import send_mail
from django.utils.log import AdminEmailHandler
from robust_mail.signals import message_failed

failed = []
message_failed.connect(lambda sender, **kw: failed.append(str(kw["result"].status)), weak=False)
print("silent:", send_mail("s", "b", "f@example.com", ["t@example.com"], fail_silently=True))
try:
    send_mail("s", "b", "f@example.com", ["t@example.com"])
except Exception as exc:
    text = " ".join(str(exc).split())
    print("raised:", type(exc).__name__, "|", text, "|", type(exc.__cause__).__name__)
# Django's error-mail handler sends with fail_silently=True: logging must not raise.
logger = logging.getLogger("a_view")
logger.addHandler(AdminEmailHandler())
logger.error("the view failed")
print("signals:", failed)
"""


@pytest.mark.parametrize(
    "backend",
    ["robust_mail.backends.OutboxEmailBackend", "robust_mail.backends.RobustEmailBackend"],
    ids=["outbox-backend", "outbox-fallback"],
)
def test_database_down_under_the_outbox_is_an_undelivered_message(
    unreachable_db_project: Project, backend: str
) -> None:
    # The outbox is all there is (OutboxEmailBackend), or all that is left (its one provider
    # refuses connections, FALLBACK "outbox"); either way its database is unreachable.
    project = unreachable_db_project
    project.add_settings(
        f"""
        EMAIL_BACKEND = {backend!r}
        ROBUST_MAIL = {{**ROBUST_MAIL, "FALLBACK": "outbox", "RETRY": {{"ATTEMPTS": 1}}}}
        ADMINS = [("Ops", "ops@example.com")]
        """
    )

    out = project.run("-c", SEND_WITH_THE_DATABASE_DOWN).stdout.splitlines()

    assert out[0] == "silent: 0"
    name, text, cause = (part.strip() for part in out[1].split("|"))
    assert name == "raised: DeliveryFailed"  # an SMTPException, as Django's backend raises
    assert "OutboxUnavailable: cannot store the message in the outbox" in text
    assert cause == "OutboxUnavailable"
    assert out[2] == "signals: ['deferred', 'deferred', 'deferred']"
