"""``manage.py robust_mail_status``: breakers and counters of every provider, deployment-wide.

Reads the shared cache (``ROBUST_MAIL["CACHE"]``), so with Redis it shows what every
process and machine did, not just this one.
"""

from __future__ import annotations

import json
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from robust_mail import metrics
from robust_mail.conf import get_config
from robust_mail.mailers import providers_in_use
from robust_mail.state import get_breaker

_COLUMNS = ("sent", "failed", "retried", "failed_over", "refused_recipients", "ambiguous")


class Command(BaseCommand):
    help = "Show each provider's circuit breaker and delivery counters (from the shared cache)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")

    def handle(self, *args: Any, **options: Any) -> None:
        data = collect()
        if options["json"]:
            self.stdout.write(json.dumps(data, indent=2, sort_keys=True))
            return
        self.stdout.write(render(data))


def collect() -> dict[str, Any]:
    """Breaker state and counters per configured provider (of the classic configuration
    and of every MAILERS alias served by robust_mail), plus any other reported ones."""
    config = get_config()  # the counters' cache, ROBUST_MAIL's
    owners = providers_in_use()
    names = list(owners)
    counters = metrics.snapshot(names)
    now = time.time()
    providers: list[dict[str, Any]] = []
    for name in [*names, *sorted(set(counters) - set(names))]:
        breaker = get_breaker(name, owners.get(name, config))
        retry_at = breaker.retry_at
        latency = counters.get(name, {}).get("latency", {"count": 0, "buckets": {}})
        providers.append(
            {
                "name": name,
                "configured": name in names,
                "breaker": str(breaker.state),
                "consecutive_failures": breaker.failures,
                "half_open_in": None if retry_at is None else max(0.0, round(retry_at - now, 1)),
                "counters": {k: v for k, v in counters.get(name, {}).items() if k != "latency"},
                "latency_p50": metrics.percentile(latency, 0.5),
                "latency_p99": metrics.percentile(latency, 0.99),
            }
        )
    return {"cache": config.cache, "providers": providers}


def render(data: dict[str, Any]) -> str:
    header = ["provider", "breaker", "half-open in", *_COLUMNS, "p50", "p99"]
    rows = [header]
    for entry in data["providers"]:
        counters = entry["counters"]
        wait = entry["half_open_in"]
        rows.append(
            [
                entry["name"] + ("" if entry["configured"] else " (not configured)"),
                entry["breaker"],
                "-" if wait is None else f"{wait:.0f}s",
                *(str(counters.get(column, 0)) for column in _COLUMNS),
                _seconds(entry["latency_p50"]),
                _seconds(entry["latency_p99"]),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(
        f"\n(shared state read from cache {data['cache']!r}; latency: bucket upper bounds)"
    )
    return "\n".join(lines) + "\n"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value == float("inf"):
        return ">60s"
    return f"<={value * 1000:.0f}ms" if value < 1 else f"<={value:g}s"
