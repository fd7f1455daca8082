"""The connection pool against real SMTP servers (robust_mail.testing) and real SMTPConnections."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from robust_mail.exceptions import Classification, TransportError, classify
from robust_mail.pool import ConnectionPool
from robust_mail.providers import ProviderConfig
from robust_mail.resolver import Resolver
from robust_mail.retry import RetryPolicy
from robust_mail.transport import SMTPConnection


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def message(n: int | str) -> bytes:
    return (
        f"From: robust@example.com\r\nTo: rcpt@example.com\r\n"
        f"Message-ID: <pool-{n}@robust.test>\r\nSubject: pool {n}\r\n\r\nbody {n}\r\n"
    ).encode()


@pytest.fixture
def pool_for(smtp_server: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    made: list[ConnectionPool[SMTPConnection]] = []

    def make(server: Any, **kwargs: Any) -> ConnectionPool[SMTPConnection]:
        provider = ProviderConfig(name="primary", host="127.0.0.1", port=server.port, timeout=5)
        resolver = Resolver()
        options: dict[str, Any] = {"size": 3, "idle_timeout": 60.0}
        options.update(kwargs)
        pool = ConnectionPool(
            "primary", lambda: SMTPConnection(provider, resolver=resolver), **options
        )
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close()


def send(pool: ConnectionPool[SMTPConnection], n: int | str) -> None:
    with pool.connection() as conn:
        conn.send("robust@example.com", ["rcpt@example.com"], message(n))


def message_ids(server: Any) -> Counter[str | None]:
    return Counter(received.message_id for received in server.messages)


def test_eight_threads_share_three_connections_and_deliver_each_message_once(
    smtp_server: Callable[..., Any], pool_for: Callable[..., Any]
) -> None:
    server = smtp_server()
    pool = pool_for(server, size=3)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(200):
                send(pool, f"{t}-{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    ids = message_ids(server)
    assert len(ids) == 1600
    assert set(ids.values()) == {1}
    assert server.peak_connections <= 3
    assert server.connections_total <= 3


def test_connection_the_server_dropped_while_idle_is_replaced_before_sending(
    smtp_server: Callable[..., Any], pool_for: Callable[..., Any]
) -> None:
    server = smtp_server()
    clock = Clock()
    pool = pool_for(server, clock=clock)
    send(pool, 1)

    server.drop_connections()
    clock.now += 2.0  # idle long enough for the NOOP check
    send(pool, 2)

    assert message_ids(server) == Counter({"<pool-1@robust.test>": 1, "<pool-2@robust.test>": 1})
    assert server.connections_total == 2
    assert pool.stats["replaced"] == 1


def test_dropped_connection_found_by_the_send_is_retried_on_a_fresh_one_once(
    smtp_server: Callable[..., Any], pool_for: Callable[..., Any]
) -> None:
    # Dropped a moment ago, so no NOOP check: the send itself finds the connection dead
    # before DATA; the pool discards it and the dispatcher's retry gets a fresh one.
    server = smtp_server()
    pool = pool_for(server)
    send(pool, 1)
    server.drop_connections()
    failures: list[BaseException] = []

    RetryPolicy(attempts=2, backoff=0, jitter=False).call(
        lambda: send(pool, 2),
        retry_if=lambda exc: classify(exc) is Classification.TRANSIENT,
        on_retry=lambda attempt, exc, delay: failures.append(exc),
    )

    assert len(failures) == 1
    assert isinstance(failures[0], TransportError)
    assert message_ids(server) == Counter({"<pool-1@robust.test>": 1, "<pool-2@robust.test>": 1})
    assert server.connections_total == 2
    assert pool.open_connections == 1


def test_idle_connections_expire_and_the_server_sees_them_closed(
    smtp_server: Callable[..., Any], pool_for: Callable[..., Any]
) -> None:
    server = smtp_server()
    clock = Clock()
    pool = pool_for(server, clock=clock, idle_timeout=30.0)
    send(pool, 1)
    server.wait_for_connections(1)

    clock.now += 31
    assert pool.prune() == 1

    server.wait_for_connections(0)


def test_messages_per_connection_are_capped(
    smtp_server: Callable[..., Any], pool_for: Callable[..., Any]
) -> None:
    server = smtp_server()
    pool = pool_for(server, max_messages=2)
    for n in range(5):
        send(pool, n)

    assert len(server.messages) == 5
    assert server.connections_total == 3


class CountedConnection(SMTPConnection):
    """A real SMTPConnection that counts how many of its kind have a socket open."""

    lock = threading.Lock()
    live = peak = 0

    def open(self, *, deadline: float | None = None) -> bool:
        opened = super().open(deadline=deadline)
        with CountedConnection.lock:
            CountedConnection.live += 1
            CountedConnection.peak = max(CountedConnection.peak, CountedConnection.live)
        return opened

    def close(self, *, timeout: float | None = None) -> None:
        was_open = self._smtp is not None
        super().close(timeout=timeout)
        if was_open:
            with CountedConnection.lock:
                CountedConnection.live -= 1


def test_recycled_connections_never_take_the_pool_above_its_size(
    smtp_server: Callable[..., Any],
) -> None:
    server = smtp_server()
    provider = ProviderConfig(name="primary", host="127.0.0.1", port=server.port, timeout=5)
    resolver = Resolver()
    CountedConnection.live = CountedConnection.peak = 0
    pool: ConnectionPool[SMTPConnection] = ConnectionPool(
        "primary",
        lambda: CountedConnection(provider, resolver=resolver),
        size=3,
        idle_timeout=60.0,
        max_messages=2,
    )

    def worker(t: int) -> None:
        for i in range(40):
            send(pool, f"{t}-{i}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pool.close()

    assert set(message_ids(server).values()) == {1}
    assert len(server.messages) == 320
    assert server.connections_total >= 160  # at most two messages per connection
    assert CountedConnection.peak <= 3
    assert CountedConnection.live == 0


def test_queued_senders_are_served_in_order_of_arrival(
    smtp_server: Callable[..., Any], pool_for: Callable[..., Any]
) -> None:
    server = smtp_server()
    pool = pool_for(server, size=1, wait_timeout=30.0)
    release = threading.Event()
    sending = threading.Event()

    def holder() -> None:
        with pool.connection() as conn:
            conn.send("robust@example.com", ["rcpt@example.com"], message("holder"))
            sending.set()
            release.wait(30)
        send(pool, "holder-again")  # asks again at once, behind the queue

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    sending.wait(30)
    for name in ("first", "second"):
        threads.append(threading.Thread(target=send, args=(pool, name)))
        threads[-1].start()
        while pool.waiting < len(threads) - 1:
            time.sleep(0.005)
    release.set()
    for thread in threads:
        thread.join()

    assert [m.message_id for m in server.messages] == [
        "<pool-holder@robust.test>",
        "<pool-first@robust.test>",
        "<pool-second@robust.test>",
        "<pool-holder-again@robust.test>",
    ]
    assert server.connections_total == 1


def test_refused_recipient_leaves_the_connection_reusable(
    smtp_server: Callable[..., Any], pool_for: Callable[..., Any]
) -> None:
    server = smtp_server(refuse_recipients=["nobody@example.com"])
    pool = pool_for(server)
    with pytest.raises(TransportError), pool.connection() as conn:
        conn.send("robust@example.com", ["nobody@example.com"], message("refused"))
    send(pool, 2)

    assert server.connections_total == 1
    assert message_ids(server) == Counter({"<pool-2@robust.test>": 1})


class GoesSilent:
    """Plain SMTP on 127.0.0.1, a thread per session, that can stop answering old sessions.

    After :meth:`silence`, the sessions open so far read on but answer nothing (QUIT
    included), like a provider whose side of them hung; later sessions are served.
    """

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.messages: list[bytes] = []
        self._sessions = 0
        self._silent_below = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def silence(self) -> None:
        self._silent_below = self._sessions

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            number, self._sessions = self._sessions, self._sessions + 1
            threading.Thread(target=self._session, args=(conn, number), daemon=True).start()

    def _session(self, conn: socket.socket, number: int) -> None:
        with conn, conn.makefile("rb") as lines, contextlib.suppress(OSError):
            conn.sendall(b"220 silent.test ESMTP\r\n")
            for line in iter(lines.readline, b""):
                if number < self._silent_below:
                    continue
                verb = line[:4].upper()
                if verb == b"DATA":
                    conn.sendall(b"354 go on\r\n")
                    self.messages.append(b"".join(iter(lines.readline, b".\r\n")))
                    conn.sendall(b"250 queued\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 silent.test\r\n")


def test_expired_connections_to_a_silent_server_do_not_hold_up_the_next_message(
    pool_for: Callable[..., Any],
) -> None:
    # Both idle connections expired and their sessions hung: closing them must not wait
    # the provider's TIMEOUT (5 s) on each QUIT, outside the caller's 3 s deadline.
    server = GoesSilent()
    clock = Clock()
    try:
        pool = pool_for(server, size=2, clock=clock)
        with pool.connection(), pool.connection():
            pass
        server.silence()
        clock.now += 61

        with pool.connection(deadline=time.monotonic() + 3) as conn:
            conn.send("robust@example.com", ["rcpt@example.com"], message("fresh"))
    finally:
        server.close()

    assert [b"<pool-fresh@robust.test>" in data for data in server.messages] == [True]
    assert pool.stats["expired"] == 2
    assert pool.open_connections == 1


_EXIT_SCRIPT = """
import sys, threading
from robust_mail.pool import ConnectionPool
from robust_mail.providers import ProviderConfig
from robust_mail.resolver import Resolver
from robust_mail.transport import SMTPConnection

