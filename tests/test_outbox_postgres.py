"""Scale-out on a real PostgreSQL: SKIP LOCKED claims, worker processes, SIGKILL, DB loss.

The server is started by ``tests/postgres_server.py`` (skipped without PostgreSQL,
failed under CI=true). Every test gets its own database.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command

from tests.conftest import provider
from tests.postgres_server import PostgresServer, postgres_server, require_postgres
from tests.test_worker_processes import Project, claim_in_processes, finish

__all__ = ["postgres_server"]  # the fixture

pytestmark = pytest.mark.postgres

# LEASE must outlast one worst-case delivery (RETRY DEADLINE + 10 x TIMEOUT, see check
# W030); short enough that a killed worker's messages are taken over within the test.
MAIL = {"RETRY": {"ATTEMPTS": 2, "BACKOFF": 0, "DEADLINE": 5}, "OUTBOX": {"LEASE": 25}}


@pytest.fixture
def pg(postgres_server: PostgresServer) -> PostgresServer:
    """The session's PostgreSQL; each test makes its own database on it."""
    return postgres_server


def pg_rows(server: PostgresServer, dbname: str) -> list[tuple[Any, ...]]:
    return server.query(
        dbname, "SELECT message_id, status, attempts, ambiguous FROM robust_mail_outboxmessage"
    )


def sent_count(server: PostgresServer, dbname: str) -> int:
    return sum(1 for _, status, _, _ in pg_rows(server, dbname) if status == "sent")


def make_project(tmp_path: Path, pg: PostgresServer, smtp: Any, **mail: Any) -> tuple[Project, str]:
    dbname = pg.create_database()
    config = {"PROVIDERS": [provider(smtp, "local", TIMEOUT=2)], **MAIL, **mail}
    project = Project(tmp_path, pg.django_settings(dbname), config)
    project.manage("migrate", "--verbosity", "0")
    return project, dbname


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_skip_locked_claims_are_exclusive_between_processes(
    tmp_path: Path, pg: PostgresServer, smtp_server: Any
) -> None:
    project, dbname = make_project(tmp_path, pg, smtp_server())
    project.enqueue(300)
    claimed = claim_in_processes(project.env(), project.dir, 4)
    assert len(claimed) == 300 and len(set(claimed)) == 300
    assert sent_count(pg, dbname) == 300


