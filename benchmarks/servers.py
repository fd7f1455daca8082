"""The SMTP servers of the benchmark, each in a process of its own.

The client under test must be the only thing in the measuring process, so that its CPU
time is the client's alone. :class:`ServerFarm` (used by the benchmark) starts:

- ``python -m benchmarks.servers``: three aiosmtpd servers (``robust_mail.testing``) with
  STARTTLS and AUTH on 127.0.0.1 in one process: ``primary`` (accepts), ``backup``
  (accepts) and ``dead`` (blackhole: accepts TCP, never greets). It prints their ports and
  the CA file on one JSON line, answers ``counts`` on standard input with the number of
  messages each accepted, and stops when its standard input closes;
- ``python -m benchmarks.latency_proxy`` in front of ``primary`` (20 ms each way);
- Postfix's ``smtp-sink`` when it is installed (it is not installed by the benchmark);

and reserves a port on which nothing listens, for a primary that refuses connections.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
USERNAME = "bench"
PASSWORD = "bench-password"
SMTP_SINK_PATHS = ("/usr/sbin/smtp-sink", "/usr/lib/postfix/sbin/smtp-sink")
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Endpoint:
    """One SMTP server as a client sees it."""

    name: str
    port: int
    use_tls: bool
    host: str = HOST
    username: str = USERNAME
    password: str = PASSWORD
    timeout: float = 10.0


# --- the server process ------------------------------------------------------------------


def serve() -> int:
    """Entry point of ``python -m benchmarks.servers``."""
    from robust_mail.testing import Mode, SMTPTestServer, TestCertificates

    received: dict[str, int] = {}
    lock = threading.Lock()

    def counter(name: str) -> Any:
        def on_message(_message: object) -> None:
            with lock:
                received[name] += 1
                # The test server keeps every message; a long run needs none of them.
                if received[name] % 200 == 0:
                    servers[name].clear()

        return on_message

    certificates = TestCertificates()
    auth = {USERNAME: PASSWORD}
    servers = {}
    for name, mode in (("primary", Mode.ACCEPT), ("backup", Mode.ACCEPT), ("dead", Mode.BLACKHOLE)):
        received[name] = 0
        servers[name] = SMTPTestServer(
            mode,
            tls="starttls",
            certificates=certificates,
            auth=auth,
            name=name,
            on_message=counter(name),
            # As Gmail, Microsoft 365, SES and Postfix do; smtplib (Django's backend, and
            # the peers through it) never pipelines, robust_mail does when offered.
            pipelining=True,
        )
    try:
        for server in servers.values():
            server.start()
        ports = {name: server.port for name, server in servers.items()}
        print(json.dumps({"ports": ports, "ca_file": certificates.ca_file}), flush=True)
        for line in sys.stdin:
            command = line.split()
            if command == ["counts"]:
                with lock:
                    print(json.dumps(received), flush=True)
            elif command[:1] == ["chunking"]:
                # Offer CHUNKING (BDAT) from the next EHLO on, or stop offering it.
                for server in servers.values():
                    server.chunking = command[1:] == ["on"]
                print(json.dumps({"chunking": command[1:] == ["on"]}), flush=True)
    finally:
        for server in servers.values():
            server.stop()
        certificates.cleanup()
    return 0


# --- the parent side ---------------------------------------------------------------------


def find_smtp_sink() -> str | None:
    """The path of Postfix's ``smtp-sink``, or None when Postfix is not installed."""
    found = shutil.which("smtp-sink")
    if found:
        return found
    return next((path for path in SMTP_SINK_PATHS if os.access(path, os.X_OK)), None)