provider = ProviderConfig(name="p", host="127.0.0.1", port=int(sys.argv[1]), timeout=600)
pool = ConnectionPool("p", lambda: SMTPConnection(provider, resolver=Resolver()), size=3)
together = threading.Barrier(3)

def send():
    with pool.connection() as conn:
        together.wait()  # three at once: three connections
        conn.send("robust@example.com", ["rcpt@example.com"], b"Subject: x\\r\\n\\r\\nx\\r\\n")

threads = [threading.Thread(target=send) for _ in range(3)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(pool.idle_connections, flush=True)
sys.stdin.readline()
"""


def test_exit_does_not_wait_a_full_timeout_per_connection_on_a_hung_provider(
    smtp_server: Callable[..., Any],
) -> None:
    server = smtp_server()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen(
        [sys.executable, "-c", _EXIT_SCRIPT, str(server.port)],
        cwd=root,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "3"
        # The provider stops answering: QUIT would wait the full 600 s TIMEOUT per
        # connection. The exit hook gives each a moment, then closes without a word.
        server.reply_delay = 600
        server.mode = "slow"
        child.stdin.write("exit\n")
        child.stdin.flush()
        returncode = child.wait(timeout=60)  # a hang fails here instead of stalling CI
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()

    assert returncode == 0
    server.wait_for_connections(0)  # every socket was closed, none left to the OS


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_opens_its_own_connection_and_leaves_the_parents_alone(
    smtp_server: Callable[..., Any], pool_for: Callable[..., Any]
) -> None:
    server = smtp_server()
    pool = pool_for(server)
    send(pool, "parent-1")
    read_fd, write_fd = os.pipe()

    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() with threads running (the server's); we fork
        # on purpose and the child touches nothing but the pool and its own socket.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        status = 1
        try:
            inherited = pool.idle_connections
            send(pool, "child")
            status = 0 if inherited == 0 and pool.stats["opened"] == 1 else 2
            pool.close()
        finally:
            os.write(write_fd, str(status).encode())
            os._exit(0)

    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reader:
        status = reader.read().decode()
    os.waitpid(pid, 0)
    assert status == "0"

    send(pool, "parent-2")  # the parent's session survived the child

    assert server.connections_total == 2
    assert message_ids(server) == Counter(
        {
            "<pool-parent-1@robust.test>": 1,
            "<pool-child@robust.test>": 1,
            "<pool-parent-2@robust.test>": 1,
        }
    )
    assert pool.stats["opened"] == 1
