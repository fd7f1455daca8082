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
from typing import TYPE_CHECKING

from robust_mail.exceptions import DeadlineReached

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["WRITE_CHUNK", "Session", "check_deadline"]

#: Message content is written in chunks of this size, each under the timeout.
WRITE_CHUNK = 64 * 1024

#: Bytes asked of the socket per read; replies are short, pipelined batches a few KB.
_RECV_SIZE = 8 * 1024


class _ReplyReader:
    """The session's reader: its own buffer over the socket, read against a fixed end.

    A socket timeout bounds one ``recv``, not a reply: a server dripping a byte just
    inside the timeout would hold a reply (and the caller) for ever. So before every
    ``recv`` the socket timeout is set to the time left before :attr:`Session.reply_by`,
    fixed when smtplib starts reading a reply; none left raises ``TimeoutError`` (or
    :class:`DeadlineReached` when the deadline set that end). smtplib reports either as
    a disconnect, which the transport (``SMTPConnection._blame``) puts back down to the
    deadline.
    """

    def __init__(self, session: Session, sock: socket.socket) -> None:
        self._session = session
        self._sock = sock
        self._buffer = bytearray()

    def readline(self, size: int = -1) -> bytes:
        """A line with its ``\\n``, at most ``size`` bytes; what is left (maybe b"") at EOF.

        As ``BufferedReader.readline``, which smtplib expects: it detects a line over
        ``_MAXLINE`` by asking for one byte more, and a disconnect by an empty line.
        """
        buffer = self._buffer
        limit = size if size >= 0 else None
        while True:
            end = buffer.find(b"\n", 0, limit)
            if end >= 0:
                cut = end + 1
            elif limit is not None and len(buffer) >= limit:
                cut = limit
            elif self._fill():
                continue
            else:
                cut = len(buffer)  # EOF: what is left, b"" when nothing is
            line = bytes(buffer[:cut])
            del buffer[:cut]
            return line

    def _fill(self) -> bool:
        """Read what the socket has (waiting at most the time left); False at EOF."""
        self._sock.settimeout(self._session.time_left())
        chunk = self._sock.recv(_RECV_SIZE)
        self._buffer += chunk
        return bool(chunk)

    def close(self) -> None:
        # Anything still buffered is dropped with the reader (see Session.start_tls).
        self._buffer.clear()


class Session(smtplib.SMTP):
    """smtplib's command/reply machinery on a socket this module connected itself.

    Every command sent and every reply awaited first re-arms the socket timeout with
    :meth:`arm`, so a ``deadline`` bounds multi-command steps (AUTH) too. A reply as a
    whole (all its lines) must arrive within the timeout: see :class:`_ReplyReader`.
    """

    #: Absolute ``time.monotonic()`` by which the current operation must end, or None.
    deadline: float | None = None
    #: Whether the last :meth:`arm` shortened the timeout to meet the deadline.
    cut_short = False
    #: Absolute ``time.monotonic()`` by which the reply being read must be complete.
    reply_by = 0.0

    def attach(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = None

    def arm(self) -> float:
        """Set the socket timeout for the next network operation; return when it ends.

        ``self.timeout`` (the provider's), or the time left before ``deadline`` when that
        is shorter. Raises :class:`DeadlineReached` when no time is left.
        """
        now = time.monotonic()
        timeout = float(self.timeout)
        self.cut_short = False
        if self.deadline is not None:
            left = self.deadline - now
            if left <= 0:
                self.cut_short = True
                raise DeadlineReached("the delivery deadline was reached")
            if left < timeout:
                timeout, self.cut_short = left, True
        if self.sock is not None:
            self.sock.settimeout(timeout)
        return now + timeout

    def time_left(self) -> float:
        """Seconds left to read the current reply; raises once there are none."""
        left = self.reply_by - time.monotonic()
        if left > 0:
            return left
        if self.cut_short:
            raise DeadlineReached("the delivery deadline was reached")
        raise TimeoutError("timed out")  # socket.timeout's own words, as smtplib shows them

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
        self.reply_by = self.arm()
        if self.file is None and self.sock is not None:
            self.file = _ReplyReader(self, self.sock)
        return super().getreply()

    def handshake(self, context: ssl.SSLContext, server_hostname: str) -> ssl.SSLSocket:
        """The socket wrapped in TLS, the handshake done within the timeout or the deadline.

        One handshake under one socket timeout is bounded as a whole: since Python 3.5 the
        timeout is "the maximum total duration of the handshake", not a per-read limit, so
        a server dripping handshake bytes cannot stretch it. On failure ``wrap_socket``
        closes the socket.
        """
        assert self.sock is not None
        self.arm()
        return context.wrap_socket(self.sock, server_hostname=server_hostname)

    def start_tls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        """Upgrade to TLS after a 220 reply to STARTTLS (see :meth:`handshake`)."""
        if self.file is not None:
            # Drop the plaintext reader first so no buffered plaintext survives the upgrade.
            self.file.close()
            self.file = None
        self.attach(self.handshake(context, server_hostname))
        # RFC 3207: forget everything learnt before TLS; the caller sends EHLO again.
        self.helo_resp = self.ehlo_resp = None
        self.esmtp_features = {}
        self.does_esmtp = False


def check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineReached("the delivery deadline was reached")
