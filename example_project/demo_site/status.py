"""What the dashboard shows, gathered in one place for the page and its JSON twin."""

from __future__ import annotations

from typing import Any

from django.db.models import Count

from example_project.demo_site import deliveries, embedded
from robust_mail.management.commands.robust_mail_status import collect
from robust_mail.models import OutboxMessage

NEWEST = 10


def providers() -> list[dict[str, Any]]:
    """Breaker and counters per provider (from the shared cache), with its local server."""
    entries = collect()["providers"]
    for entry in entries:
        server = embedded.get(entry["name"])
        entry["server"] = None if server is None else server_info(server)
    return entries


def server_info(server: Any) -> dict[str, Any]:
    mode = str(server.mode)
    return {
        "name": server.name,
        "address": f"{server.host}:{server.port}",
        "mode": mode,
        "mode_label": embedded.MODES.get(mode, mode),
        "up": mode == "accept",
        "received": len(server.messages),
    }


def outbox() -> dict[str, Any]:
    counts = dict(OutboxMessage.objects.values_list("status").annotate(n=Count("pk")).order_by())
    statuses = [
        {"status": value, "count": counts.get(value, 0)} for value in OutboxMessage.Status.values
    ]
    newest = [
        {
            "id": row.pk,
            "created_at": row.created_at.isoformat(timespec="seconds"),
            "status": row.status,
            "subject": row.subject,
            "recipients": row.recipients,
            "attempts": row.attempts,
            "provider": row.provider,
            "next_attempt_at": row.next_attempt_at.isoformat(timespec="seconds"),
            "last_error": row.last_error,
        }
        for row in OutboxMessage.objects.order_by("-created_at", "-pk")[:NEWEST]
    ]
    pending = sum(counts.get(s, 0) for s in ("queued", "sending"))
    return {"statuses": statuses, "pending": pending, "newest": newest}


def snapshot() -> dict[str, Any]:
    """Everything on the dashboard, JSON-serialisable."""
    return {
        "providers": providers(),
        "servers": [server_info(s) for s in embedded.servers()],
        "outbox": outbox(),
        "deliveries": deliveries.recent(),
    }
