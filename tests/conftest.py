"""Shared fixtures: real SMTP servers on 127.0.0.1, certificates, and isolation between tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import django
import pytest
from django.core.cache import caches

from tests.limited_smtp import limited_server  # noqa: F401 - a fixture for every module

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

#: For tests of Django 6.1's MAILERS setting, which earlier Djangos (and robust_mail on
#: them) ignore.
needs_mailers = pytest.mark.skipif(django.VERSION < (6, 1), reason="MAILERS arrived in Django 6.1")


def require(condition: bool, reason: str) -> None:
    """Skip when a service is missing, except in CI where a missing service is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a missing service fails the run instead of skipping)")
    pytest.skip(reason)


@pytest.fixture
def tasks_framework() -> Any:
    """The tasks framework robust_mail uses (django.tasks or the backport); required."""
    from robust_mail import tasks

    require(tasks.task_framework is not None, "neither django.tasks nor django-tasks is installed")
    return tasks.task_framework


@pytest.fixture(scope="session")
def certs() -> Iterator[Any]:
    from robust_mail.testing import TestCertificates

    with TestCertificates() as certificates:
        yield certificates


@pytest.fixture
def smtp_server(certs: Any, request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """Start SMTPTestServer instances on 127.0.0.1; all are stopped after the test.

    A module that defines a ``pipelining`` fixture (and uses it) gets servers offering
    PIPELINING or not, as that fixture says; likewise ``chunking`` for CHUNKING (BDAT).
    """
    from robust_mail.testing import SMTPTestServer

    started: list[Any] = []
    pipelining = (
        request.getfixturevalue("pipelining") if "pipelining" in request.fixturenames else False
    )

    chunking = request.getfixturevalue("chunking") if "chunking" in request.fixturenames else False

    def start(mode: str = "accept", **kwargs: Any) -> Any:
        if kwargs.get("tls"):
            kwargs.setdefault("certificates", certs)
        kwargs.setdefault("pipelining", pipelining)
        kwargs.setdefault("chunking", chunking)
        server = SMTPTestServer(mode, **kwargs)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def secret_forms(username: str, password: str) -> list[str]:
    """How a password can leak into a log: as typed, and as AUTH sends it (base64 for
    LOGIN, the PLAIN blob with and without its user)."""
    import base64

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    plain = (f"\0{username}\0{password}", f"{username}\0{password}")
    return [password, b64(password), *(b64(blob) for blob in plain)]


def provider(server: Any, name: str, **extra: Any) -> dict[str, Any]:
    """A ROBUST_MAIL provider dict pointing at a test server."""
    entry: dict[str, Any] = {"NAME": name, "HOST": "127.0.0.1", "PORT": server.port, "TIMEOUT": 2}
    entry.update(extra)
    return entry


@pytest.fixture
def robust(settings: Any) -> Callable[..., dict[str, Any]]:
    """Configure ROBUST_MAIL for one test: ``robust(providers=[...], RETRY=..., ...)``."""

    def configure(providers: list[Any], **sections: Any) -> dict[str, Any]:
        config: dict[str, Any] = {
            "PROVIDERS": providers,
            # Fast, deterministic retries unless a test asks for more.
            "RETRY": {"ATTEMPTS": 2, "BACKOFF": 0.0, "MAX_BACKOFF": 0.0, "DEADLINE": 20.0},
        }
        config.update(sections)
        settings.ROBUST_MAIL = config
        settings.EMAIL_BACKEND = "robust_mail.backends.RobustEmailBackend"
        return config

    return configure


@pytest.fixture(autouse=True)
def _isolate() -> Iterator[None]:
    """Each test starts with no pooled connections, breaker state, metrics or cached DNS."""
    yield
    from robust_mail import metrics, state
    from robust_mail.dispatch import resolver_for
    from robust_mail.pool import pools

    pools.close_all()
    pools.clear()
    state.reset()
    metrics.reset()
    resolver_for.cache_clear()
    for alias in caches:
        try:
            caches[alias].clear()
        except Exception:
            continue