def postfix_version() -> str | None:
    postconf = shutil.which("postconf") or "/usr/sbin/postconf"
    try:
        out = subprocess.run(
            [postconf, "-dh", "mail_version"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def free_port() -> int:
    """A port nothing listens on (bound and released again)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _read_json_line(proc: subprocess.Popen[str], what: str) -> Any:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise RuntimeError(f"{what} did not start (exit code {proc.poll()})")
    return json.loads(line)


class ServerFarm:
    """Every server of the benchmark, started and stopped together (a context manager)."""

    def __init__(self, *, delay: float = 0.02, python: str = sys.executable) -> None:
        self.delay = delay
        self.python = python
        self.ca_file = ""
        self.ports: dict[str, int] = {}
        self.proxy_port = 0
        self.refused_port = 0
        self.smtp_sink_path = find_smtp_sink()
        self.smtp_sink_port: int | None = None
        self.smtp_sink_problem: str | None = None
        self._procs: list[subprocess.Popen[Any]] = []
        self._servers: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> ServerFarm:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn(self, args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(args, cwd=ROOT, **kwargs)
        self._procs.append(proc)
        return proc

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self._servers = self._spawn(
            [self.python, "-m", "benchmarks.servers"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        info = _read_json_line(self._servers, "the aiosmtpd server process")
        self.ports, self.ca_file = info["ports"], info["ca_file"]
        proxy = self._spawn(
            [
                self.python,
                "-m",
                "benchmarks.latency_proxy",
                "--target-port",
                str(self.ports["primary"]),
                "--delay",
                str(self.delay),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.proxy_port = _read_json_line(proxy, "the latency proxy")["port"]
        self.refused_port = free_port()
        self._start_smtp_sink()

    def _start_smtp_sink(self) -> None:
        if self.smtp_sink_path is None:
            self.smtp_sink_problem = (
                "smtp-sink not found: install Debian's postfix package "
                "(apt-get install postfix) to add this column"
            )
            return
        port = free_port()
        args = [self.smtp_sink_path]
        if os.geteuid() == 0:
            args += ["-u", "nobody"]  # smtp-sink refuses to keep root privileges
        args += [f"{HOST}:{port}", "256"]
        proc = self._spawn(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_listening(port, timeout=10)
        except OSError:
            proc.kill()
            _, err = proc.communicate()
            self.smtp_sink_problem = f"smtp-sink did not start: {err.decode(errors='replace')}"
            return
        self.smtp_sink_port = port

    def endpoint(self, name: str, *, timeout: float = 10.0) -> Endpoint:
        """``primary``, ``backup``, ``dead`` (blackhole), ``refused``, ``rtt`` or ``sink``."""
        if name == "rtt":
            return Endpoint("rtt", self.proxy_port, True, timeout=timeout)
        if name == "refused":
            return Endpoint("refused", self.refused_port, True, timeout=timeout)
        if name == "sink":
            if self.smtp_sink_port is None:
                raise RuntimeError(self.smtp_sink_problem or "smtp-sink is not running")
            # smtp-sink answers AUTH with 250 instead of 235, which smtplib (under Django's
            # backend and robust_mail alike) takes as a failure: no AUTH there.
            return Endpoint(
                "sink", self.smtp_sink_port, False, username="", password="", timeout=timeout
            )
        return Endpoint(name, self.ports[name], True, timeout=timeout)

    def offer_chunking(self, on: bool) -> None:
        """Make the aiosmtpd servers offer CHUNKING (BDAT) to new sessions, or not."""
        servers = self._servers
        assert servers is not None and servers.stdin is not None
        with self._lock:
            servers.stdin.write(f"chunking {'on' if on else 'off'}\n")
            servers.stdin.flush()
            _read_json_line(servers, "chunking")

    def counts(self) -> dict[str, int]:
        """Messages each aiosmtpd server accepted so far."""
        servers = self._servers
        assert servers is not None and servers.stdin is not None
        with self._lock:
            servers.stdin.write("counts\n")
            servers.stdin.flush()
            return dict(_read_json_line(servers, "the aiosmtpd server process"))

    def stop(self) -> None:
        for proc in reversed(self._procs):
            stdin: IO[Any] | None = proc.stdin
            if stdin is not None:
                with contextlib.suppress(OSError):
                    stdin.close()
            if proc.poll() is None and proc.args[0] == self.smtp_sink_path:
                proc.terminate()
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self._procs.clear()


if __name__ == "__main__":
    sys.exit(serve())
