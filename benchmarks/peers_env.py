"""The benchmark's own virtualenv for the outbox peers: django-mailer and django-post-office.

They are never dependencies of robust_mail, not even optional ones: the benchmark creates
``.venv-bench-peers`` beside the project (git-ignored) with ``python -m venv`` and installs
them there with pip from the package index, together with the same Django version as the
project's environment, so both sides run the same Django. The venv is reused while its
requirements are unchanged.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

from benchmarks.servers import ROOT

VENV = ROOT / ".venv-bench-peers"
PEERS = ("django-mailer==2.3.*", "django-post-office==3.12.*")


def requirements() -> list[str]:
    return [f"Django=={importlib.metadata.version('Django')}", *PEERS]


def python() -> Path:
    return VENV / "bin" / "python"


def ensure(log: object = print) -> Path:
    """The peers' Python, creating or updating the venv first when needed.

    Raises ``RuntimeError`` with pip's output when the venv cannot be made.
    """
    wanted = "\n".join(requirements()) + "\n"
    stamp = VENV / ".bench-requirements"
    if python().exists() and stamp.exists() and stamp.read_text() == wanted:
        return python()
    say = log if callable(log) else print
    say(f"  creating {VENV.name} with {', '.join(requirements())} (once)")
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [
        [base, "-m", "venv", str(VENV)],
        [
            str(python()),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            *requirements(),
        ],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(step[:4])} failed ({done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-2000:]}"
            )
    stamp.write_text(wanted)
    return python()


def versions() -> dict[str, str]:
    """Installed versions of the peers (empty when the venv is missing)."""
    code = (
        "import importlib.metadata as m, json; print(json.dumps({d: m.version(d) for d in "
        "('Django', 'django-mailer', 'django-post-office')}))"
    )
    try:
        out = subprocess.run(
            [str(python()), "-c", code], capture_output=True, text=True, timeout=60, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    import json

    return dict(json.loads(out.stdout))
