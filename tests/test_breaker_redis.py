"""Breaker state shared between OS processes through a real Redis, and Redis going away."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from robust_mail import metrics, state
from robust_mail.breaker import BreakerState
from robust_mail.state import get_breaker
from tests.redis_server import RedisServer, redis_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parent.parent


def redis_caches(url: str) -> dict[str, Any]:
    return {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": url,
            # Short socket timeouts: a dead cache must never hold up sending.
            "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
        }
    }


@pytest.fixture
def shared_cache(redis_server: RedisServer, settings: Any) -> RedisServer:  # noqa: F811
    settings.CACHES = redis_caches(redis_server.url)
    return redis_server


# A separate Python process, configured like a deployed site sharing the Redis cache.
WORKER = textwrap.dedent(
    """
    import json, sys, time
    import django
    from django.conf import settings

    url, action = sys.argv[1], sys.argv[2]
    threshold, reset_timeout = int(sys.argv[3]), float(sys.argv[4])
    settings.configure(
        CACHES={"default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": url,
            "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
        }},
        INSTALLED_APPS=[], ROBUST_MAIL={}, USE_TZ=True,
    )
    django.setup()
    from django.core.cache import cache
    from robust_mail.state import get_breaker

    breaker = get_breaker("primary", failure_threshold=threshold, reset_timeout=reset_timeout)
    if action.startswith("fail"):
        for _ in range(int(action.partition(":")[2] or threshold)):
            breaker.record_failure()
        result = None
    elif action == "race":
        print("ready", flush=True)
        while not cache.get("test:go"):
            time.sleep(0.001)
        result = breaker.allow()
    else:
        result = breaker.allow()
    print(json.dumps({"state": str(breaker.state), "allowed": result}), flush=True)
    """
)


def worker(url: str, action: str, threshold: int = 3, reset: float = 60.0) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, url, action, str(threshold), str(reset)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )


def result_of(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return dict(json.loads(out.strip().splitlines()[-1]))


def test_failures_in_one_process_open_the_breaker_for_another(shared_cache: RedisServer) -> None:
    here = get_breaker("primary", failure_threshold=3, reset_timeout=60)
    assert here.allow()

    assert result_of(worker(shared_cache.url, "fail")) == {"state": "open", "allowed": None}

    assert here.state is BreakerState.OPEN
    assert not here.allow()
    assert here.retry_at is not None and here.retry_at > time.time()
    # ... and a third process sees it too.
    assert result_of(worker(shared_cache.url, "allow")) == {"state": "open", "allowed": False}


def test_failures_add_up_across_processes(shared_cache: RedisServer) -> None:
    here = get_breaker("primary", failure_threshold=4, reset_timeout=60)
    here.record_failure()
    here.record_failure()

    assert result_of(worker(shared_cache.url, "fail:1", threshold=4)) == {
        "state": "closed",
        "allowed": None,
    }
    assert here.failures == 3
    assert here.state is BreakerState.CLOSED

    result_of(worker(shared_cache.url, "fail:1", threshold=4))

    assert here.state is BreakerState.OPEN


def test_only_one_of_many_processes_wins_the_half_open_trial(shared_cache: RedisServer) -> None:
    here = get_breaker("primary", failure_threshold=1, reset_timeout=0)
    here.record_failure()
    assert here.state is BreakerState.HALF_OPEN

    contenders = [worker(shared_cache.url, "race", threshold=1, reset=0) for _ in range(8)]
    for process in contenders:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
    from django.core.cache import cache

    cache.set("test:go", True)
    results = [result_of(process)["allowed"] for process in contenders]

    assert sorted(results) == [False] * 7 + [True]
    assert not here.allow()


def test_sending_side_keeps_working_when_redis_dies_mid_run(
    shared_cache: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="robust_mail.state")
    breaker = get_breaker("primary", failure_threshold=2, reset_timeout=60)
    breaker.record_failure()
    metrics.incr("primary", "sent")
    metrics.flush()  # as the flusher does every FLUSH_INTERVAL: this one reaches Redis

    shared_cache.stop()

    # Nothing raises; the breaker now counts in this process only.
    assert breaker.allow()
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    metrics.incr("primary", "sent")
    metrics.observe("primary", 0.02)
    assert metrics.snapshot()["primary"]["sent"] == 1  # the per-process count
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.name for r in warnings if "failed" in r.getMessage()] == ["robust_mail.state"]

    # Redis comes back (empty: no persistence): shared state resumes after the probe interval.
    shared_cache.start()
    state.guard("default")._next_probe = 0.0  # do not wait PROBE_INTERVAL in a test
    assert breaker.allow()
    assert breaker.state is BreakerState.CLOSED
    assert any("answers again" in r.getMessage() for r in caplog.records)


@contextlib.contextmanager
def blackholed_cache(settings: Any) -> Iterator[socket.socket]:
    """The default cache on a listening socket that never answers (so every call would
    wait for socket_timeout); yields the listener, non-blocking, to count connections."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        settings.CACHES = redis_caches(f"redis://127.0.0.1:{listener.getsockname()[1]}/0")
        listener.setblocking(False)
        yield listener


