"""RETRY.DEADLINE bounds a whole send: pool wait, connect, every reply, across providers.

Real SMTP servers on 127.0.0.1; where the time already spent matters, the dispatcher's
clock is injected and moved forward by the test instead of waiting for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core.mail import EmailMessage

from robust_mail import signals
from robust_mail.breaker import BreakerState
from robust_mail.conf import get_config
from robust_mail.dispatch import Dispatcher
from robust_mail.exceptions import Classification, Step, TransportError, classify
from robust_mail.pool import pools
from robust_mail.providers import ProviderConfig
from robust_mail.resolver import Resolver
from robust_mail.results import DeliveryResult, DeliveryStatus
from robust_mail.state import get_breaker
from robust_mail.transport import DeadlineReached, SMTPConnection
from tests.conftest import provider

SENDER = "sender@example.com"
RCPT = "rcpt@example.com"
DATA = b"From: sender@example.com\r\nTo: rcpt@example.com\r\nSubject: x\r\n\r\nbody\r\n"


class Clock:
    """A dispatcher clock that only moves when the test says so."""

    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def connect() -> Iterator[Callable[..., SMTPConnection]]:
    made: list[SMTPConnection] = []

    def make(server: Any, **overrides: Any) -> SMTPConnection:
        fields: dict[str, Any] = {
            "name": "test",
            "host": "127.0.0.1",
            "port": server.port,
            "timeout": 10.0,
        }
        fields.update(overrides)
        conn = SMTPConnection(
            ProviderConfig(**fields), resolver=Resolver(), local_hostname="client.test"
        )
        made.append(conn)
        return conn

    yield make
    for conn in made:
        conn.close()


def failure(call: Callable[[], object]) -> TransportError:
    with pytest.raises(TransportError) as info:
        call()
    return info.value


def soon(seconds: float) -> float:
    return time.monotonic() + seconds


# --- transport -----------------------------------------------------------------------------


def test_deadline_cuts_a_reply_slower_than_the_time_left_and_says_so(smtp_server, connect):
    server = smtp_server("slow", reply_delay=5.0)
    conn = connect(server, timeout=10.0)

    error = failure(lambda: conn.open(deadline=soon(0.3)))

    assert error.step is Step.GREETING
    assert isinstance(error.cause, DeadlineReached)
    assert "deadline" in str(error)
    assert classify(error) is Classification.TRANSIENT
    assert not conn.is_open


def test_deadline_bounds_a_multi_line_reply_dripped_line_by_line(smtp_server, connect):
    # Every line of the EHLO reply arrives well within the timeout left, but the whole
    # reply would end long after the deadline: the timeout is re-armed per line.
    server = smtp_server("slow", reply_delay=0.3)
    conn = connect(server, timeout=10.0)

    error = failure(lambda: conn.open(deadline=soon(0.8)))

    assert error.step is Step.EHLO
    assert isinstance(error.cause, DeadlineReached)


def test_open_after_the_deadline_connects_nowhere(smtp_server, connect):
    server = smtp_server()
    conn = connect(server)

    error = failure(lambda: conn.open(deadline=soon(-1)))

    assert isinstance(error.cause, DeadlineReached)
    assert server.connections_total == 0


def test_a_lookup_the_deadline_cuts_short_is_the_deadlines_not_the_providers():
    # DNS that never answers, with a DNS TIMEOUT far past the deadline: the lookup ends at
    # the deadline, and the failure is the deadline's (it does not count against the
    # provider's breaker), not a resolver outage.
    from robust_mail.testing.dns import DNSTestServer

    with DNSTestServer({"mail.test": {"A": ["127.0.0.1"]}}) as dns_server:
        dns_server.silent = True
        resolver = Resolver(["127.0.0.1"], port=dns_server.port, timeout=60.0)
        conn = SMTPConnection(
            ProviderConfig(name="test", host="mail.test", port=25, timeout=10.0),
            resolver=resolver,
            local_hostname="client.test",
        )

        error = failure(lambda: conn.open(deadline=soon(0.3)))

    assert error.step is Step.RESOLVE
    assert isinstance(error.cause, DeadlineReached)


def test_connect_loop_stops_trying_addresses_when_time_is_up(smtp_server, connect):
    server = smtp_server()
    conn = connect(server)

    error = failure(lambda: conn._connect(["127.0.0.1", "127.0.0.1"], soon(-1)))

    assert error.step is Step.CONNECT
    assert isinstance(error.cause, DeadlineReached)
    assert server.connections_total == 0


def test_send_after_the_deadline_fails_before_any_traffic_and_keeps_the_connection(
    smtp_server, connect
):
    server = smtp_server()
    conn = connect(server)
    conn.open()

    error = failure(lambda: conn.send(SENDER, [RCPT], DATA, deadline=soon(-1)))

    assert (error.step, type(error.cause)) == (Step.MAIL, DeadlineReached)
    assert conn.is_open and conn.reusable
    conn.send(SENDER, [RCPT], DATA)
    assert len(server.messages) == 1


def test_deadline_while_waiting_for_the_final_dot_reply_stays_ambiguous(smtp_server, connect):
    server = smtp_server("stall_after_data")
    conn = connect(server, timeout=10.0)
    conn.open()

    error = failure(lambda: conn.send(SENDER, [RCPT], DATA, deadline=soon(0.3)))

    assert error.step is Step.DATA_END
    assert isinstance(error.cause, DeadlineReached)
    assert classify(error) is Classification.AMBIGUOUS
    assert not conn.is_open


def test_a_timeout_the_deadline_did_not_shorten_is_the_providers(smtp_server, connect):
    server = smtp_server("blackhole")
    conn = connect(server, timeout=0.2)

    error = failure(lambda: conn.open(deadline=soon(60)))

    assert error.step is Step.GREETING
    assert not isinstance(error.cause, DeadlineReached)


def test_noop_is_bounded_by_the_deadline(smtp_server, connect):
    server = smtp_server()
    conn = connect(server, timeout=10.0)
    conn.open()
    server.mode = "slow"
    server.reply_delay = 5.0

    assert conn.noop(deadline=soon(0.2)) is False
    assert not conn.is_open


# --- dispatcher ----------------------------------------------------------------------------


def _message() -> EmailMessage:
    return EmailMessage("Deadline", "Body", SENDER, [RCPT])


def test_backup_gets_only_the_time_the_primary_left_and_the_deadline_is_reported(
    smtp_server, robust
):
    primary = smtp_server("refuse")
    backup = smtp_server("slow", reply_delay=5.0)
    robust(
        [provider(primary, "primary"), provider(backup, "backup", TIMEOUT=10)],
        RETRY={"ATTEMPTS": 1, "BACKOFF": 0, "MAX_BACKOFF": 0, "DEADLINE": 10},
    )
    config = get_config()
    clock = Clock()

    def primary_used_most_of_the_deadline(sender: Any, provider: str, **kwargs: Any) -> None:
        if provider == "primary":
            clock.now += 9.7  # 0.3 s left for the backup, whose replies take 5 s

    signals.provider_failed.connect(primary_used_most_of_the_deadline)
    try:
        result = Dispatcher(config, clock=clock).deliver(_message())
    finally:
        signals.provider_failed.disconnect(primary_used_most_of_the_deadline)

    assert result.status is DeliveryStatus.DEFERRED
    first, second = result.errors
    assert (first.provider, first.step) == ("primary", "connect")
    assert (second.provider, second.step) == ("backup", "greeting")
    assert "DeadlineReached" in second.message
    assert backup.connections_total == 1  # the backup was tried, not skipped
    assert backup.messages == []
    # The primary failed on its own; the backup only ran out of our time.
    assert get_breaker("primary", config).failures == 1
    assert get_breaker("backup", config).failures == 0


@pytest.fixture
def slow_primary(smtp_server, robust) -> tuple[Dispatcher, Any]:
    """A primary whose every reply comes well within TIMEOUT, but too slowly in all for
    RETRY.DEADLINE (1 s), and a healthy backup; FAILURE_THRESHOLD 2."""
    primary = smtp_server("slow", reply_delay=0.4)
    backup = smtp_server()
    robust(
        [provider(primary, "primary", TIMEOUT=2), provider(backup, "backup")],
        RETRY={"ATTEMPTS": 1, "BACKOFF": 0, "MAX_BACKOFF": 0, "DEADLINE": 1.0},
        CIRCUIT_BREAKER={"FAILURE_THRESHOLD": 2, "RESET_TIMEOUT": 60},
    )
    return Dispatcher(get_config()), backup


def test_primary_too_slow_for_the_deadline_opens_its_breaker_for_the_backup(slow_primary):
    # Each reply well within TIMEOUT, but together longer than the delivery's deadline:
    # uncounted, the primary would take every message's whole deadline forever.
    dispatcher, backup = slow_primary

    cut = [dispatcher.deliver(_message()) for _ in range(2)]
    result = dispatcher.deliver(_message())

    assert [r.status for r in cut] == [DeliveryStatus.DEFERRED] * 2
    assert all("DeadlineReached" in r.errors[0].message for r in cut)
    assert get_breaker("primary", get_config()).state is BreakerState.OPEN
    assert result.status is DeliveryStatus.SENT
    assert result.provider == "backup"
    assert len(backup.messages) == 1


def test_primary_too_slow_for_a_batchs_run_opens_its_breaker_too(slow_primary):
    # The same through deliver_many (send_messages, a worker's batch): the first attempts
    # share one connection there, and each message's own time counts.
    dispatcher, backup = slow_primary

    cut = dispatcher.deliver_many([(_message(), None), (_message(), None)])
    result = dispatcher.deliver(_message())

    assert all(isinstance(r, DeliveryResult) and r.status is DeliveryStatus.DEFERRED for r in cut)
    assert get_breaker("primary", get_config()).state is BreakerState.OPEN
    assert result.provider == "backup"
    assert len(backup.messages) == 1


def test_black_holed_primary_then_slow_backup_ends_with_the_deadline(smtp_server, robust):
    primary = smtp_server("blackhole")
    backup = smtp_server("slow", reply_delay=5.0)
    robust(
        [provider(primary, "primary", TIMEOUT=0.3), provider(backup, "backup", TIMEOUT=10)],
        RETRY={"ATTEMPTS": 1, "BACKOFF": 0, "MAX_BACKOFF": 0, "DEADLINE": 1.5},
    )

    result = Dispatcher(get_config()).deliver(_message())

    assert result.status is DeliveryStatus.DEFERRED
    assert [e.provider for e in result.errors] == ["primary", "backup"]
    assert "DeadlineReached" not in result.errors[0].message
    assert "DeadlineReached" in result.errors[1].message
    assert backup.connections_total == 1


def test_busy_primary_pool_leaves_time_for_the_backup_and_is_not_retried(smtp_server, robust):
    primary = smtp_server()
    backup = smtp_server()
    robust(
        [provider(primary, "primary"), provider(backup, "backup")],
        RETRY={"ATTEMPTS": 3, "BACKOFF": 0, "MAX_BACKOFF": 0, "DEADLINE": 1.0},
        POOL={"SIZE": 1, "IDLE_TIMEOUT": 60},
    )
    config = get_config()
    dispatcher = Dispatcher(config)
    assert dispatcher.deliver(_message()).provider == "primary"
    (pool,) = [p for p in pools.all() if p.name == "primary"]

    with pool.connection():  # another thread's long send holds the only connection
        result = dispatcher.deliver(_message())

    assert result.status is DeliveryStatus.SENT
    assert result.provider == "backup"
    (error,) = result.errors
    assert error.provider == "primary"
    assert error.attempts == 1  # a busy pool is not retried
    assert "stayed busy" in error.message
    assert len(backup.messages) == 1
    assert get_breaker("primary", config).failures == 0
