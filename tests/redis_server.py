"""A real ``redis-server`` for tests: 127.0.0.1, a free port, a temp dir, no persistence.

``redis_server`` (fixture) yields a started :class:`RedisServer` and stops it afterwards.
Without a ``redis-server`` binary the test is skipped, except with ``CI=true`` in the
environment, where it fails: CI must never go green by skipping the shared-state tests.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from tests.ports import BIND_ATTEMPTS, free_port

__all__ = ["RedisServer", "redis_server"]

STARTUP_TIMEOUT = 10.0


def redis_binary() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process; ``start()`` waits until it answers PING."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> RedisServer:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="robust-mail-redis-")
        if self.port:  # a restart keeps the port, so clients reconnect to the same URL
            if self._launch(self.port):
                return self
        else:
            # Another process may take the free port before redis binds it.
            for _ in range(BIND_ATTEMPTS):
                port = free_port()
                if self._launch(port):
                    self.port = port
                    return self
        log = Path(self._dir, "redis.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"redis-server did not start on 127.0.0.1:\n{log}")

    def _launch(self, port: int) -> bool:
        assert self._dir is not None
        if self._log is None:
            self._log = Path(self._dir, "redis.log").open("ab")  # noqa: SIM115 - closed in stop()
        command = [
            self.binary,
            "--bind", self.host,
            "--port", str(port),
            "--dir", self._dir,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--loglevel", "warning",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                return False
            if _ping(port):
                return True
            time.sleep(0.02)
        self._terminate()
        return False

    def stop(self) -> None:
        """Stop the server (it can be started again on the same port with ``start()``)."""
        self._terminate()

    def _terminate(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def cleanup(self) -> None:
        self._terminate()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A started redis-server on 127.0.0.1 (random port), stopped and removed after the test."""
    from tests.conftest import require

    binary = redis_binary()
    require(binary is not None, "redis-server is not installed (Debian: redis-server)")
    assert binary is not None
    server = RedisServer(binary)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()
