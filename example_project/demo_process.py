"""Run ``python -m example_project.demo`` as a child process, for the browser tests and
the screenshot script: free ports, a private data directory, a clean stop.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent
#: Variables that would point the demo elsewhere than its own local servers and files.
_CLEARED = ("ROBUST_MAIL_PROVIDERS", "REDIS_URL", "EXAMPLE_CACHE", "EXAMPLE_DB", "DJANGO_DEBUG")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _port_taken(log: str) -> bool:
    # The demo's own check before it starts anything, Django's runserver, and the SMTP
    # servers (errno EADDRINUSE: "Address already in use", or asyncio's "... address
    # already in use") say so in these words.
    log = log.lower()
    return any(
        words in log for words in ("are in use", "port is already in use", "address already in use")
    )


class DemoProcess:
    """The whole demo (site, SMTP servers, worker) on free ports, data in ``data_dir``.

    A context manager: ``start()`` returns once the site answers; ``stop()`` sends SIGINT
    as Ctrl-C would, and kills the process group if it has not exited within 20 s.
    """

    def __init__(self, data_dir: Path, log_path: Path | None = None) -> None:
        self.data_dir = data_dir
        self.log_path = log_path or data_dir / "demo.log"
        self.port = free_port()
        self.smtp_ports = {"primary": free_port(), "backup": free_port()}
        self.url = f"http://127.0.0.1:{self.port}/"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> DemoProcess:
        """Start the demo; return once the site answers.

        A port found free can be taken by someone else before the demo binds it (other
        tests start servers all the time): then the demo is started again on new ports,
        up to three times.
        """
        for attempt in range(3):
            begun = len(self.log())
            if self._launch(timeout):
                return self
            if not _port_taken(self.log()[begun:]) or attempt == 2:
                raise RuntimeError(f"the demo exited early:\n{self.log()}")
            self.port = free_port()
            self.smtp_ports = {"primary": free_port(), "backup": free_port()}
            self.url = f"http://127.0.0.1:{self.port}/"
        raise AssertionError("unreachable")

    def _launch(self, timeout: float) -> bool:
        """Start the process; True once it serves, False if it exited early."""
        env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
        env.update(
            DJANGO_SETTINGS_MODULE="example_project.settings",
            EXAMPLE_DATA_DIR=str(self.data_dir),
            EXAMPLE_PORT=str(self.port),
            EXAMPLE_SMTP_PRIMARY_PORT=str(self.smtp_ports["primary"]),
            EXAMPLE_SMTP_BACKUP_PORT=str(self.smtp_ports["backup"]),
            PYTHONUNBUFFERED="1",
        )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(  # our own interpreter and module
                [sys.executable, "-m", "example_project.demo"],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                return False
            if "Press Ctrl-C" in self.log():
                return True
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the demo did not start within {timeout:.0f} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> int | None:
        """Stop the demo like Ctrl-C; return its exit code."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        return process.returncode

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path.lstrip("/"), timeout=10) as response:
            return bytes(response.read())

    def __enter__(self) -> DemoProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serving(port: int) -> bool:
    """Whether anything accepts connections on 127.0.0.1:``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


__all__ = ["DemoProcess", "free_port", "serving"]
