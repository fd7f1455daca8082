"""Rebuild the results of the last run from benchmarks/results/latest.json.

``python -m benchmarks --render-only`` uses it to rewrite docs/performance.md and the plot
after the report's text changed, without measuring again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.dead_primary import DeadPrimaryResult
from benchmarks.measure import Cell, Run
from benchmarks.report import Results


def _cell(data: dict[str, Any] | None) -> Cell | None:
    if data is None:
        return None
    runs = [Run(r["latencies"], r["wall"], r["cpu"]) for r in data["runs"]]
    return Cell(
        data["scenario"],
        data["contender"],
        runs,
        data["error"],
        data["delivered"],
        data["expected"],
    )


def load(path: Path, *, smtp_sink_problem: str | None, proxy_delay: float) -> Results:
    """The results in ``path``; the keyword arguments stand in for what older files lack."""
    data = json.loads(path.read_text())
    dead = []
    for item in data["dead_primary"]:
        result = DeadPrimaryResult(item["mode"], item["variant"], item["transition"])
        result.opened, result.error = item["opened"], item["error"]
        result.while_open = _cell(item["while_open"])
        result.paired_backup = _cell(item.get("paired_backup"))
        dead.append(result)
    outbox = None
    if data.get("outbox"):
        from benchmarks.outbox import DrainRun, OutboxResults

        raw = data["outbox"]
        outbox = OutboxResults(
            enqueue={name: _cell(cell) for name, cell in raw["enqueue"].items()},
            drain={
                scenario: {name: [DrainRun(**run) for run in runs] for name, runs in by.items()}
                for scenario, by in raw["drain"].items()
            },
            errors=raw["errors"],
            versions=raw["versions"],
        )
    backup = _cell(data["backup_alone"])
    assert backup is not None
    return Results(
        machine=data["machine"],
        cells=[c for c in (_cell(x) for x in data["cells"]) if c is not None],
        dead=dead,
        backup_alone=backup,
        outbox=outbox,
        scale=data["scale"],
        repeats=data["repeats"],
        elapsed=data["elapsed"],
        smtp_sink_problem=data.get("smtp_sink_problem", smtp_sink_problem),
        proxy_delay=data.get("proxy_delay", proxy_delay),
    )
