"""A real PostgreSQL server for tests: 127.0.0.1, a free port, a temp dir, trust auth.

``postgres_server`` (fixture, one per session) yields a started :class:`PostgresServer`
and stops it afterwards. PostgreSQL refuses to run as root, so under root the server
runs as the ``postgres`` system user (created if missing). Without the binaries (or
psycopg) the test is skipped, except with ``CI=true``, where it fails: CI must never go
green by skipping the multi-worker tests.

Durability is switched off (``fsync=off``...): these databases live for one test run.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.ports import BIND_ATTEMPTS, free_port

__all__ = ["PostgresServer", "database_alias", "postgres_server"]

STARTUP_TIMEOUT = 30.0
SEARCH: tuple[str | Path, ...] = (
    "/usr/lib/postgresql/15/bin",
    *sorted(Path("/usr/lib/postgresql").glob("*/bin")),
)


def postgres_bin_dir() -> Path | None:
    for directory in SEARCH:
        path = Path(directory)
        if (path / "initdb").exists() and (path / "postgres").exists():
            return path
    return None


def _run_as() -> str | None:
    """The user to run PostgreSQL as: ``postgres`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "postgres"],
            check=True,
        )
    return "postgres"


class PostgresServer:
    """One ``postgres`` process; :meth:`start` returns once it accepts connections."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.host = "127.0.0.1"
        self.port = 0
        self._log_start = 0
        self.user = "postgres"
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._log: IO[bytes] | None = None
        self._as = _run_as()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _popen_user(self) -> dict[str, Any]:
        if self._as is None:
            return {}
        entry = pwd.getpwnam(self._as)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _initdb(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="robust-mail-pg-"))
        if self._as is not None:
            entry = pwd.getpwnam(self._as)
            os.chown(self._dir, entry.pw_uid, entry.pw_gid)
        subprocess.run(
            [
                *(str(self.bin_dir / "initdb"), "-D", str(self._dir / "data")),
                *("-U", self.user, "-A", "trust", "-E", "UTF8", "--no-sync"),
            ],
            check=True,
            capture_output=True,
            cwd=self._dir,
            **self._popen_user(),
        )

    def start(self) -> PostgresServer:
        """Start (or restart, on the same port) the server."""
        if self._dir is None:
            self._initdb()
        assert self._dir is not None
        if self.port:  # a restart keeps the port, so clients reconnect to the same address
            if self._launch():
                return self
        else:
            # Another process may take the free port before postgres binds it.
            for _ in range(BIND_ATTEMPTS):
                self.port = free_port()
                if self._launch():
                    return self
                if "could not bind" not in self._launch_log():
                    break
        log = self._launch_log()[-3000:]
        raise RuntimeError(f"PostgreSQL did not start on 127.0.0.1:{self.port}:\n{log}")

    def _launch(self) -> bool:
        assert self._dir is not None
        log_path = self._dir / "postgres.log"
        self._log_start = log_path.stat().st_size if log_path.exists() else 0
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                *(str(self.bin_dir / "postgres"), "-D", str(self._dir / "data")),
                *("-p", str(self.port), "-k", str(self._dir)),
                *("-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"),
                *("-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self._dir,
            **self._popen_user(),
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self._ready():
                return True
            time.sleep(0.1)
        self.stop()
        return False

    def _launch_log(self) -> str:
        """What the server logged since the last launch began."""
        assert self._dir is not None
        with open(self._dir / "postgres.log", "rb") as log:
            log.seek(self._log_start)
            return log.read().decode(errors="replace")

    def _ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(**self.connect_kwargs("postgres"), connect_timeout=1):
                return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        """Stop the server (fast shutdown); the data directory is kept for a restart."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(2)  # SIGINT: fast shutdown
                try:
                    self.process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        self.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def connect_kwargs(self, dbname: str) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "user": self.user, "dbname": dbname}

    def create_database(self, prefix: str = "robust_mail") -> str:
        """A new, empty database; returns its name."""
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        self.query("postgres", f'CREATE DATABASE "{name}"')
        return name

    def query(self, dbname: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one statement in ``dbname`` on a connection of its own (autocommit); its rows."""
        import psycopg

        with psycopg.connect(**self.connect_kwargs(dbname), autocommit=True) as conn:
            cursor = conn.execute(sql, params)
            return [tuple(row) for row in cursor.fetchall()] if cursor.description else []

    def django_settings(self, dbname: str) -> dict[str, Any]:
        """A Django DATABASES entry for ``dbname`` on this server."""
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": dbname,
            "USER": self.user,
            "HOST": self.host,
            "PORT": str(self.port),
            "CONN_MAX_AGE": 60,
        }


def require_postgres() -> Path:
    from tests.conftest import require

    bin_dir = postgres_bin_dir()
    require(bin_dir is not None, "PostgreSQL binaries (initdb, postgres) are not installed")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        require(False, "psycopg is not installed")
    assert bin_dir is not None
    return bin_dir


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer(require_postgres())
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@contextlib.contextmanager
def database_alias(
    alias: str, request: pytest.FixtureRequest, tmp_path: Path, blocker: Any, name: str
) -> Iterator[str]:
    """A fresh, migrated database under ``alias`` for one test, then forgotten.

    PostgreSQL (database ``name`` on the session's server) when ``request.param`` is
    ``"postgres"``, else an SQLite file in ``tmp_path``. For tests that are not ``django_db``
    tests (whose isolation allows only the default alias): database access is unblocked here.
    """
    from django.core.management import call_command
    from django.db import connections

    entry = {**connections.settings["default"]}
    if request.param == "postgres":
        server = request.getfixturevalue("postgres_server")
        entry.update(server.django_settings(server.create_database(name)))
        entry.update(OPTIONS={}, CONN_MAX_AGE=0, TEST={})
    else:
        path = str(tmp_path / f"{name}.sqlite3")
        entry.update(NAME=path, OPTIONS={}, TEST={"NAME": path})
    connections.settings[alias] = entry
    with blocker.unblock():
        try:
            call_command("migrate", database=alias, verbosity=0)
            yield alias
        finally:
            connections[alias].close()
            del connections[alias]
            del connections.settings[alias]
