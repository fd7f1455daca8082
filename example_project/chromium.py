"""Headless Chromium from the system's package (Debian: ``apt-get install chromium``),
driven by Playwright for Python. Playwright's own browser download is never used.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def executable() -> str | None:
    """``CHROMIUM`` from the environment, else ``chromium`` on the PATH, else None."""
    configured = os.environ.get("CHROMIUM")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def launch(playwright: Any) -> Any:
    path = executable()
    if path is None:
        raise RuntimeError("no Chromium: apt-get install chromium (or set CHROMIUM=/path)")
    return playwright.chromium.launch(executable_path=path, args=ARGS)
