"""What the benchmark ran on: CPU, cores, versions, date — written into the report."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import ssl
import subprocess
from pathlib import Path

from benchmarks.servers import ROOT, find_smtp_sink, postfix_version


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str:
    # Read-only queries: which commit was measured, and whether the tree had local changes.
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def describe() -> dict[str, str]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    commit = _git("rev-parse", "--short", "HEAD")
    if commit and _git("status", "--porcelain", "--untracked-files=no", "robust_mail"):
        commit += " + uncommitted changes in robust_mail/"
    sink = find_smtp_sink()
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "load average at start (1/5/15 min)": load,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": f"{usable} usable ({os.cpu_count()} online)",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "django": _version("Django"),
        "aiosmtpd": _version("aiosmtpd"),
        "robust_mail": f"{_version('robust-mail')} ({commit or 'commit unknown'})",
        "postfix": (postfix_version() or "version unknown") + f" ({sink})" if sink else "missing",
    }
