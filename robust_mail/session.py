"""The SMTP session under :class:`~robust_mail.transport.SMTPConnection`.

smtplib's command and reply machinery, on a socket the transport connected itself, with
every network operation bounded by the provider's timeout and an optional absolute
deadline (``time.monotonic()``). Imports nothing from Django.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING

from robust_mail.exceptions import DeadlineReached

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["WRITE_CHUNK", "Session", "check_deadline"]

#: Message content is written in chunks of this size, each under the timeout.
WRITE_CHUNK = 64 * 1024


class _ArmedReader:
    """The session's reader: re-arms the socket timeout before every line it reads.

    smtplib reads a multi-line reply (EHLO) line by line; arming once per reply would let
    a server dripping one line at a time stretch a single reply far past the deadline.
    An ``OSError`` from here (``DeadlineReached`` included) is reported by smtplib as a
    disconnect, which the transport (``SMTPConnection._blame``) puts back down to the
    deadline.
    """

    def __init__(self, raw: IO[bytes], arm: Callable[[], None]) -> None:
        self._raw = raw
        self._arm = arm

    def readline(self, size: int = -1) -> bytes:
        self._arm()
        return self._raw.readline(size)

    def close(self) -> None:
        self._raw.close()


class Session(smtplib.SMTP):
    """smtplib's command/reply machinery on a socket this module connected itself.

    Every command sent and every reply awaited first re-arms the socket timeout with
    :meth:`arm`, so a ``deadline`` bounds multi-command steps (AUTH) too.
    """

    #: Absolute ``time.monotonic()`` by which the current operation must end, or None.
    deadline: float | None = None
    #: Whether the last :meth:`arm` shortened the timeout to meet the deadline.
    cut_short = False

    def attach(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = None

    def arm(self) -> None:
        """Set the socket timeout for the next network operation.

        ``self.timeout`` (the provider's), or the time left before ``deadline`` when that
        is shorter. Raises :class:`DeadlineReached` when no time is left.
        """
        timeout = float(self.timeout)
        self.cut_short = False
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.cut_short = True
                raise DeadlineReached("the delivery deadline was reached")
            if left < timeout:
                timeout, self.cut_short = left, True
        if self.sock is not None:
            self.sock.settimeout(timeout)

    def send(self, s: str | Buffer) -> None:
        self.arm()
        super().send(s)

    def write_all(self, data: bytes) -> None:
        """Write ``data`` (message content), re-arming the timeout for every chunk.

        The timeout bounds each chunk (a stalled peer), not the whole transfer: a 20 MB
        message on a slow link is not a timeout. A TLS error after the handshake is a
        broken connection, not a TLS policy failure: it is raised as the disconnect it is.
        """
        sock = self.sock
        assert sock is not None
        view = memoryview(data)
        try:
            for offset in range(0, len(view), WRITE_CHUNK):
                self.arm()
                sock.sendall(view[offset : offset + WRITE_CHUNK])
        except ssl.SSLError as exc:
            raise smtplib.SMTPServerDisconnected(f"connection broken: {exc}") from exc

    def getreply(self) -> tuple[int, bytes]:
        if self.file is None and self.sock is not None:
            self.file = _ArmedReader(self.sock.makefile("rb"), self.arm)
        return super().getreply()

    def start_tls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        """Wrap the socket after a 220 reply to STARTTLS (handshake bounded by the timeout)."""
        assert self.sock is not None
        self.arm()
        if self.file is not None:
            # Drop the plaintext reader first so no buffered plaintext survives the upgrade.
            self.file.close()
            self.file = None
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        # RFC 3207: forget everything learnt before TLS; the caller sends EHLO again.
        self.helo_resp = self.ehlo_resp = None
        self.esmtp_features = {}
        self.does_esmtp = False


def check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineReached("the delivery deadline was reached")