@pytest.mark.parametrize(
    "count", [600, pytest.param(5000, marks=pytest.mark.slow, id="5000")], ids=str
)
def test_three_workers_drain_the_outbox_while_one_is_killed(
    count: int, tmp_path: Path, pg: PostgresServer, smtp_server: Any
) -> None:
    server = smtp_server()
    project, dbname = make_project(tmp_path, pg, server)
    ids = project.enqueue(count)
    args = ("--concurrency", "4", "--batch", "25", "--sleep", "0.5")
    workers = [project.worker(*args) for _ in range(3)]
    try:
        server.wait_for(count // 5, timeout=120)
        # Slow replies for a moment, so that every worker is surely inside a batch,
        # holding claimed messages (some past DATA), when the first one is killed.
        server.reply_delay = 0.2
        server.mode = "slow"
        time.sleep(1.0)
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait()
        server.mode = "accept"
        wait_until(lambda: sent_count(pg, dbname) == count, 180, "every message")
    finally:
        for worker in workers[1:]:
            worker.send_signal(signal.SIGTERM)
        results = [finish(worker) for worker in workers]

    assert results[0][0] == -signal.SIGKILL
    for code, _, err in results[1:]:
        assert code == 0, err
    rows = pg_rows(pg, dbname)
    assert {status for _, status, _, _ in rows} == {"sent"}
    received = Counter(m.message_id for m in server.messages)
    assert set(received) == set(ids)  # every message delivered
    duplicated = {mid for mid, times in received.items() if times > 1}
    ambiguous = {mid for mid, _, _, flagged in rows if flagged}
    # Only a message whose worker died holding it may arrive twice, and it is flagged.
    assert duplicated <= ambiguous
    assert ambiguous  # the killed worker's messages were taken over after its lease


def test_worker_survives_losing_the_database_and_resumes(tmp_path: Path, smtp_server: Any) -> None:
    own = PostgresServer(require_postgres())  # its own server: this test stops it
    own.start()
    try:
        server = smtp_server()
        project, dbname = make_project(tmp_path, own, server)
        first = project.enqueue(5)
        worker = project.worker("--sleep", "0.2")
        try:
            server.wait_for(5, timeout=60)
            wait_until(lambda: sent_count(own, dbname) == 5, 60, "the outcomes")
            own.stop()
            time.sleep(1.5)  # the worker polls a dead database meanwhile
            assert worker.poll() is None
            own.start()
            second = project.enqueue(5, start=5)
            server.wait_for(10, timeout=90)
        finally:
            worker.send_signal(signal.SIGTERM)
            code, _, err = finish(worker)
        assert code == 0, err
        assert "cannot claim messages" in err
        received = Counter(m.message_id for m in server.messages)
        assert set(received) == set(first + second) and set(received.values()) == {1}
    finally:
        own.cleanup()


def test_database_lost_in_the_middle_of_a_run_costs_no_outcome(
    tmp_path: Path, smtp_server: Any, pg: PostgresServer
) -> None:
    # A one-thread worker records each outcome as the run goes. When the third message
    # reaches the server, the worker's database session is killed: its outcome cannot be
    # written at once, and waiting the outage out mid-run would leave a reply owed on the
    # SMTP session. The outcomes from there on are written when the run ends (still
    # "sending" when the last message arrives); nothing is lost or sent twice.
    killed: list[int] = []
    at_last: list[dict[str, str]] = []

    def on_message(received: Any) -> None:
        subject = received.message["Subject"]
        if subject == "m2":
            rows = pg.query(
                dbname,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (dbname,),
            )
            killed.append(len(rows))
        elif subject == "m5":
            at_last.append(
                dict(pg.query(dbname, "SELECT subject, status FROM robust_mail_outboxmessage"))
            )

    server = smtp_server(pipelining=True, on_message=on_message)
    project, dbname = make_project(tmp_path, pg, server)
    ids = project.enqueue(6)

    code, _, err = finish(project.worker("--once"), timeout=120)

    assert code == 0, err
    assert killed == [1]  # the worker's one session was there, and was killed
    assert at_last[0]["m0"] == "sent"  # recorded while the run went on
    # m2's outcome is known only after the server answered it, by then the session was
    # killed: it, and what follows, wait for the end of the run. (m1's write races the
    # kill.)
    assert at_last[0]["m2"] == "sending"
    received = Counter(m.message_id for m in server.messages)
    assert set(received) == set(ids) and set(received.values()) == {1}
    rows = pg_rows(pg, dbname)
    assert {status for _, status, _, _ in rows} == {"sent"}
    assert not any(ambiguous for _, _, _, ambiguous in rows)
    assert "not recorded" not in err


ENQUEUE_IN_TRANSACTIONS = """
import django
django.setup()
from django.core.mail import EmailMessage
from django.db import transaction
from robust_mail.models import OutboxMessage
from robust_mail.outbox import enqueue


def message(**headers):
    return EmailMessage("s", "b", "f@example.com", ["t@example.com"], headers=headers)


# Autocommit: the duplicate key finds the row already there.
first = enqueue(message(), idempotency_key="k")
print("autocommit duplicate", enqueue(message(), idempotency_key="k").pk == first.pk)
# Inside the caller's transaction: a refused row leaves that transaction usable.
with transaction.atomic():
    again = enqueue(message(), idempotency_key="k")
    print("in transaction duplicate", again.pk == first.pk)
    enqueue(message(), idempotency_key="after")
print("rows", OutboxMessage.objects.count())
"""


def test_a_duplicate_key_leaves_the_callers_transaction_usable(
    tmp_path: Path, pg: PostgresServer, smtp_server: Any
) -> None:
    project, _ = make_project(tmp_path, pg, smtp_server())
    out = project.run("-c", ENQUEUE_IN_TRANSACTIONS).stdout.splitlines()
    # PostgreSQL aborts a transaction at its first error: without a savepoint around the
    # refused INSERT, the caller's next statement (and its commit) would fail.
    assert out == ["autocommit duplicate True", "in transaction duplicate True", "rows 2"]


def test_sending_threads_reconnect_after_the_database_restarts(
    smtp_server: Any, robust: Any, django_db_blocker: Any
) -> None:
    # In process, several sending threads: each has its own database connection, used by
    # message_sent receivers and by releasing claimed rows on a stop. After a restart of
    # the database those connections are dead; the threads must reconnect, not fail every
    # query from then on.
    from django.core.mail import EmailMessage
    from django.db import connections, transaction

    from robust_mail.models import OutboxMessage
    from robust_mail.outbox import enqueue
    from robust_mail.signals import message_sent
    from robust_mail.worker import Worker

    own = PostgresServer(require_postgres())  # its own server: this test restarts it
    own.start()
    alias = "restarted"
    entry = {**connections.settings["default"], **own.django_settings(own.create_database())}
    entry.update(OPTIONS={}, TEST={}, CONN_MAX_AGE=0)
    connections.settings[alias] = entry
    receivers: list[str] = []
    workers: list[Worker] = []

    def audit(sender: Any, **kwargs: Any) -> None:
        if threading.current_thread().name.startswith("robust_mail_worker-"):
            try:
                OutboxMessage.objects.using(alias).count()
                receivers.append("ok")
            except Exception as exc:
                receivers.append(type(exc).__name__)

    def restart_and_stop(received: Any) -> None:
        # Mid-batch, with both threads holding connections opened before the restart.
        if received.message["Subject"] == "late3" and not workers[0].stopping:
            own.stop()
            own.start()
            workers[0].stop()

    def queue(prefix: str, count: int) -> None:
        for i in range(count):
            message = EmailMessage(f"{prefix}{i}", "b", "f@example.com", [f"r{i}@example.com"])
            enqueue(message, using=alias)

    def statuses() -> Counter[str]:
        return Counter(OutboxMessage.objects.using(alias).values_list("status", flat=True))

    server = smtp_server(on_message=restart_and_stop)
    robust([provider(server, "only")], OUTBOX={"LEASE": 60})
    message_sent.connect(audit)
    thread: threading.Thread | None = None
    try:
        with django_db_blocker.unblock():
            call_command("migrate", database=alias, verbosity=0)
            worker = Worker(concurrency=2, batch=20, sleep=0.1, using=alias)
            workers.append(worker)
            thread = threading.Thread(target=worker.run, daemon=True)
            thread.start()
            queue("early", 4)
            server.wait_for(4, timeout=60)
            wait_until(lambda: statuses() == {"sent": 4}, 60, "the first outcomes")
            own.stop()
            own.start()
            connections[alias].close()  # this thread's, for queueing
            receivers.clear()
            queue("again", 4)
            server.wait_for(8, timeout=60)
            wait_until(lambda: statuses() == {"sent": 8}, 60, "the outcomes after the restart")
            assert receivers == ["ok"] * 4

            # A second restart in the middle of a batch, then a stop: the rows not yet
            # sent are released (queued again), not left "sending" until their lease.
            server.reply_delay = 0.2
            server.mode = "slow"
            # In one commit, so that one claim (batch=20) takes them all: a row queued after
            # the last claim would stay queued without having been released.
            with transaction.atomic(using=alias):
                queue("late", 20)
            thread.join(120)
            assert not thread.is_alive()
            connections[alias].close()
            left = statuses()
            assert left["sending"] == 0
            assert left["queued"] > 0 and left["sent"] + left["queued"] == 28
            assert worker.stats.released == left["queued"]
    finally:
        message_sent.disconnect(audit)
        for worker in workers:
            worker.stop()
        if thread is not None:
            thread.join(60)
        connections[alias].close()
        del connections[alias]
        del connections.settings[alias]
        own.cleanup()
