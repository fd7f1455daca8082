"""Prometheus collector for robust_mail's shared metrics (the ``[prometheus]`` extra).

Register it once, e.g. in your ``AppConfig.ready()``::

    from robust_mail.prometheus import register
    register()

Each scrape reads :func:`robust_mail.metrics.snapshot` (the counters of the whole
deployment, from the shared cache) and, for the configured providers, the breakers' state.
Exported families, all labelled ``provider``:

=========================================  =========  =================================
``robust_mail_messages_sent_total``        counter    accepted by the provider
``robust_mail_send_failures_total``        counter    attempts that failed there
``robust_mail_retries_total``              counter    retries after transient failures
``robust_mail_failovers_total``            counter    messages handed to the next one
``robust_mail_fallbacks_total``            counter    handled by the fallback
``robust_mail_breaker_opened_total``       counter    times the breaker opened
``robust_mail_refused_recipients_total``   counter    recipients refused
``robust_mail_ambiguous_deliveries_total`` counter    no reply after DATA
``robust_mail_send_duration_seconds``      histogram  time to deliver one message
``robust_mail_breaker_state``              gauge      0 closed, 1 open, 2 half-open
=========================================  =========  =================================

Because the counters are deployment-wide, scrape one process only (or aggregate with
``max`` rather than ``sum``), otherwise every message is counted once per scraped process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from prometheus_client.core import (
    REGISTRY,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from robust_mail import metrics
from robust_mail.breaker import BreakerState
from robust_mail.mailers import providers_in_use

__all__ = ["RobustMailCollector", "register"]

logger = logging.getLogger("robust_mail.prometheus")

#: metrics counter name -> (family name without ``_total``, help)
COUNTER_FAMILIES: dict[str, tuple[str, str]] = {
    "sent": ("robust_mail_messages_sent", "Messages accepted by the provider."),
    "failed": (
        "robust_mail_send_failures",
        "Messages that failed at the provider, after its retries.",
    ),
    "retried": ("robust_mail_retries", "Retries after a transient failure."),
    "failed_over": (
        "robust_mail_failovers",
        "Messages the provider was tried for after an earlier provider failed.",
    ),
    "fallback": ("robust_mail_fallbacks", "Messages handled by the fallback."),
    "breaker_opened": ("robust_mail_breaker_opened", "Times the circuit breaker opened."),
    "refused_recipients": (
        "robust_mail_refused_recipients",
        "Recipients refused while the message was accepted for others.",
    ),
    "ambiguous": (
        "robust_mail_ambiguous_deliveries",
        "Attempts without a reply after DATA (the provider may have the message).",
    ),
}

DURATION = (
    "robust_mail_send_duration_seconds",
    "Time to deliver one message through the provider.",
)
BREAKER_STATE = (
    "robust_mail_breaker_state",
    "Circuit breaker state: 0 closed, 1 open, 2 half-open.",
)
STATE_VALUES = {BreakerState.CLOSED: 0.0, BreakerState.OPEN: 1.0, BreakerState.HALF_OPEN: 2.0}


class RobustMailCollector(Collector):
    """Reads the shared metrics at scrape time; never raises into the scrape."""

    def collect(self) -> Iterator[Metric]:
        try:
            snapshot, shared = metrics.deployment_snapshot(_provider_names())
        except Exception:
            logger.exception("robust_mail metrics could not be read")
            return
        if not shared:
            # One process's counts in place of the deployment's would look like a counter
            # reset, then a jump at recovery: export none until the cache answers (the
            # counts made meanwhile are written then, nothing is lost).
            logger.debug("metrics cache unreachable: counters left out of this scrape")
            snapshot = {}
        counters = {
            name: CounterMetricFamily(family, help_text, labels=["provider"])
            for name, (family, help_text) in COUNTER_FAMILIES.items()
        }
        latency = HistogramMetricFamily(DURATION[0], DURATION[1], labels=["provider"])
        for provider, values in snapshot.items():
            for name, family in counters.items():
                family.add_metric([provider], values[name])
            histogram = values["latency"]
            latency.add_metric(
                [provider],
                buckets=list(histogram["buckets"].items()),
                sum_value=histogram["sum"],
            )
        yield from counters.values()
        yield latency
        states = _breaker_states()
        if states:
            gauge = GaugeMetricFamily(BREAKER_STATE[0], BREAKER_STATE[1], labels=["provider"])
            for provider, breaker_state in states:
                gauge.add_metric([provider], STATE_VALUES[breaker_state])
            yield gauge

    def describe(self) -> Iterable[Metric]:
        # The families' names without their samples: register() must not talk to the cache
        # (collect() does), and with names the registry refuses a second registration
        # ("Duplicated timeseries") instead of exporting every series twice.
        for family, help_text in COUNTER_FAMILIES.values():
            yield CounterMetricFamily(family, help_text, labels=["provider"])
        yield HistogramMetricFamily(DURATION[0], DURATION[1], labels=["provider"])
        yield GaugeMetricFamily(BREAKER_STATE[0], BREAKER_STATE[1], labels=["provider"])


def _provider_names() -> list[str]:
    try:
        return list(providers_in_use())
    except Exception:
        return []


def _breaker_states() -> list[tuple[str, BreakerState]]:
    from robust_mail.state import get_breaker

    try:
        # Every configuration: the classic one and each MAILERS alias served by robust_mail.
        return [
            (name, get_breaker(name, config).state) for name, config in providers_in_use().items()
        ]
    except Exception:
        logger.debug("breaker states unavailable", exc_info=True)
        return []


def register(registry: CollectorRegistry = REGISTRY) -> RobustMailCollector:
    """Register a :class:`RobustMailCollector` with ``registry`` and return it."""
    collector = RobustMailCollector()
    registry.register(collector)
    return collector