def _accept_all(listener: socket.socket) -> int:
    """Accept (and close) the connections waiting on ``listener``; how many."""
    accepted = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            listener.accept()[0].close()
            accepted += 1
    return accepted


def test_a_blackholed_cache_costs_one_socket_timeout_per_probe_interval(settings: Any) -> None:
    with blackholed_cache(settings) as listener:
        breaker = get_breaker("primary", failure_threshold=2)

        for _ in range(50):
            breaker.allow()
            breaker.record_success()

        assert state.guard("default").degraded
        attempts = _accept_all(listener)
    # One connection, one timeout, then per-process state until the next probe.
    assert attempts == 1


def test_threads_arriving_when_a_probe_is_due_send_one_probe(settings: Any) -> None:
    # The probe interval is over and a worker's threads all want the breaker at once:
    # one of them tries the black-holed cache; the others use per-process state instead
    # of each waiting for its own socket timeout.
    with blackholed_cache(settings) as listener:
        breaker = get_breaker("primary", failure_threshold=2)
        breaker.allow()  # the outage is found: one timeout
        cache_guard = state.guard("default")
        assert cache_guard.degraded
        _accept_all(listener)

        cache_guard._next_probe = 0.0  # the interval is over (not waited for in a test)
        threads = [threading.Thread(target=breaker.allow) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        probes = _accept_all(listener)
    assert cache_guard.degraded
    assert probes == 1


def test_a_delivered_message_costs_one_redis_round_trip(
    shared_cache: RedisServer, smtp_server: Any, robust: Any
) -> None:
    import redis
    from django.core.mail import send_mail

    from tests.conftest import provider

    server = smtp_server()
    robust([provider(server, "primary")])
    for _ in range(3):  # warm: pool, registries, counters created
        send_mail("Hi", "Body", "from@example.com", ["to@example.com"])
    metrics.flush()
    client = redis.Redis.from_url(shared_cache.url)
    try:
        before = _commands(client)
        with metrics._flush_lock:  # hold the background flush off while counting
            for _ in range(20):
                send_mail("Hi", "Body", "from@example.com", ["to@example.com"])
            during = _commands(client)
    finally:
        client.close()

    used = {name: n - before.get(name, 0) for name, n in during.items()}
    # One read of the breaker (state and failure count together); nothing else per message.
    assert {name: n for name, n in used.items() if n and name != "info"} == {"mget": 20}
    assert metrics.snapshot()["primary"]["sent"] == 23
    assert len(server.messages) == 23


def _commands(client: Any) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_flush_its_parents_counts_again(
    shared_cache: RedisServer,
) -> None:
    import warnings

    with metrics._flush_lock:  # pending in the parent when it forks
        metrics.incr("primary", "sent")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            code = 1
            try:
                metrics.incr("primary", "failed")  # the child's own count
                metrics.flush()
                code = 0
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0

    snapshot = metrics.snapshot()["primary"]

    assert (snapshot["sent"], snapshot["failed"]) == (1, 1)


def test_counts_made_while_redis_is_unreachable_are_written_when_it_answers(
    shared_cache: RedisServer,
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from robust_mail.prometheus import register

    registry = CollectorRegistry()
    register(registry)

    def exported() -> float | None:
        for line in generate_latest(registry).decode().splitlines():
            if line.startswith('robust_mail_messages_sent_total{provider="primary"}'):
                return float(line.split()[-1])
        return None  # left out of the scrape

    metrics.incr("primary", "sent", 1000)
    assert exported() == 1000
    assert shared_cache.process is not None
    shared_cache.process.send_signal(signal.SIGSTOP)  # unreachable, its data kept
    try:
        metrics.incr("primary", "sent", 5)
        # Not this process's 5 in place of the deployment's 1000: a false counter reset.
        assert exported() is None
        assert metrics.degraded()
        assert metrics.snapshot()["primary"]["sent"] == 5  # this process's, since the outage
    finally:
        shared_cache.process.send_signal(signal.SIGCONT)
    state.guard("default")._next_probe = 0.0  # the probe interval is over (not waited for)
    metrics.incr("primary", "sent", 1)
    metrics.flush()  # as the flusher does every second: it finds the cache back

    assert exported() == 1006  # nothing lost to the outage
    assert not metrics.degraded()
