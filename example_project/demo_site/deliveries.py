"""The last deliveries, for the dashboard, recorded from robust_mail's signals.

The web server (sending synchronously) and the worker (delivering the outbox) are two
processes, so the list lives in the shared cache, not in memory. Two processes appending
at the same moment may lose one entry: acceptable for a demo display, and the outbox
table keeps the durable record.
"""

from __future__ import annotations

import threading
from typing import Any

from django.core.cache import cache
from django.utils import timezone
from django.utils.encoding import force_str

from robust_mail.envelope import pin_message
from robust_mail.signals import message_failed, message_queued, message_sent

CACHE_KEY = "example_project:recent_deliveries"
KEEP = 20

_lock = threading.Lock()


def recent() -> list[dict[str, Any]]:
    """Newest first."""
    entries = cache.get(CACHE_KEY)
    return list(entries) if isinstance(entries, list) else []


def clear() -> None:
    cache.delete(CACHE_KEY)


def add(entry: dict[str, Any]) -> None:
    entry.setdefault("at", timezone.now().isoformat(timespec="seconds"))
    with _lock:
        cache.set(CACHE_KEY, [entry, *recent()][:KEEP], None)


def _describe(message: Any) -> dict[str, Any]:
    return {
        "subject": force_str(getattr(message, "subject", "")),
        "to": ", ".join(force_str(r) for r in message.recipients()),
    }


def _on_result(sender: Any, message: Any, result: Any, **kwargs: Any) -> None:
    add(
        {
            **_describe(message),
            "status": str(result.status),
            "provider": result.provider or "",
            "attempts": result.attempts,
            "message_id": result.message_id,
            "detail": result.describe(),
        }
    )


def _on_queued(sender: Any, message: Any, outbox_id: int, **kwargs: Any) -> None:
    add(
        {
            **_describe(message),
            "status": "queued",
            "provider": "",
            "attempts": 0,
            "message_id": pin_message(message),  # already pinned: returns it
            "detail": f"stored in the outbox as #{outbox_id}",
        }
    )


def connect() -> None:
    """Connect the receivers (idempotent: ``ready()`` may run more than once in tests)."""
    message_sent.connect(_on_result, dispatch_uid="demo_site.deliveries.sent")
    message_failed.connect(_on_result, dispatch_uid="demo_site.deliveries.failed")
    message_queued.connect(_on_queued, dispatch_uid="demo_site.deliveries.queued")


def disconnect() -> None:
    """Undo :func:`connect` (for tests that install the app only for a while)."""
    message_sent.disconnect(dispatch_uid="demo_site.deliveries.sent")
    message_failed.disconnect(dispatch_uid="demo_site.deliveries.failed")
    message_queued.disconnect(dispatch_uid="demo_site.deliveries.queued")
