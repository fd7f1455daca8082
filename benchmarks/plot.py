"""docs/performance.png: throughput, latency, CPU, and the dead-primary timeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.sending import CONTENDERS, scenarios

COLOURS = ("#9e9e9e", "#4c72b0", "#dd8452")  # stock per call, stock reused, robust_mail
SHORT = {
    "loopback": "STARTTLS+AUTH\nloopback",
    "smtp-sink": "smtp-sink\n(plain) loopback",
    "rtt40": "STARTTLS+AUTH\n40 ms RTT",
    "rtt40-backlog": "STARTTLS+AUTH\n40 ms RTT, backlog",
    "loopback-chunking": "+CHUNKING\nloopback",
    "rtt40-chunking": "+CHUNKING\n40 ms RTT",
}


def _label(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _bars(ax: Any, results: Any, value: Any, ylabel: str, title: str, log: bool) -> None:
    keys = [s.key for s in scenarios(results.scale)]
    width = 0.8 / len(CONTENDERS)
    for index, (name, colour) in enumerate(zip(CONTENDERS, COLOURS, strict=True)):
        xs, ys = [], []
        for position, key in enumerate(keys):
            cell = results.cell(key, name)
            if cell is not None and cell.ok:
                xs.append(position + (index - 1) * width)
                ys.append(value(cell))
        bars = ax.bar(xs, ys, width, color=colour, label=name)
        ax.bar_label(bars, labels=[_label(y) for y in ys], fontsize=7, padding=1)
    ax.set_xticks(range(len(keys)), [SHORT.get(k, k) for k in keys], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if log:
        ax.set_yscale("log")
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)


def _dead(ax: Any, results: Any) -> None:
    backup = results.backup_alone
    for result in results.dead:
        if not result.transition:
            continue
        series = list(result.transition)
        if result.while_open is not None and result.while_open.runs:
            series += result.while_open.runs[0].latencies[:20]
        ax.plot(
            range(1, len(series) + 1),
            [s * 1000 for s in series],
            marker="o",
            markersize=3,
            label=f"{result.mode}, {result.variant}",
        )
    if backup.ok:
        ax.axhline(backup.p50 * 1000, color="black", linestyle="--", linewidth=1)
        ax.annotate(
            "backup alone (p50)",
            (1, backup.p50 * 1000),
            textcoords="offset points",
            xytext=(0, 4),
            fontsize=7,
        )
    ax.set_yscale("log")
    ax.set_xlabel("message number (breaker closed → open)")
    ax.set_ylabel("latency, ms (log)")
    ax.set_title("Dead primary (TIMEOUT 1 s) with a healthy backup", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _outbox(enqueue_ax: Any, drain_ax: Any, outbox: Any) -> None:
    names = [n for n in ("robust_mail", "django-mailer", "django-post-office")]
    colours = ("#dd8452", "#8c8c8c", "#55a868")
    width = 0.38
    for offset, (stat, hatch) in enumerate((("p50", ""), ("p99", "//"))):
        xs, ys, cs = [], [], []
        for position, (name, colour) in enumerate(zip(names, colours, strict=True)):
            cell = outbox.enqueue.get(name)
            if cell is not None and cell.ok:
                xs.append(position + (offset - 0.5) * width)
                ys.append(getattr(cell, stat) * 1000)
                cs.append(colour)
        bars = enqueue_ax.bar(xs, ys, width, color=cs, hatch=hatch, edgecolor="white")
        enqueue_ax.bar_label(bars, labels=[f"{stat} {_label(y)}" for y in ys], fontsize=7)
    enqueue_ax.set_xticks(range(len(names)), [outbox.label(n) for n in names], fontsize=8)
    enqueue_ax.set_ylabel("ms per send_mail")
    enqueue_ax.set_title("Outbox: queueing one message, p50 and p99 (lower is better)", fontsize=10)
    enqueue_ax.margins(y=0.15)
    enqueue_ax.grid(axis="y", alpha=0.3)

    scenarios_ = list(outbox.drain)
    for index, (name, colour) in enumerate(zip(names, colours, strict=True)):
        xs, ys = [], []
        for position, scenario in enumerate(scenarios_):
            rate = outbox.drain_rate(scenario, name)
            if rate is not None:
                xs.append(position + (index - 1) * 0.27)
                ys.append(rate)
        bars = drain_ax.bar(xs, ys, 0.27, color=colour, label=outbox.label(name))
        drain_ax.bar_label(bars, labels=[_label(y) for y in ys], fontsize=7, padding=1)
    drain_ax.set_xticks(range(len(scenarios_)), [SHORT.get(k, k) for k in scenarios_], fontsize=8)
    drain_ax.set_yscale("log")
    drain_ax.set_ylabel("messages/s (log)")
    drain_ax.set_title(
        f"Outbox: draining the queue, concurrency {outbox.concurrency} (higher is better)",
        fontsize=10,
    )
    drain_ax.legend(fontsize=7)
    drain_ax.margins(y=0.15)
    drain_ax.grid(axis="y", alpha=0.3)


def draw(results: Any, path: Path) -> None:
    rows = 3 if results.outbox is not None else 2
    fig, axes = plt.subplots(rows, 2, figsize=(13, 4.5 * rows), dpi=110)
    _bars(
        axes[0][0],
        results,
        lambda c: c.rate,
        "messages/s (log)",
        "Throughput, one message at a time (higher is better)",
        True,
    )
    _bars(
        axes[0][1],
        results,
        lambda c: c.p50 * 1000,
        "p50 latency, ms (log)",
        "Latency per send_mail, p50 (lower is better)",
        True,
    )
    _bars(
        axes[1][0],
        results,
        lambda c: c.cpu_per_message * 1000,
        "client CPU ms/message (log)",
        "Client CPU per message (lower is better)",
        True,
    )
    _dead(axes[1][1], results)
    if results.outbox is not None:
        _outbox(axes[2][0], axes[2][1], results.outbox)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 1 - 0.035 * 2 / rows),
        ncol=3,
        fontsize=9,
        frameon=False,
    )
    fig.suptitle(
        f"robust_mail vs Django's SMTP backend — {results.machine['date']}, "
        f"{results.machine['cores'].split(' ')[0]} cores",
        y=0.995,
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.07 * 2 / rows))
    fig.savefig(path)
    plt.close(fig)
