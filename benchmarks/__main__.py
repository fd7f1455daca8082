"""Run every benchmark and rewrite docs/performance.md and docs/performance.png.

    python -m benchmarks              # the full run (make bench), a few minutes on 2 cores
    python -m benchmarks --quick      # a smoke run with few messages; writes to benchmarks/results/
    python -m benchmarks --no-outbox  # skip the outbox benchmark (and its peers' venv)
    python -m benchmarks --render-only  # rewrite the report from the last raw results

Raw figures also go to benchmarks/results/latest.json (quick.json with --quick; not
committed); --render-only rewrites the report from latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.servers import ROOT, ServerFarm


def log(line: str) -> None:
    print(line, flush=True)


def _trust_bundle(ca_file: str, directory: str) -> str:
    """The system CA bundle plus the test CA, for every TLS client of this process.

    Django's stock backend loads the system bundle (``ssl.create_default_context()``) for
    every connection; pointing ``SSL_CERT_FILE`` at a bundle that also holds the test CA keeps
    that cost real (the system's roots, plus one) and lets it verify the test server.
    """
    import ssl

    system = ssl.get_default_verify_paths().cafile
    bundle = os.path.join(directory, "ca-bundle.pem")
    with open(bundle, "wb") as out:
        if system and os.path.exists(system):
            out.write(Path(system).read_bytes())
        out.write(b"\n" + Path(ca_file).read_bytes())
    return bundle


def _render_only(output: Path) -> int:
    output.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")
    import django

    django.setup()
    from benchmarks import reload, report
    from benchmarks.servers import find_smtp_sink

    sink = None if find_smtp_sink() else "smtp-sink not found"
    results = reload.load(
        ROOT / "benchmarks" / "results" / "latest.json", smtp_sink_problem=sink, proxy_delay=0.02
    )
    markdown, png = report.write(results, output)
    log(f"wrote {markdown} and {png} from benchmarks/results/latest.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="few messages, one repeat")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per cell (3)")
    parser.add_argument("--no-outbox", action="store_true", help="skip the outbox benchmark")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="directory for performance.md/.png (docs/; benchmarks/results/ with --quick)",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite the report from benchmarks/results/latest.json without measuring",
    )
    args = parser.parse_args(argv)
    if args.render_only:
        return _render_only(args.output or ROOT / "docs")
    scale = 0.1 if args.quick else 1.0
    repeats = args.repeats or (1 if args.quick else 3)
    output = args.output or (ROOT / "benchmarks" / "results" if args.quick else ROOT / "docs")
    output.mkdir(parents=True, exist_ok=True)

    workdir = tempfile.mkdtemp(prefix="robust-mail-bench-")
    os.environ["ROBUST_MAIL_BENCH_DIR"] = workdir
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchmarks.settings"
    started = time.monotonic()

    try:
        return _run(args, scale, repeats, output, workdir, started)
    finally:
        # The SQLite databases and the CA bundle of this run.
        shutil.rmtree(workdir, ignore_errors=True)


def _run(
    args: argparse.Namespace,
    scale: float,
    repeats: int,
    output: Path,
    workdir: str,
    started: float,
) -> int:
    with ServerFarm() as farm:
        os.environ["SSL_CERT_FILE"] = _trust_bundle(farm.ca_file, workdir)
        import django

        django.setup()
        from django.core.management import call_command

        from benchmarks import dead_primary, machine, report, sending

        call_command("migrate", verbosity=0)
        env = machine.describe()
        log(f"robust_mail benchmark on {env['cpu']}, {env['cores']}, Python {env['python']}")
        if farm.smtp_sink_problem:
            log(f"NOTE: {farm.smtp_sink_problem}")

        cells = []
        for scenario in sending.scenarios(scale):
            log(f"scenario {scenario.key}: {scenario.title}")
            cells += sending.run_scenario(farm, scenario, repeats=repeats, log=log)

        log("dead primary")
        dead, backup_alone = dead_primary.run_dead_primary(
            # Shorter, more numerous interleaved repeats: the extra being judged is well
            # under a millisecond, smaller than a busy machine's swings over a few seconds.
            farm,
            n=max(10, round(100 * scale)),
            warmup=5,
            repeats=repeats if args.quick else max(5, repeats),
            log=log,
        )

        outbox_results = None
        if not args.no_outbox:
            from benchmarks import outbox

            log("outbox")
            outbox_results = outbox.run_outbox(farm, scale=scale, repeats=repeats, log=log)

        elapsed = time.monotonic() - started
        env["load average at end (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        results = report.Results(
            machine=env,
            cells=cells,
            dead=dead,
            backup_alone=backup_alone,
            outbox=outbox_results,
            scale=scale,
            repeats=repeats,
            elapsed=elapsed,
            smtp_sink_problem=farm.smtp_sink_problem,
            proxy_delay=farm.delay,
        )
        raw = ROOT / "benchmarks" / "results"
        raw.mkdir(exist_ok=True)
        (raw / ("quick.json" if args.quick else "latest.json")).write_text(
            json.dumps(results.as_dict(), indent=1)
        )
        markdown, png = report.write(results, output)
        log(f"wrote {markdown} and {png} in {elapsed:.0f} s")
        for line in report.target_lines(results):
            log(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
