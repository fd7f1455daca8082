"""``manage.py robust_mail_worker``: deliver the outbox, as a daemon or once."""

from __future__ import annotations

import signal
import types
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from robust_mail.outbox_delivery import delivery_config
from robust_mail.worker import Worker


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
            help="Seconds to wait when no message is due (default 5).",
        )
        parser.add_argument(
            "--mailer",
            default=None,
            help="Django 6.1: the MAILERS alias whose OPTIONS deliver messages queued "
            "without one, and set LEASE and BATCH (default: 'default' if robust_mail "
            "serves it, else ROBUST_MAIL). A message queued through an alias always goes "
            "with that alias.",
        )
        parser.add_argument(
            "--database", default=None, help="Database alias of the outbox (default: the router's)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["concurrency"] < 1:
            raise CommandError("--concurrency must be at least 1")
        if options["batch"] is not None and options["batch"] < 1:
            raise CommandError("--batch must be at least 1")
        if options["sleep"] < 0:
            raise CommandError("--sleep must not be negative")
        try:
            config = delivery_config(options["mailer"])
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from exc
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
        self.stdout.write(
            f"stopped: sent {stats.sent}, retried {stats.retried}, "
            f"failed {stats.failed + stats.dead}, released {stats.released}"
        )

    def _report(self, line: str) -> None:
        self.stdout.write(line)
        self.stdout.flush()
