"""The outbox peers' side of the outbox benchmark; runs inside ``.venv-bench-peers``.

    .venv-bench-peers/bin/python -m benchmarks.outbox_peers '{"peer": "mailer", ...}'

Imports nothing from robust_mail (it is not installed there). For one peer it measures
what :mod:`benchmarks.outbox` measures for robust_mail, the same way:

- enqueue: ``send_mail`` with the peer's queueing ``EMAIL_BACKEND`` (django-mailer's
  ``mailer.backend.DbBackend``, django-post-office's ``post_office.EmailBackend``), timed
  per call like any other cell;
- drain: the queue emptied, ``m`` messages queued, then the peer's own sending loop timed
  until the queue is empty: ``mailer.engine.send_all()`` (what ``manage.py send_mail`` runs)
  or ``post_office.mail.send_queued_mail_until_done()`` (what ``manage.py
  send_queued_mail`` runs; one process, ``THREADS_PER_PROCESS`` threads).

Prints one JSON line with the runs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

BACKENDS = {"mailer": "mailer.backend.DbBackend", "post_office": "post_office.EmailBackend"}


def _clear(peer: str) -> None:
    if peer == "mailer":
        from mailer.models import Message, MessageLog

        Message.objects.all().delete()
        MessageLog.objects.all().delete()
    else:
        from post_office.models import Email, Log

        Log.objects.all().delete()
        Email.objects.all().delete()


def _drain(peer: str) -> int:
    """Send everything queued; return how many messages are still queued afterwards."""
    if peer == "mailer":
        from mailer import engine
        from mailer.models import Message

        engine.send_all()
        return int(Message.objects.count())
    from post_office.mail import send_queued_mail_until_done
    from post_office.models import STATUS, Email

    lockfile = os.path.join(os.environ["ROBUST_MAIL_BENCH_DIR"], "post-office-send")
    send_queued_mail_until_done(lockfile, processes=1)
    return int(Email.objects.exclude(status=STATUS.sent).count())


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import django

    django.setup()
    from django.core import mail
    from django.core.management import call_command
    from django.test import override_settings

    from benchmarks.measure import timed_run
    from benchmarks.sending import BODY, FROM, SUBJECT, TO, stock_settings
    from benchmarks.servers import Endpoint

    def send_one() -> None:
        # Not checked here: post_office's backend returns 0 for a queued message. What
        # counts is checked after the drain (queue left empty, server's count).
        mail.send_mail(SUBJECT, BODY, FROM, TO)

    call_command("migrate", verbosity=0)
    peer = spec["peer"]
    endpoint = Endpoint(**spec["endpoint"])
    out: dict[str, Any] = {"enqueue": [], "drain": []}
    settings = {**stock_settings(endpoint), "EMAIL_BACKEND": BACKENDS[peer]}
    with override_settings(**settings):
        enqueue = spec.get("enqueue")
        if enqueue:
            for _ in range(enqueue["repeats"]):
                _clear(peer)
                r = timed_run(lambda i: send_one(), enqueue["n"], enqueue["warmup"])
                out["enqueue"].append({"latencies": r.latencies, "wall": r.wall, "cpu": r.cpu})
            _clear(peer)
        drain = spec.get("drain")
        if drain:
            for _ in range(drain["repeats"]):
                _clear(peer)
                for _ in range(drain["m"]):
                    send_one()
                cpu, began = time.process_time(), time.perf_counter()
                left = _drain(peer)
                wall, cpu = time.perf_counter() - began, time.process_time() - cpu
                out["drain"].append(
                    {"messages": drain["m"], "wall": wall, "cpu": cpu, "left": left}
                )
            _clear(peer)
    return out


def main() -> int:
    spec = json.loads(sys.argv[1])
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.peer_settings")
    os.environ["BENCH_PEER_THREADS"] = str(spec.get("threads", 4))
    try:
        result = run(spec)
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
