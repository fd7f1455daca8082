"""``manage.py robust_mail_status``: breakers and counters of every provider, deployment-wide.

Reads the shared cache (``ROBUST_MAIL["CACHE"]``), so with Redis it shows what every
process and machine did, not just this one.

Latency percentiles are upper bounds (seconds) of histogram buckets. :func:`collect` gives
``None`` (JSON ``null``) both when nothing was observed and when the percentile lies beyond
the last bucket; ``latency_count`` (observations) tells the two apart. ``Infinity`` is not
JSON, and this data is served as JSON (``--json``, the example project's ``/status.json``).
"""

from __future__ import annotations

import json
import math
import textwrap
import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from robust_mail import metrics
from robust_mail.conf import get_config
from robust_mail.mailers import providers_in_use
from robust_mail.otp_checks import UNSHARED_CACHES
from robust_mail.state import get_breaker

#: Counters of the second table; ``breaker_opened`` goes with the breaker in the first. Two
#: tables because one, with every counter named as in ``--json``, is some 145 columns wide.
_COUNTER_COLUMNS = (
    "sent",
    "failed",
    "retried",
    "failed_over",
    "fallback",
    "refused_recipients",
    "ambiguous",
)


class Command(BaseCommand):
    help = (
        "Show each provider's circuit breaker and delivery counters (from the shared cache). "
        "Latencies are bucket upper bounds in seconds."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--json",
            action="store_true",
            help="Print JSON instead of tables. latency_p50 and latency_p99 are null when "
            "nothing was observed (latency_count 0) or when the percentile lies beyond the "
            f"last bucket ({metrics.BUCKETS[-1]:g} s).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        data = collect()
        if options["json"]:
            self.stdout.write(json.dumps(data, indent=2, sort_keys=True, allow_nan=False))
            return
        self.stdout.write(render(data))


def collect() -> dict[str, Any]:
    """Breaker state and counters per configured provider (of the classic configuration
    and of every MAILERS alias served by robust_mail), plus any other reported ones.

    JSON-serialisable as it is, with no ``Infinity``: see the module docstring.
    """
    config = get_config()  # the counters' cache, ROBUST_MAIL's
    owners = providers_in_use()
    names = list(owners)
    # reachable False: the counters are this process's since the cache went down.
    counters, reachable = metrics.deployment_snapshot(names)
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
                "latency_count": latency["count"],
                "latency_p50": _finite(metrics.percentile(latency, 0.5)),
                "latency_p99": _finite(metrics.percentile(latency, 0.99)),
            }
        )
    return {"cache": config.cache, "cache_reachable": reachable, "providers": providers}


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isinf(value) else value


def render(data: dict[str, Any]) -> str:
    breakers = [["provider", "breaker", "half-open in", "breaker_opened", "p50", "p99"]]
    counters = [["provider", *_COUNTER_COLUMNS]]
    for entry in data["providers"]:
        values = entry["counters"]
        wait = entry["half_open_in"]
        count = entry["latency_count"]
        breakers.append(
            [
                entry["name"] + ("" if entry["configured"] else " (not configured)"),
                entry["breaker"],
                "-" if wait is None else f"{wait:.0f}s",
                str(values.get("breaker_opened", 0)),
                _seconds(entry["latency_p50"], count),
                _seconds(entry["latency_p99"], count),
            ]
        )
        counters.append([entry["name"], *(str(values.get(c, 0)) for c in _COUNTER_COLUMNS)])
    note = textwrap.fill(f"({_source(data)}; latency: bucket upper bounds)", width=100)
    return f"{_table(breakers)}\n{_table(counters)}\n{note}\n"


def _source(data: dict[str, Any]) -> str:
    cache = data["cache"]
    if not data.get("cache_reachable", True):
        return f"cache {cache!r} unreachable: this process's counts since it went down"
    unshared = UNSHARED_CACHES.get(str(settings.CACHES.get(cache, {}).get("BACKEND", "")))
    if unshared is not None:
        # LocMem: this command's own process, which sent nothing; other processes' counts
        # and breakers are invisible here.
        return (
            f"cache {cache!r} is {unshared}: this shows only this command's own process; "
            "point ROBUST_MAIL['CACHE'] at Redis or memcached to see the deployment"
        )
    return f"shared state read from cache {cache!r}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def _seconds(value: float | None, count: int) -> str:
    if value is None:
        # Nothing observed, or beyond the last bucket: collect() keeps JSON free of inf.
        return f">{metrics.BUCKETS[-1]:g}s" if count else "-"
    return f"<={value * 1000:.0f}ms" if value < 1 else f"<={value:g}s"
