"""``manage.py robust_mail_purge --older-than DAYS``: delete finished outbox rows."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections, router
from django.utils import timezone

from robust_mail.models.outbox import OutboxMessage, OutboxStatus

#: Rows deleted per statement, so a large purge never holds one huge transaction.
CHUNK = 1000
FINISHED = (OutboxStatus.SENT, OutboxStatus.FAILED, OutboxStatus.DEAD)
#: A century: far more than any retention policy, far less than the ~739,000 days back to
#: year 1, where the cutoff date would overflow.
MAX_DAYS = 36500


class Command(BaseCommand):
    help = (
        "Delete sent, failed and dead outbox messages created more than DAYS days ago, "
        "and expired one-time passwords. Queued and sending messages are never touched."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than",
            type=float,
            required=True,
            metavar="DAYS",
            help=f"Age in days of the finished messages to delete (0 to {MAX_DAYS}; 0: every "
            "finished message).",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Count what would be deleted; delete nothing."
        )
        parser.add_argument(
            "--database",
            default=None,
            help="Database alias of the outbox (default: the router's).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        days = options["older_than"]
        # "not 0 <= days" is also true of nan, which every comparison fails.
        if not 0 <= days <= MAX_DAYS:
            raise CommandError(f"--older-than must be a number of days from 0 to {MAX_DAYS}")
        alias = options["database"] or router.db_for_write(OutboxMessage)
        if alias not in connections.settings:  # DATABASES, as Django reads it
            raise CommandError(f"--database: no database {alias!r} in settings.DATABASES")
        cutoff = timezone.now() - timedelta(days=days)
        old = OutboxMessage.objects.using(alias).filter(status__in=FINISHED, created_at__lt=cutoff)
        if options["dry_run"]:
            self.stdout.write(f"would delete {old.count()} outbox message(s)")
            return
        deleted = 0
        while True:
            pks = list(old.order_by("pk").values_list("pk", flat=True)[:CHUNK])
            if not pks:
                break
            # Filtered again: a row requeued since the SELECT ("Retry now") is kept.
            count, _ = old.filter(pk__in=pks).delete()
            deleted += count
        self.stdout.write(f"deleted {deleted} outbox message(s) older than {days:g} day(s)")
        self._purge_codes()

    def _purge_codes(self) -> None:
        try:
            from robust_mail import otp
        except ImportError:
            return
        purge = getattr(otp, "purge_expired", None)
        if purge is None:
            return
        removed = purge()
        self.stdout.write(f"deleted {removed} expired one-time password(s)")
