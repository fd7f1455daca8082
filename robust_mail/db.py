"""One row written in a transaction of its own, whoever the caller is.

Used for the outbox row that queueing a message writes and for the decoy row that stands in
for it (:mod:`robust_mail.otp_store`): the two must cost the same statements, so they share
this. Imports only Django's database layer.
"""

from __future__ import annotations

from django.db import models, transaction

__all__ = ["insert"]


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
