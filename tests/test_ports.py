"""The servers the suite starts itself survive losing their chosen port to another process.

A free port is found, then bound by the server a moment later: another of the suite's
servers can take it in between. Each starter must then try a new port, not fail the run.
"""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests import limited_smtp, ports, postgres_server, redis_server
from tests.conftest import require


@pytest.fixture
def taken_first(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """Make the next free_port() answer a port that is in fact taken, then real ones."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        answers = iter([port])

        def free_port() -> int:
            return next(answers, None) or ports.free_port()

        for module in (postgres_server, redis_server, limited_smtp):
            monkeypatch.setattr(module, "free_port", free_port)
        yield port


def test_postgres_starts_on_another_port_when_its_first_is_taken(taken_first: int) -> None:
    server = postgres_server.PostgresServer(postgres_server.require_postgres())
    try:
        server.start()
        assert server.port != taken_first
        assert server.query("postgres", "SELECT 1") == [(1,)]
    finally:
        server.cleanup()


def test_redis_starts_on_another_port_when_its_first_is_taken(taken_first: int) -> None:
    binary = redis_server.redis_binary()
    require(binary is not None, "redis-server is not installed")
    assert binary is not None
    with redis_server.RedisServer(binary) as server:
        assert server.port != taken_first
        assert server.running


def test_an_aiosmtpd_controller_starts_on_another_port_when_its_first_is_taken(
    taken_first: int, request: pytest.FixtureRequest
) -> None:
    start: Callable[..., Any] = request.getfixturevalue("limited_server")  # after taken_first
    controller = start()

    assert controller.port != taken_first
    with smtplib.SMTP("127.0.0.1", controller.port, timeout=5) as client:
        assert client.noop()[0] == 250
