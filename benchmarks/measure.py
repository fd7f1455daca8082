"""Timing one bounded loop of sends, and summarising repeats of it.

A *run* sends ``warmup`` untimed messages, then ``n`` timed ones, one after the other on
this thread. Per message it records the wall-clock latency (``time.perf_counter``); for the
whole loop, the wall time and this process's CPU time (``time.process_time``: user + system
of every thread of the process, which holds only the client since the servers run in other
processes). A *cell* is the repeats of one contender in one scenario.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Run:
    latencies: list[float]  # seconds, one per timed message
    wall: float  # seconds for the timed loop
    cpu: float  # process CPU seconds for the timed loop

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall if self.wall else 0.0

    @property
    def cpu_per_message(self) -> float:
        return self.cpu / len(self.latencies) if self.latencies else 0.0


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def timed_run(send: Callable[[int], object], n: int, warmup: int) -> Run:
    for i in range(warmup):
        send(-1 - i)
    latencies: list[float] = []
    clock = time.perf_counter
    cpu_start = time.process_time()
    start = clock()
    for i in range(n):
        began = clock()
        send(i)
        latencies.append(clock() - began)
    wall = clock() - start
    cpu = time.process_time() - cpu_start
    return Run(latencies, wall, cpu)


@dataclass
class Cell:
    """Every repeat of one contender in one scenario."""

    scenario: str
    contender: str
    runs: list[Run] = field(default_factory=list)
    error: str | None = None
    delivered: int | None = None  # messages the server counted, when it can tell
    expected: int = 0  # messages sent (warmup included)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.runs)

    @property
    def n(self) -> int:
        return len(self.runs[0].latencies) if self.runs else 0

    def median(self, value: Callable[[Run], float]) -> float:
        return statistics.median(value(run) for run in self.runs)

    @property
    def rate(self) -> float:
        """Messages per second: median of the repeats."""
        return self.median(lambda run: run.rate)

    @property
    def rate_range(self) -> tuple[float, float]:
        rates = [run.rate for run in self.runs]
        return min(rates), max(rates)

    @property
    def p50(self) -> float:
        """Median latency, seconds: median of the repeats' medians."""
        return self.median(lambda run: percentile(run.latencies, 0.5))

    @property
    def p99(self) -> float:
        """99th percentile latency, seconds, over every timed message of every repeat.

        Pooled rather than a median of per-repeat values: a p99 of 25 messages would be
        just the slowest one.
        """
        return percentile([x for run in self.runs for x in run.latencies], 0.99)

    @property
    def mean(self) -> float:
        return self.median(lambda run: statistics.fmean(run.latencies))

    @property
    def cpu_per_message(self) -> float:
        """Client CPU seconds per message: median of the repeats."""
        return self.median(lambda run: run.cpu_per_message)

    def as_dict(self) -> dict[str, object]:
        data: dict[str, object] = {
            "scenario": self.scenario,
            "contender": self.contender,
            "error": self.error,
            "delivered": self.delivered,
            "expected": self.expected,
            "runs": [{"wall": r.wall, "cpu": r.cpu, "latencies": r.latencies} for r in self.runs],
        }
        if self.ok:
            data.update(
                rate=self.rate,
                p50=self.p50,
                p99=self.p99,
                mean=self.mean,
                cpu_per_message=self.cpu_per_message,
            )
        return data
