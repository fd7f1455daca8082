"""The terminal demo: watch robust_mail fail over between two local SMTP servers.

Run it with ``python -m example_project.demo --terminal`` (``make demo`` runs the web demo).

It starts two SMTP servers on 127.0.0.1 (primary and backup), points the
example project's settings at them, migrates SQLite, and then sends mail
through Django's plain ``send_mail`` while the primary misbehaves in
different ways. Every line robust_mail logs is shown, so you can follow the
attempts, the classification of each failure, the failover, and the breaker.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def _title(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}")


def main() -> None:
    from robust_mail.testing import SMTPTestServer

    # The local primary asks for a login so that the demo can show an authentication failure;
    # the credentials exist only for this throw-away server.
    primary = SMTPTestServer("accept", name="primary", auth={"demo": "local-only"})
    backup = SMTPTestServer("accept", name="backup")
    primary.start()
    backup.start()
    os.environ["ROBUST_MAIL_PROVIDERS"] = (
        f"smtp://demo:local-only@127.0.0.1:{primary.port}?name=primary&timeout=2 "
        f"smtp://127.0.0.1:{backup.port}?name=backup&timeout=2"
    )
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")
    os.environ.setdefault("ROBUST_MAIL_FALLBACK", "outbox")
    # Breakers and counters of this run stay in this process: the web demo's shared cache
    # must not inherit the breaker this run opens on purpose.
    os.environ["EXAMPLE_CACHE"] = "locmem"
    # Two transient failures (scenarios 2 and 3) leave the breaker closed, so that the 535
    # of scenario 4 is what opens it.
    os.environ["EXAMPLE_BREAKER_THRESHOLD"] = "3"
    try:
        _run(primary, backup)
    finally:
        from robust_mail.pool import pools

        pools.close_all()
        primary.stop()
        backup.stop()


def _run(primary: object, backup: object) -> None:
    import django
    from django.core.management import call_command

    django.setup()
    logging.getLogger("robust_mail").setLevel(logging.INFO)
    logging.getLogger("robust_mail.transport").setLevel(logging.WARNING)
    _title("Migrating the example project's SQLite database")
    call_command("migrate", verbosity=0)
    print("done")

    from django.core.mail import EmailMessage

    from robust_mail.exceptions import DeliveryFailed

    def send(subject: str) -> None:
        message = EmailMessage(
            subject, "Hello from robust_mail.", "demo@example.com", ["you@example.com"]
        )
        try:
            message.send()
        except DeliveryFailed as exc:
            print(f"  -> DeliveryFailed: {exc}")
            return
        result = message.delivery_result  # type: ignore[attr-defined]
        print(f"  -> {BOLD}{result.describe()}{RESET}")
        for error in result.errors:
            print(f"     {DIM}{error}{RESET}")

    scenarios: list[tuple[str, Callable[[], None]]] = [
        ("Both providers up: the primary delivers", lambda: None),
        (
            "Primary answers 421 (try later): transient, retried, fails over",
            lambda: _set_mode(primary, "greeting_421"),
        ),
        (
            "Primary rejects our password (535): provider-fatal, its breaker opens at once",
            lambda: _set_mode(primary, "auth_535"),
        ),
        (
            "Next message: the open breaker skips the primary without a connection attempt",
            lambda: None,
        ),
        (
            "Breaker reset, primary refuses connections: unreachable with a backup there,"
            " so no retry and its breaker opens at once",
            lambda: (_reset_breaker("primary"), setattr(primary, "mode", "refuse")),
        ),
    ]
    for index, (title, arrange) in enumerate(scenarios, 1):
        _title(f"{index}. {title}")
        arrange()
        send(f"Demo message {index}")

    _title("6. The recipient does not exist (550 5.1.1): message-fatal, no failover")
    backup.mode = "rcpt_550"  # type: ignore[attr-defined]
    send("Demo message 6")
    backup.mode = "accept"  # type: ignore[attr-defined]

    _title("What each server received")
    for server in (primary, backup):
        received = server.messages  # type: ignore[attr-defined]
        print(f"  {server.name}: {len(received)} message(s)")  # type: ignore[attr-defined]
        for item in received:
            print(f"    {item.message['Subject']}  {DIM}{item.message_id}{RESET}")
    print("\nClick through the same faults in the browser: make demo (docs/example-project.md).")


def _set_mode(server: Any, mode: str) -> None:
    # These faults happen when a connection opens: hang up on the pooled one first.
    server.mode = mode
    server.drop_connections()


def _reset_breaker(name: str) -> None:
    from robust_mail.conf import get_config
    from robust_mail.state import get_breaker

    get_breaker(name, get_config()).reset()


if __name__ == "__main__":
    main()
