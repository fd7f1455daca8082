"""An exception that is not ours, raised mid-send, reaches the caller and spoils nothing.

Celery's ``SoftTimeLimitExceeded`` is an ``Exception`` raised by a signal handler wherever
the task happens to be: here, while waiting for the reply to the final dot. The server
may then have the message, and its reply is still owed on the connection. The send must
not be retried (on that connection its replies would be out of step, and the message
would reach the server again as if nothing were in doubt), the connection must not go
back to the pool, and the exception must reach the task.

Real SMTP servers on 127.0.0.1. The server itself raises the signal, from inside its
handling of the final dot and before it replies, so nothing here depends on timing.
SIGUSR1 stands in for the SIGALRM of a time limit: pytest-timeout owns SIGALRM.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core.mail import EmailMessage, send_mail

from robust_mail.pool import pools
from robust_mail.state import get_breaker
from tests.conftest import provider


class SoftTimeLimitExceeded(Exception):
    """As Celery's (billiard's): an ``Exception``, not a ``BaseException``."""


class Interrupter:
    """Interrupts the main thread while the server holds its reply to a final dot."""

    def __init__(self) -> None:
        self.armed = 0  # how many of the next messages to interrupt
        self.interrupted = 0
        self.replied = threading.Event()

    def on_message(self, _message: Any) -> None:
        # On the server's thread, before it replies to the final dot.
        if self.armed:
            self.armed -= 1
            self.replied.clear()
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)
            # Reply only once the client has given up (a safety bound, never reached).
            self.replied.wait(10)

    def handler(self, signum: int, frame: Any) -> None:
        self.interrupted += 1
        self.replied.set()  # the reply is now owed on a connection nobody reads
        raise SoftTimeLimitExceeded("soft time limit exceeded")


@pytest.fixture
def interrupter() -> Iterator[Interrupter]:
    interrupter = Interrupter()
    previous = signal.signal(signal.SIGUSR1, interrupter.handler)
    yield interrupter
    signal.signal(signal.SIGUSR1, previous)


@pytest.fixture(params=[False, True], ids=["plain", "pipelining"])
def pipelining(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def _only_pool() -> Any:
    (pool,) = pools.all()
    return pool


def test_time_limit_while_waiting_for_the_final_reply_reaches_the_caller_unretried(
    smtp_server: Callable[..., Any], robust: Any, interrupter: Interrupter, pipelining: bool
) -> None:
    server = smtp_server(on_message=interrupter.on_message)
    robust([provider(server, "only", TIMEOUT=5)], RETRY={"ATTEMPTS": 3, "BACKOFF": 0.0})
    send_mail("warm", "Body", "from@example.com", ["to@example.com"])  # a pooled connection
    interrupter.armed = 1
    message = EmailMessage("Hi", "Body", "from@example.com", ["to@example.com"])

    with pytest.raises(SoftTimeLimitExceeded):
        message.send()

    assert interrupter.interrupted == 1
    assert [m.subject for m in server.messages] == ["warm", "Hi"]  # not sent again
    pool = _only_pool()
    assert pool.open_connections == 0  # the connection with a reply owed was closed
    assert pool.stats["discarded"] == 1
    assert get_breaker("only").failures == 0  # says nothing about the provider

    send_mail("next", "Body", "from@example.com", ["to@example.com"])

    assert server.connections_total == 2  # on a fresh connection, not the spoilt one
    assert [m.subject for m in server.messages] == ["warm", "Hi", "next"]


def test_time_limit_in_an_outbox_task_keeps_the_message_queued_as_ambiguous(
    smtp_server: Callable[..., Any], robust: Any, interrupter: Interrupter, db: Any
) -> None:
    from robust_mail.models import OutboxMessage
    from robust_mail.outbox import enqueue
    from robust_mail.outbox_delivery import process_pk

    server = smtp_server(on_message=interrupter.on_message)
    robust([provider(server, "only", TIMEOUT=5)], RETRY={"ATTEMPTS": 3, "BACKOFF": 0.0})
    row = enqueue(EmailMessage("Hi", "Body", "from@example.com", ["to@example.com"]))
    interrupter.armed = 1

    process_pk(row.pk)  # the delivery task's body

    row = OutboxMessage.objects.get(pk=row.pk)
    assert interrupter.interrupted == 1
    assert (row.status, row.ambiguous) == ("queued", True)  # may have been sent: not lost
    assert "SoftTimeLimitExceeded" in row.last_error
    assert [m.message_id for m in server.messages] == [row.message_id]  # sent once


def test_interrupted_send_leaves_the_session_closed_not_reusable(
    smtp_server: Callable[..., Any], interrupter: Interrupter, pipelining: bool
) -> None:
    from robust_mail.providers import ProviderConfig
    from robust_mail.resolver import Resolver
    from robust_mail.transport import SMTPConnection

    server = smtp_server(on_message=interrupter.on_message)
    provider_config = ProviderConfig(name="only", host="127.0.0.1", port=server.port, timeout=5)
    conn = SMTPConnection(provider_config, resolver=Resolver(), local_hostname="client.test")
    conn.open()
    data = b"From: from@example.com\r\nTo: to@example.com\r\nSubject: Hi\r\n\r\nBody\r\n"
    interrupter.armed = 1
    try:
        with pytest.raises(SoftTimeLimitExceeded):
            conn.send("from@example.com", ["to@example.com"], data)

        # A reply is owed on it: the next command would read it as its own.
        assert not conn.is_open
        assert not conn.reusable
    finally:
        conn.close()
