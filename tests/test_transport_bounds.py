"""A server that drips bytes cannot stretch a reply or a TLS handshake past its bounds.

A socket timeout bounds one ``recv``; these servers on 127.0.0.1 always send the next
byte (or line) well inside it, so only a bound on the reply (or handshake) as a whole
ends the wait. Each test asserts the outcome (the step, the classification, whether the
deadline was blamed) and that the client gave up while the server still had bytes to
send.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from robust_mail.exceptions import Classification, Step, TransportError, classify
from robust_mail.providers import ProviderConfig
from robust_mail.resolver import Resolver
from robust_mail.transport import SMTPConnection, cut_by_deadline

#: Seconds between two dripped bytes (or lines): far inside any timeout used here.
INTERVAL = 0.05
#: How many bytes (or lines) a server drips at most: about ten seconds' worth, far past
#: every bound here, so that a client that waits for them all fails the test.
MAX_DRIPS = 200
#: A TLS handshake record announcing 16 KB of body, which is then dripped a byte at a time.
TLS_RECORD_HEADER = bytes([0x16, 0x03, 0x03, 0x40, 0x00])


class DripServer:
    """One session on 127.0.0.1, run by ``script(server, conn, lines)`` in a thread.

    ``finished`` is set only if the script dripped everything it meant to; ``stopping``
    ends a drip early when the test is over.
    """

    def __init__(self, script: Callable[[DripServer, socket.socket, Any], None]) -> None:
        self.script = script
        self.finished = threading.Event()
        self.stopping = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn, conn.makefile("rb") as lines, contextlib.suppress(OSError):
            self.script(self, conn, lines)

    def drip(self, conn: socket.socket, pieces: list[bytes]) -> None:
        """Send ``pieces`` one by one, ``INTERVAL`` apart; stop when the client is gone."""
        for piece in pieces:
            if self.stopping.is_set():
                return
            conn.sendall(piece)
            time.sleep(INTERVAL)
        self.finished.set()

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()
        self.thread.join(10)


@pytest.fixture
def drip_server() -> Iterator[Callable[..., DripServer]]:
    started: list[DripServer] = []

    def start(script: Callable[[DripServer, socket.socket, Any], None]) -> DripServer:
        server = DripServer(script)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def open_failure(server: DripServer, deadline_in: float | None = None, **fields: Any) -> Any:
    """The TransportError of ``open()`` against ``server``; the connection is left closed."""
    options: dict[str, Any] = {"name": "drip", "host": "127.0.0.1", "port": server.port}
    options.update(fields)
    conn = SMTPConnection(ProviderConfig(**options), resolver=Resolver())
    deadline = None if deadline_in is None else time.monotonic() + deadline_in
    try:
        with pytest.raises(TransportError) as caught:
            conn.open(deadline=deadline)
    finally:
        conn.close()
    assert not conn.is_open
    return caught.value


# --- scripts -----------------------------------------------------------------------------


def drip_greeting(server: DripServer, conn: socket.socket, lines: Any) -> None:
    greeting = b"220 drip.test " + b"x" * MAX_DRIPS + b"\r\n"
    server.drip(conn, [greeting[i : i + 1] for i in range(len(greeting))])


def endless_ehlo(server: DripServer, conn: socket.socket, lines: Any) -> None:
    # Every line arrives at once, but the reply never ends: "250-" is always followed by
    # another line. Bounding each line would not end this; bounding the reply does.
    conn.sendall(b"220 drip.test ESMTP\r\n")
    lines.readline()
    server.drip(conn, [b"250-drip.test says more\r\n"] * MAX_DRIPS)


def drip_handshake(server: DripServer, conn: socket.socket, lines: Any) -> None:
    conn.recv(16 * 1024)  # the ClientHello
    conn.sendall(TLS_RECORD_HEADER)
    server.drip(conn, [b"\x00"] * MAX_DRIPS)


def drip_handshake_after_starttls(server: DripServer, conn: socket.socket, lines: Any) -> None:
    conn.sendall(b"220 drip.test ESMTP\r\n")
    lines.readline()  # EHLO
    conn.sendall(b"250-drip.test\r\n250 STARTTLS\r\n")
    lines.readline()  # STARTTLS
    conn.sendall(b"220 go ahead\r\n")
    drip_handshake(server, conn, lines)


# --- replies -----------------------------------------------------------------------------


def test_a_greeting_dripped_a_byte_at_a_time_times_out_within_the_timeout(
    drip_server: Callable[..., DripServer],
) -> None:
    server = drip_server(drip_greeting)
    error = open_failure(server, timeout=0.5)
    assert error.step is Step.GREETING
    assert "timed out" in str(error.cause)
    assert not cut_by_deadline(error)  # the provider's timeout, not the caller's deadline
    assert classify(error) is Classification.TRANSIENT
    assert not server.finished.is_set()


def test_a_greeting_dripped_a_byte_at_a_time_ends_at_the_deadline(
    drip_server: Callable[..., DripServer],
) -> None:
    server = drip_server(drip_greeting)
    error = open_failure(server, deadline_in=0.5, timeout=5.0)
    assert error.step is Step.GREETING
    assert cut_by_deadline(error)  # reported as the caller's time running out
    assert classify(error) is Classification.TRANSIENT
    assert not server.finished.is_set()


def test_a_reply_that_never_ends_times_out_though_each_line_comes_at_once(
    drip_server: Callable[..., DripServer],
) -> None:
    server = drip_server(endless_ehlo)
    error = open_failure(server, timeout=0.5)
    assert error.step is Step.EHLO
    assert not cut_by_deadline(error)
    assert classify(error) is Classification.TRANSIENT
    assert not server.finished.is_set()


def test_a_reply_line_over_smtplibs_limit_is_refused(
    drip_server: Callable[..., DripServer],
) -> None:
    def long_greeting(server: DripServer, conn: socket.socket, lines: Any) -> None:
        conn.sendall(b"220 " + b"x" * 9000 + b"\r\n")
        lines.readline()  # until the client hangs up

    error = open_failure(drip_server(long_greeting), timeout=2.0)
    assert error.step is Step.GREETING
    assert error.code == 500  # smtplib's "Line too long."


def test_a_server_that_hangs_up_before_greeting_is_a_disconnect(
    drip_server: Callable[..., DripServer],
) -> None:
    error = open_failure(drip_server(lambda server, conn, lines: None), timeout=2.0)
    assert error.step is Step.GREETING
    assert "Connection unexpectedly closed" in str(error.cause)
    assert classify(error) is Classification.TRANSIENT


# --- TLS handshakes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "tls", "step"),
    [
        (drip_handshake, {"use_ssl": True}, Step.CONNECT),
        (drip_handshake_after_starttls, {"use_tls": True}, Step.STARTTLS),
    ],
    ids=["implicit", "starttls"],
)
@pytest.mark.parametrize("bound", ["timeout", "deadline"])
def test_a_tls_handshake_dripped_a_byte_at_a_time_is_bounded(
    drip_server: Callable[..., DripServer],
    script: Callable[[DripServer, socket.socket, Any], None],
    tls: dict[str, bool],
    step: Step,
    bound: str,
) -> None:
    server = drip_server(script)
    if bound == "timeout":
        error = open_failure(server, timeout=0.5, **tls)
    else:
        error = open_failure(server, deadline_in=0.5, timeout=5.0, **tls)
    assert error.step is step
    assert isinstance(error.cause, TimeoutError)
    assert cut_by_deadline(error) is (bound == "deadline")
    assert classify(error) is Classification.TRANSIENT
    assert not server.finished.is_set()
