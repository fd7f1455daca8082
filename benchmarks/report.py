"""Writes docs/performance.md (figures, targets, method) and docs/performance.png."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import plot
from benchmarks.dead_primary import DEAD_TIMEOUT, VARIANTS, DeadPrimaryResult
from benchmarks.measure import Cell, Run, percentile
from benchmarks.sending import ROBUST_POOLED, STOCK_PER_CALL, STOCK_REUSED, scenarios

TRANSITION_SLACK = 1.10  # "costs TIMEOUT once" allows 10 % over TIMEOUT for the failover itself


@dataclass
class Target:
    text: str
    measured: str
    met: bool | None  # None: could not be measured in this run


@dataclass
class Results:
    machine: dict[str, str]
    cells: list[Cell]
    dead: list[DeadPrimaryResult]
    backup_alone: Cell
    outbox: Any  # benchmarks.outbox.OutboxResults | None
    scale: float
    repeats: int
    elapsed: float
    smtp_sink_problem: str | None
    proxy_delay: float
    targets: list[Target] = field(default_factory=list)

    def cell(self, scenario: str, contender: str) -> Cell | None:
        return next(
            (c for c in self.cells if c.scenario == scenario and c.contender == contender), None
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "machine": self.machine,
            "scale": self.scale,
            "repeats": self.repeats,
            "elapsed": self.elapsed,
            "proxy_delay": self.proxy_delay,
            "smtp_sink_problem": self.smtp_sink_problem,
            "cells": [c.as_dict() for c in self.cells],
            "dead_primary": [d.as_dict() for d in self.dead],
            "backup_alone": self.backup_alone.as_dict(),
            "outbox": self.outbox.as_dict() if self.outbox is not None else None,
        }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}" if seconds < 0.1 else f"{seconds * 1000:.0f}"


def _verdict(met: bool | None) -> str:
    return {True: "**met**", False: "**not met**", None: "not measured"}[met]


def transition_extra(result: DeadPrimaryResult, backup: Cell) -> float:
    """Seconds the dead primary added over the messages sent until its breaker opened."""
    return sum(result.transition) - len(result.transition) * backup.p50


def open_extra(result: DeadPrimaryResult, backup: Cell, *, mean: bool = False) -> float | None:
    """Seconds per message the open breaker adds over the backup alone.

    Each run while the breaker is open is compared with the backup-alone run made right
    after it, and the median of those differences is returned: on a shared machine a slow
    spell moves both runs of a pair, not one side of the comparison. Medians (p50) of the
    runs by default; ``mean=True`` compares their means.
    """
    if result.while_open is None or not result.while_open.ok:
        return None
    paired = result.paired_backup
    if paired is None or len(paired.runs) != len(result.while_open.runs):
        return None

    def centre(run: Run) -> float:
        return statistics.fmean(run.latencies) if mean else percentile(run.latencies, 0.5)

    return statistics.median(
        centre(a) - centre(b) for a, b in zip(result.while_open.runs, paired.runs, strict=True)
    )


def evaluate(results: Results) -> list[Target]:
    targets: list[Target] = []
    per_call = results.cell("loopback", STOCK_PER_CALL)
    reused = results.cell("loopback", STOCK_REUSED)
    robust = results.cell("loopback", ROBUST_POOLED)
    if per_call and robust and per_call.ok and robust.ok:
        ratio = robust.rate / per_call.rate
        targets.append(
            Target(
                "`send_mail` per call over STARTTLS+AUTH: ≥ 15x Django stock per call",
                f"{ratio:.1f}x ({robust.rate:.0f} vs {per_call.rate:.1f} messages/s)",
                ratio >= 15,
            )
        )
    else:
        targets.append(Target("≥ 15x Django stock per call", "cell failed", None))
    if reused and robust and reused.ok and robust.ok:
        ratio = robust.rate / reused.rate
        targets.append(
            Target(
                "…and within 10 % of Django's hand-reused connection",
                f"{ratio * 100:.0f} % of it ({robust.rate:.0f} vs {reused.rate:.0f} messages/s; "
                f"p50 {_ms(robust.p50)} vs {_ms(reused.p50)} ms; client CPU "
                f"{robust.cpu_per_message * 1000:.2f} vs {reused.cpu_per_message * 1000:.2f} "
                "ms/message)",
                ratio >= 0.9,
            )
        )
    per_call = results.cell("rtt40", STOCK_PER_CALL)
    robust = results.cell("rtt40", ROBUST_POOLED)
    if per_call and robust and per_call.ok and robust.ok:
        ratio = robust.p50 / per_call.p50
        targets.append(
            Target(
                "Over the 40 ms round trip: p50 ≤ 0.36x stock per call",
                f"{ratio:.2f}x ({_ms(robust.p50)} vs {_ms(per_call.p50)} ms)",
                ratio <= 0.36,
            )
        )
    backup = results.backup_alone
    for result in results.dead:
        label = f"{result.mode}, {result.variant}"
        if result.error or not result.opened or not backup.ok:
            why = result.error or "the breaker never opened"
            targets.append(Target(f"Dead primary ({label}): TIMEOUT once", why, False))
            continue
        extra = transition_extra(result, backup)
        targets.append(
            Target(
                f"Dead primary ({label}): costs at most its TIMEOUT ({DEAD_TIMEOUT:g} s) once",
                f"{extra:.2f} s extra over {len(result.transition)} message(s) "
                "until the breaker opened",
                extra <= DEAD_TIMEOUT * TRANSITION_SLACK,
            )
        )
        per_message = open_extra(result, backup)
        targets.append(
            Target(
                f"Dead primary ({label}): ≤ 1 ms extra per message while the breaker is open",
                "n/a" if per_message is None else f"{per_message * 1000:+.3f} ms (paired p50s)",
                None if per_message is None else per_message <= 0.001,
            )
        )
    if results.outbox is not None:
        targets += results.outbox.targets()
    return targets


def target_lines(results: Results) -> list[str]:
    return [f"{_verdict(t.met).strip('*'):>12}  {t.text}: {t.measured}" for t in results.targets]


def _scenario_table(results: Results, key: str) -> list[str]:
    lines = [
        "| contender | messages/s (median; min-max) | p50 ms | p99 ms | client CPU ms/message "
        "| delivered |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for cell in (c for c in results.cells if c.scenario == key):
        if not cell.ok:
            lines.append(f"| {cell.contender} | {cell.error or 'no data'} | | | | |")
            continue
        low, high = cell.rate_range
        delivered = (
            "not counted (smtp-sink)"
            if cell.delivered is None
            else f"{cell.delivered} of {cell.expected}"
        )
        lines.append(
            f"| {cell.contender} | {cell.rate:.1f} ({low:.1f}-{high:.1f}) | {_ms(cell.p50)} "
            f"| {_ms(cell.p99)} | {cell.cpu_per_message * 1000:.2f} | {delivered} |"
        )
    return lines


def _dead_table(results: Results) -> list[str]:
    backup = results.backup_alone
    lines = [
        "| primary | configuration | first message s | messages until open | "
        "extra s until open | p50 ms while open | extra p50 ms | extra mean ms | "
        "client CPU ms/message |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results.dead:
        if r.error or r.while_open is None or not r.while_open.ok:
            lines.append(f"| {r.mode} | {r.variant} | {r.error or 'no data'} | | | | | | |")
            continue
        extra = open_extra(r, backup)
        extra_mean = open_extra(r, backup, mean=True)
        lines.append(
            f"| {r.mode} | {r.variant} | {r.transition[0]:.3f} | {len(r.transition)} "
            f"| {transition_extra(r, backup):.2f} | {r.while_open.p50 * 1000:.2f} "
            f"| {'n/a' if extra is None else f'{extra * 1000:+.3f}'} "
            f"| {'n/a' if extra_mean is None else f'{extra_mean * 1000:+.3f}'} "
            f"| {r.while_open.cpu_per_message * 1000:.2f} |"
        )
    if backup.ok:
        lines.append(
            f"| — | backup alone (baseline) | | | | {backup.p50 * 1000:.2f} | 0 | 0 "
            f"| {backup.cpu_per_message * 1000:.2f} |"
        )
    return lines


def _dead_shape(results: Results) -> str:
    cell = next((r.while_open for r in results.dead if r.while_open and r.while_open.ok), None)
    if cell is None:
        return "no data"
    return f"{len(cell.runs)} repeats of {cell.n} messages after 5 untimed ones"


def _variants_text() -> str:
    return "; ".join(
        f"*{name}*: `{opts or 'ROBUST_MAIL defaults'}`" for name, opts in VARIANTS.items()
    )


def write(results: Results, output: Path) -> tuple[Path, Path]:
    results.targets = evaluate(results)
    png = output / "performance.png"
    plot.draw(results, png)
    markdown = output / "performance.md"
    markdown.write_text(render(results, png.name))
    return markdown, png


def _busy_warning(machine: dict[str, str]) -> list[str]:
    """A warning when other work loaded the machine: loopback figures then mostly measure it."""
    try:
        cores = int(machine["cores"].split()[0])
        start = float(machine["load average at start (1/5/15 min)"].split("/")[0])
        end = float(machine.get("load average at end (1/5/15 min)", "0").split("/")[0])
    except (KeyError, ValueError, IndexError):
        return []
    # The benchmark itself keeps about two processes busy (client and server), so only a
    # machine already saturated before it started, or well past it at the end, is "busy".
    if start <= cores and end <= cores + 2:
        return []
    return [
        f"> **Busy machine:** the load average was {start:.1f} at the start and {end:.1f} at "
        f"the end of this run, on {cores} cores: other processes competed for the CPU, so "
        "the loopback messages/s and latencies swing between repeats (see the min-max "
        "ranges). Client CPU per message is the figure least affected; rerun `make bench` "
        "on a quiet machine before quoting throughput.",
        "",
    ]


def render(results: Results, png_name: str) -> str:
    from benchmarks import method

    m = results.machine
    out = [
        "# Performance",
        "",
        f"<!-- Generated by `make bench` ({m['date']}); rerun it rather than editing by hand. "
        "The text comes from benchmarks/report.py and benchmarks/method.py. -->",
        "",
        f"Measured on {m['date']}: {m['cpu']}, {m['cores']}, Python {m['python']}, "
        f"Django {m['django']}, aiosmtpd {m['aiosmtpd']}, robust_mail {m['robust_mail']}. "
        f"Every figure below comes from that one run ({results.repeats} repeat(s) per cell, "
        f"{results.elapsed:.0f} s in all"
        + (", **quick mode: too few messages to quote**" if results.scale < 1 else "")
        + ").",
        "",
        *_busy_warning(m),
        "## Targets",
        "",
        "The targets of issue 3 (and issue 4 for the outbox), and whether this run met them.",
        "",
        "| target | measured | this run |",
        "| --- | --- | --- |",
    ]
    out += [f"| {t.text} | {t.measured} | {_verdict(t.met)} |" for t in results.targets]
    out += ["", f"![Throughput, latency, CPU and the dead-primary case]({png_name})", ""]
    out += ["## Sending one message at a time", ""]
    for scenario in scenarios(results.scale):
        out += [f"### {scenario.title}", ""]
        if scenario.key == "smtp-sink" and results.smtp_sink_problem:
            out += [f"**Skipped:** {results.smtp_sink_problem}.", ""]
        out += [*_scenario_table(results, scenario.key), ""]
        cell = results.cell(scenario.key, ROBUST_POOLED)
        if cell is not None and cell.ok:
            out += [f"{cell.n} timed messages per repeat ({method.per_call_note(scenario)}).", ""]
    out += [
        "## Dead primary",
        "",
        method.DEAD_PRIMARY.format(
            timeout=DEAD_TIMEOUT, variants=_variants_text(), shape=_dead_shape(results)
        ),
        "",
    ]
    out += [*_dead_table(results), ""]
    out += ["## Outbox", ""]
    if results.outbox is None:
        out += [method.OUTBOX_PLACEHOLDER, ""]
    else:
        out += [*results.outbox.markdown(), ""]
    out += method.render(results)
    return "\n".join(out).rstrip() + "\n"
