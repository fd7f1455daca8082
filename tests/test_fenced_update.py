"""FencedUpdates writes what ``QuerySet.update()`` would, compiling once per shape.

On SQLite and on PostgreSQL (the real server of tests/postgres_server.py; skipped without
it, except under CI=true, where it fails).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from django.db import transaction

from robust_mail import fenced_update
from robust_mail.fenced_update import FencedUpdates
from robust_mail.models.outbox import OutboxMessage
from tests.postgres_server import database_alias, postgres_server

__all__ = ["postgres_server"]  # the fixture

ALIAS = "fenced"
WHEN = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
FENCE = {"lease_token": "ours", "status": "sending"}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path, django_db_blocker: Any) -> Iterator[str]:
    with database_alias(ALIAS, request, tmp_path, django_db_blocker, "fenced_update") as alias:
        yield alias


def rows(alias: str, count: int, token: str = "ours") -> list[int]:
    made = [
        OutboxMessage.objects.using(alias).create(
            message_id=f"<{i}@test>", payload={"subject": "s"}, status="sending", lease_token=token
        )
        for i in range(count)
    ]
    return [row.pk for row in made]


def sent(
    provider: str, at: datetime | None, refused: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "status": "sent",
        "lease_until": None,
        "lease_token": "",
        "provider": provider,
        "sent_at": at,
        "refused": refused or {},
        "ambiguous": False,
    }


def write_all(alias: str, writes: list[tuple[int, dict[str, Any]]]) -> tuple[list[bool], Any]:
    updates = FencedUpdates(OutboxMessage.objects.all(), alias, FENCE)
    with transaction.atomic(using=alias):
        written = [updates.write(pk, values) for pk, values in writes]
    return written, updates


def stored(alias: str, pk: int) -> tuple[Any, ...]:
    row = OutboxMessage.objects.using(alias).get(pk=pk)
    return (row.status, row.lease_token, row.provider, row.sent_at, row.refused, row.lease_until)


def test_rows_of_one_shape_share_one_statement_and_each_gets_its_values(db: str) -> None:
    pks = rows(db, 4)
    writes = [
        (pk, sent(f"p{i}", WHEN.replace(minute=i), {"x@example.com": [550, f"no {i}"]}))
        for i, pk in enumerate(pks)
    ]

    written, updates = write_all(db, writes)

    assert written == [True] * 4
    assert len(updates._compiled) == 1 and None not in updates._compiled.values()
    for i, pk in enumerate(pks):
        assert stored(db, pk) == (
            "sent",
            "",
            f"p{i}",
            WHEN.replace(minute=i),
            {"x@example.com": [550, f"no {i}"]},
            None,
        )


def test_a_null_makes_another_shape_and_is_written_as_null(db: str) -> None:
    pks = rows(db, 3)
    writes = [(pks[0], sent("a", WHEN)), (pks[1], sent("b", None)), (pks[2], sent("c", WHEN))]

    written, updates = write_all(db, writes)

    assert written == [True] * 3 and len(updates._compiled) == 2
    assert [stored(db, pk)[2:4] for pk in pks] == [("a", WHEN), ("b", None), ("c", WHEN)]


def test_the_fence_holds_row_by_row(db: str) -> None:
    ours = rows(db, 2)
    theirs = rows(db, 1, token="someone-else")
    writes = [(ours[0], sent("a", WHEN)), (theirs[0], sent("b", WHEN)), (ours[1], sent("c", WHEN))]

    written, _ = write_all(db, writes)

    assert written == [True, False, True]
    assert stored(db, theirs[0])[:3] == ("sending", "someone-else", "")


def test_a_shape_whose_parameters_differ_from_djangos_keeps_using_update(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fenced_update, "_same", lambda mine, theirs: False)
    pks = rows(db, 3)

    written, updates = write_all(db, [(pk, sent(str(pk), WHEN)) for pk in pks])

    assert written == [True] * 3 and list(updates._compiled.values()) == [None]
    assert [stored(db, pk)[2] for pk in pks] == [str(pk) for pk in pks]


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres)])
def pg_db(request: pytest.FixtureRequest, tmp_path: Path, django_db_blocker: Any) -> Iterator[str]:
    with database_alias(ALIAS, request, tmp_path, django_db_blocker, "refusal") as alias:
        yield alias


def test_a_row_the_database_refuses_is_written_bare_and_costs_the_others_nothing(
    pg_db: str, smtp_server: Any, robust: Any
) -> None:
    from collections import Counter

    from django.core.mail import EmailMessage

    from robust_mail.outbox import claim, enqueue
    from robust_mail.outbox_delivery import attempt
    from robust_mail.worker import Worker
    from tests.conftest import provider

    robust([provider(smtp_server(), "local")])
    for i in range(3):
        enqueue(EmailMessage(f"m{i}", "Body", "from@example.com", ["to@example.com"]), using=pg_db)
    worker = Worker(once=True, using=pg_db, report=lambda line: None)
    held = claim(limit=3, lease=60, using=pg_db)
    counts: Counter[str] = Counter()
    group = [
        (held, row, attempt(row, dispatcher=worker.dispatcher, config=worker.config.outbox), counts)
        for row in held.rows
    ]
    # A server's reply quoting a NUL, which PostgreSQL refuses in text and jsonb: stored
    # with U+FFFD in its place.
    group[0][2].fields["last_error"] = "refused: \x00 \udcff"
    group[0][2].fields["refused"] = {"to@example.com": [550, "no\x00such user"]}
    # A value a column cannot hold: the group's transaction fails, the rows are written one
    # by one, and that one without its details (left "sending", it would be taken over
    # after its lease and sent again, and again).
    group[1][2].fields["provider"] = "p" * 101

    worker._record_group(group)

    assert counts == Counter({"sent": 3})
    stored_rows = {row.pk: row for row in OutboxMessage.objects.using(pg_db)}
    first, second, third = (stored_rows[r.pk] for r in held.rows)
    assert [first.status, second.status, third.status] == ["sent", "sent", "sent"]
    assert (first.last_error, first.refused) == (
        "refused: \ufffd \ufffd",
        {"to@example.com": [550, "no\ufffdsuch user"]},
    )
    assert second.provider == "" and second.sent_at is not None
    assert "recorded without its details" in second.last_error
    assert "DataError" in second.last_error
    assert third.provider == "local"
