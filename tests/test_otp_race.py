"""Single use under concurrency: of 50 threads verifying one right code, exactly one wins.

In-memory SQLite is not shared between threads' connections the way a server database
is, so these tests run on a SQLite *file* database added as an extra alias, and again on
a real PostgreSQL (skipped without one, failed under CI=true). They are not
``django_db`` tests (whose isolation forbids new aliases in threads): the fixture unblocks
database access itself and the file is thrown away afterwards.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from django.db import connections

from robust_mail.conf import get_config
from robust_mail.models import OneTimePassword
from robust_mail.otp import OTPService, Reason
from robust_mail.otp_store import DatabaseOTPStore
from tests.postgres_server import postgres_server
from tests.test_otp_support import Clock

__all__ = ["postgres_server"]  # the fixture

THREADS = 50
USER = "alice@example.com"


@pytest.fixture(params=["sqlite-file", pytest.param("postgres", marks=pytest.mark.postgres)])
def file_db(
    request: pytest.FixtureRequest, tmp_path: Path, django_db_blocker: Any
) -> Iterator[str]:
    """A database alias shared by threads, with the OneTimePassword table: a SQLite file,
    or a fresh database on the real PostgreSQL server of ``tests/postgres_server.py``."""
    alias = "otp_race"
    base = connections.settings["default"]
    if request.param == "postgres":
        server = request.getfixturevalue("postgres_server")
        entry = {**base, **server.django_settings(server.create_database("otp_race"))}
        entry.update(OPTIONS={}, CONN_MAX_AGE=0, TEST={})
    else:
        path = str(tmp_path / "race.sqlite3")
        entry = {**base, "NAME": path, "OPTIONS": {"timeout": 30}, "TEST": {"NAME": path}}
    connections.settings[alias] = entry
    with django_db_blocker.unblock():
        try:
            with connections[alias].schema_editor() as editor:
                editor.create_model(OneTimePassword)
            yield alias
        finally:
            connections[alias].close()
            del connections[alias]
            del connections.settings[alias]


def run_together(count: int, fn: Callable[[], Any]) -> tuple[list[Any], list[BaseException]]:
    """Start ``count`` threads that call ``fn`` at the same moment; results and errors."""
    barrier = threading.Barrier(count)
    results: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work() -> None:
        try:
            barrier.wait()
            value = fn()
            with lock:
                results.append(value)
        except BaseException as exc:
            with lock:
                errors.append(exc)
        finally:
            connections.close_all()  # this thread's connections

    threads = [threading.Thread(target=work) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results, errors


def test_fifty_threads_verify_one_code_and_exactly_one_succeeds(file_db, settings):
    settings.ROBUST_MAIL = {"OTP": {"MAX_ATTEMPTS": 1000}}  # let every thread reach consume
    otp = OTPService(store=DatabaseOTPStore(using=file_db), clock=Clock())
    code = str(otp.issue(USER, send=False).code)

    results, errors = run_together(THREADS, lambda: otp.verify(USER, code))

    assert errors == []
    assert len(results) == THREADS
    assert sum(r.ok for r in results) == 1
    assert {r.reason for r in results if not r.ok} <= {Reason.INVALID, Reason.NO_CODE}
    row = OneTimePassword.objects.using(file_db).get()
    assert row.consumed_at is not None


def test_concurrent_wrong_guesses_never_exceed_max_attempts(file_db):
    config = replace(get_config().otp, max_attempts=3)
    otp = OTPService(store=DatabaseOTPStore(using=file_db), config=config, clock=Clock())
    code = str(otp.issue(USER, send=False).code)
    wrong = "000000" if code != "000000" else "111111"

    results, errors = run_together(THREADS, lambda: otp.verify(USER, wrong))

    assert errors == []
    assert sum(r.reason is Reason.INVALID for r in results) == 3
    assert sum(r.reason is Reason.LOCKED for r in results) == THREADS - 3
    assert OneTimePassword.objects.using(file_db).get().attempts == 3
    assert otp.verify(USER, code).reason is Reason.LOCKED


def test_store_consume_is_won_by_exactly_one_thread(file_db):
    store = DatabaseOTPStore(using=file_db)
    otp = OTPService(store=store, clock=Clock())
    issued = otp.issue(USER, send=False)
    now = Clock()()

    results, errors = run_together(THREADS, lambda: store.consume(issued.key, now))

    assert errors == []
    assert results.count(True) == 1 and results.count(False) == THREADS - 1


def test_concurrent_issues_inside_transactions_still_respect_the_limits(file_db):
    # ATOMIC_REQUESTS wraps each view in a transaction: concurrent requests do not see each
    # other's uncommitted rows, and each passed the cooldown (PostgreSQL: 30 got 30 codes).
    import time

    from django.db import transaction

    from robust_mail.exceptions import RateLimited

    otp = OTPService(store=DatabaseOTPStore(using=file_db), clock=Clock())

    def request() -> bool:
        with transaction.atomic(using=file_db):
            try:
                otp.issue(USER, send=False)
            except RateLimited:
                return False
            time.sleep(0.05)  # the rest of the view, still in its transaction
        return True

    results, errors = run_together(10, request)

    assert errors == []
    assert results.count(True) == 1  # the cooldown: one code, the others refused
    assert OneTimePassword.objects.using(file_db).count() == 1


def test_an_issue_waits_for_no_other_request_and_cannot_deadlock_with_a_verify(file_db, settings):
    # Request B verifies (a row lock on the live code) and then asks for a new code in the
    # same transaction, while request A is issuing a code: waiting for each other's locks,
    # PostgreSQL would abort one with "deadlock detected". A concurrent issue is refused
    # instead (as the cooldown would refuse it), and nobody waits.
    import threading

    from django.db import transaction

    from robust_mail.exceptions import RateLimited

    settings.ROBUST_MAIL = {"OTP": {"COOLDOWN": 0}}
    store = DatabaseOTPStore(using=file_db)
    otp = OTPService(store=store, clock=Clock())
    otp.issue(USER, send=False)
    live = store.latest(USER, "login")
    assert live is not None
    b_verified, a_issued = threading.Event(), threading.Event()
    outcome: dict[str, str] = {}

    def request_b() -> None:
        try:
            with transaction.atomic(using=file_db):
                store.count_attempt(live.key, 3)  # row-locks the live code until commit
                b_verified.set()
                if postgres:
                    # Seen, not assumed: A's backend waits for a lock (ours).
                    outcome["A waited"] = str(_until_a_backend_waits_for_a_lock(file_db))
                else:
                    # SQLite shows no lock waits: give A time to reach the database lock.
                    a_issued.wait(timeout=1)
                try:
                    otp.issue(USER, send=False)
                    outcome["B"] = "issued"
                except RateLimited:
                    outcome["B"] = "refused"
        except Exception as exc:
            outcome["B"] = repr(exc)
        finally:
            connections.close_all()

    def request_a() -> None:
        try:
            b_verified.wait(timeout=5)
            with transaction.atomic(using=file_db):
                try:
                    otp.issue(USER, send=False)  # its activate waits for B's row lock
                    outcome["A"] = "issued"
                except RateLimited:
                    outcome["A"] = "refused"
                finally:
                    a_issued.set()
        except Exception as exc:
            outcome["A"] = repr(exc)
        finally:
            a_issued.set()
            connections.close_all()

    postgres = connections[file_db].vendor == "postgresql"
    threads = [threading.Thread(target=request_b), threading.Thread(target=request_a)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert outcome.pop("A waited", "True") == "True"  # the scenario did happen
    assert "deadlock" not in str(outcome)
    assert sorted(outcome.values()) in (["issued", "issued"], ["issued", "refused"])


def _until_a_backend_waits_for_a_lock(alias: str, timeout: float = 10.0) -> bool:
    """Whether, within ``timeout``, some backend of ``alias``'s database waits for a lock
    (asked on a connection of its own: pg_stat_activity is per-transaction snapshot)."""
    import time

    import psycopg

    db = connections[alias].settings_dict
    kwargs = {"host": db["HOST"], "port": db["PORT"], "user": db["USER"], "dbname": db["NAME"]}
    deadline = time.monotonic() + timeout
    with psycopg.connect(**kwargs, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = %s AND wait_event_type = 'Lock'",
                (db["NAME"],),
            ).fetchone()
            if row and row[0]:
                return True
            time.sleep(0.02)
    return False
