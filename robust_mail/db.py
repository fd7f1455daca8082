"""One row written in a transaction of its own, whoever the caller is; dropping connections.

Used for the outbox row that queueing a message writes and for the decoy row that stands in
for it (:mod:`robust_mail.otp_store`): the two must cost the same statements, so they share
this. Imports only Django's database layer.
"""

from __future__ import annotations

from django.db import DatabaseError, connections, models, transaction

__all__ = ["drop_connections", "insert"]


def insert(row: models.Model, alias: str, *, like: str | None = None) -> None:
    """INSERT ``row`` on ``alias``, committed on its own or under a savepoint.

    In autocommit (a view without ``ATOMIC_REQUESTS``) the INSERT is its own transaction:
    BEGIN and COMMIT around it would add two round trips to a database server. Inside the
    caller's transaction (or with autocommit turned off), a savepoint: a refused row (a
    duplicate key, a value a column cannot hold) then leaves that transaction usable,
    PostgreSQL included. ``like``: the database whose state decides which, when the row
    stands in for one written there (the decoy for the outbox row): both then run the same
    statements even if routers put them on different databases.
    """
    if not transaction.get_autocommit(using=like or alias):
        with transaction.atomic(using=alias):
            row.save(using=alias, force_insert=True)
    else:
        row.save(using=alias, force_insert=True)


def drop_connections() -> None:
    """Close this thread's database connections so that the next query reconnects.

    Never one inside an atomic block: closing it would break the caller's transaction (in
    tests, the test's own).
    """
    for conn in connections.all(initialized_only=True):
        if conn.in_atomic_block:
            continue
        try:
            conn.close()
        except DatabaseError:
            continue
