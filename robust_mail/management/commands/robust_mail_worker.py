"""``manage.py robust_mail_worker``: deliver the outbox, as a daemon or once."""

from __future__ import annotations

import signal
import types
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connections, router
from django.db.models import Count, Min
from django.utils import timezone

from robust_mail.models.outbox import OutboxMessage, OutboxStatus
from robust_mail.outbox_delivery import delivery_config
from robust_mail.worker import Worker

#: Longest pause between polls of an idle outbox: beyond an hour, mail queued meanwhile (a
#: fallback, a sign-in code) would wait longer than anyone would accept.
MAX_SLEEP = 3600.0


class Command(BaseCommand):
    help = (
        "Deliver messages from the robust_mail outbox. Runs until SIGTERM/SIGINT "
        "(in-flight messages are finished, claimed ones released); with --once, "
        "until no message is due."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--concurrency", type=int, default=1, help="Threads sending in parallel (default 1)."
        )
        parser.add_argument(
            "--once", action="store_true", help="Deliver every due message, then exit."
        )
        parser.add_argument(
            "--batch",
            type=int,
            default=None,
            help="Messages claimed at a time (default OUTBOX BATCH).",
        )
        parser.add_argument(
            "--sleep",
            type=float,
            default=5.0,
            help=f"Seconds to wait when no message is due (above 0, at most {MAX_SLEEP:g}; "
            "default 5).",
        )
        parser.add_argument(
            "--mailer",
            default=None,
            help="Django 6.1: the MAILERS alias whose OPTIONS deliver messages queued "
            "without one, and set LEASE and BATCH (default: 'default' if robust_mail "
            "serves it, else the first alias it serves, else ROBUST_MAIL). A message queued "
            "through an alias always goes with that alias.",
        )
        parser.add_argument(
            "--database", default=None, help="Database alias of the outbox (default: the router's)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["concurrency"] < 1:
            raise CommandError("--concurrency must be at least 1")
        if options["batch"] is not None and options["batch"] < 1:
            raise CommandError("--batch must be at least 1")
        # "not 0 < sleep" is also true of nan, which every comparison fails: a nan wait
        # returns at once, and the worker would poll the database in a busy loop.
        if not 0 < options["sleep"] <= MAX_SLEEP:
            raise CommandError(
                f"--sleep must be a number of seconds above 0, at most {MAX_SLEEP:g}"
            )
        if options["database"] is not None and options["database"] not in connections.settings:
            raise CommandError(
                f"--database: no database {options['database']!r} in settings.DATABASES"
            )
        try:
            config = delivery_config(options["mailer"])
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from exc
        _require_outbox_table(options["database"] or router.db_for_write(OutboxMessage))
        worker = Worker(
            config=config,
            concurrency=options["concurrency"],
            batch=options["batch"],
            sleep=options["sleep"],
            once=options["once"],
            using=options["database"],
            report=self._report,
        )

        def on_signal(signum: int, frame: types.FrameType | None) -> None:
            name = signal.Signals(signum).name
            self.stderr.write(f"{name}: finishing in-flight messages, then stopping")
            worker.stop()
            # A second signal stops at once, the default way: whichever it is (SIGTERM from
            # systemd, then Ctrl-C from the person watching, say).
            for stopping in previous:
                signal.signal(stopping, signal.SIG_DFL)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            stats = worker.run()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        # "lease lost" only when some were: their outcome is unknown here, another worker's.
        lost = f", lease lost {stats.lost}" if stats.lost else ""
        waiting = _waiting(options["database"]) if options["once"] else ""
        self.stdout.write(
            f"stopped: sent {stats.sent}, retried {stats.retried}, "
            f"failed {stats.failed + stats.dead}, released {stats.released}{lost}{waiting}"
        )

    def _report(self, line: str) -> None:
        self.stdout.write(line)
        self.stdout.flush()


def _require_outbox_table(alias: str) -> None:
    """A database without the outbox's table is a setup step missed, not an outage to wait
    out: say so at once. A database that cannot be asked is left to the worker's retries."""
    try:
        tables = connections[alias].introspection.table_names()
    except DatabaseError:
        return
    if OutboxMessage._meta.db_table not in tables:
        raise CommandError(
            f"database {alias!r} has no outbox table ({OutboxMessage._meta.db_table}): "
            "run `manage.py migrate` first"
        )


def _waiting(alias: str | None) -> str:
    """For ``--once``: what it left queued, not yet due, and when the first is due.

    A message the fallback queued with a provider's half-open time (or a retry's time) is
    not due yet: without this, "queue left 1" after a run that sent everything due reads
    like a message the worker missed.
    """
    rows = OutboxMessage.objects.using(alias or router.db_for_write(OutboxMessage))  # claims
    try:
        queued = rows.filter(status=OutboxStatus.QUEUED).aggregate(
            count=Count("pk"), first=Min("next_attempt_at")
        )
    except DatabaseError:
        return ""
    if not queued["count"]:
        return ""
    wait = max(0.0, (queued["first"] - timezone.now()).total_seconds())
    return f"; {queued['count']} queued for later, the first due in {wait:.0f}s"
