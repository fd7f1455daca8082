"""A hand-written SMTP server offering CHUNKING, for the BDAT run tests.

aiosmtpd (and the test server on it) answers each command as it reads it, so it cannot
show that a client *kept writing* without waiting for answers. This one holds its replies
back: they go out in a batch once ``hold`` messages have arrived, or once the client has
been quiet for :data:`IDLE` seconds (a client waiting for an answer). ``batches`` records
how many messages each batch answered.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from robust_mail.transport import SMTPConnection
from tests.scripted_smtp import Sessions

IDLE = 0.5
DROP = "drop"

#: One message's script: None (all accepted), DROP (hang up when its answers are due), or
#: replies to override: {"rset": ..., "mail": ..., "rcpt": [one per recipient], "bdat": ...};
#: with "bdat": DROP the envelope is answered and the server hangs up before the BDAT reply.
Script = dict[str, Any] | str | None


class BdatServer:
    """One plain-SMTP session on 127.0.0.1 offering PIPELINING and CHUNKING.

    Each message sent with BDAT (RSET, MAIL, RCPT…, ``BDAT n LAST`` and its octets) is
    answered from ``scripts`` in turn. A reply starting ``421`` closes the session after
    it is sent. A transaction by DATA, and lone commands (RSET, NOOP, QUIT), get the
    usual positive answers. Everything received is kept in ``log``; the content of each
    BDAT message in ``messages``.
    """

    def __init__(self, scripts: list[Script], *, hold: int) -> None:
        self.scripts = iter(scripts)
        self.hold = hold
        self.log: list[bytes] = []
        self.messages: list[bytes] = []
        self.batches: list[int] = []
        self._buffer = bytearray()
        self._pending: list[str] = []  # replies held back (DROP: hang up there)
        self._held = 0  # messages among them
        self._envelope: list[bytes] = []  # commands of the message being received
        self._conn: socket.socket | None = None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    # --- the session ----------------------------------------------------------------------

    def _serve(self) -> None:
        with contextlib.suppress(OSError):  # the client may hang up on it
            conn, _ = self.listener.accept()
            self._conn = conn
            with conn:
                conn.sendall(b"220 scripted\r\n")
                self._session()

    def _session(self) -> None:
        while (line := self._line()) is not None:
            verb = line[:4].upper()
            if verb == b"EHLO":
                self._send("250-scripted\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
            elif verb in (b"RSET", b"MAIL", b"RCPT"):
                self._envelope.append(verb)
            elif verb == b"BDAT":
                octets = self._octets(int(line.split()[1]))
                if octets is None:
                    return
                self.messages.append(octets)
                self._queue_message(next(self.scripts, None))
                if self._held >= self.hold and not self._flush():
                    return
            elif verb == b"DATA":
                if not self._flush():
                    return
                self._send("".join("250 ok\r\n" for _ in self._envelope) + "354 go\r\n")
                self._envelope.clear()
                while self._line() not in (b".\r\n", None):
                    pass
                self._send("250 queued\r\n")
            elif verb == b"QUIT":
                self._flush()
                self._send("221 bye\r\n")
                return
            else:
                self._pending.append("250 ok")

    def _queue_message(self, script: Script) -> None:
        commands, self._envelope = self._envelope, []
        if script == DROP:
            self._pending.append(DROP)
            return
        given: dict[str, Any] = script if isinstance(script, dict) else {}
        rcpts = iter(given.get("rcpt", []))
        for verb in commands:
            if verb == b"RSET":
                self._pending.append(given.get("rset", "250 2.0.0 ok"))
            elif verb == b"MAIL":
                self._pending.append(given.get("mail", "250 2.1.0 ok"))
            else:
                self._pending.append(next(rcpts, "250 2.1.5 ok"))
        self._pending.append(given.get("bdat", "250 2.0.0 queued"))
        self._held += 1

    def _flush(self) -> bool:
        """Send what is held back; False when the session ended (a drop or a 421)."""
        for command in self._envelope:  # lone commands with no BDAT after them (RSET)
            self._pending.append("250 ok" if command != b"MAIL" else "250 2.1.0 ok")
        self._envelope.clear()
        if self._held:
            self.batches.append(self._held)
        self._held = 0
        pending, self._pending = self._pending, []
        for reply in pending:
            if reply == DROP:
                return False
            self._send(f"{reply}\r\n")
            if reply.startswith("421"):
                return False
        return True

    # --- reading ------------------------------------------------------------------------

    def _line(self) -> bytes | None:
        while b"\r\n" not in self._buffer:
            if not self._receive():
                return None
        end = self._buffer.index(b"\r\n") + 2
        line = bytes(self._buffer[:end])
        del self._buffer[:end]
        self.log.append(line)
        return line

    def _octets(self, size: int) -> bytes | None:
        while len(self._buffer) < size:
            if not self._receive():
                return None
        octets = bytes(self._buffer[:size])
        del self._buffer[:size]
        return octets

    def _receive(self) -> bool:
        conn = self._conn
        assert conn is not None
        if not select.select([conn], [], [], IDLE)[0]:
            # The client is waiting for answers: give it what is held back.
            if not self._flush():
                return False
            if not select.select([conn], [], [], 10)[0]:
                return False
        data = conn.recv(65536)
        self._buffer += data
        return bool(data)

    def _send(self, text: str) -> None:
        assert self._conn is not None
        self._conn.sendall(text.encode())

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def bdat_scripted() -> Iterator[Any]:
    """``bdat_scripted(*scripts, hold=)`` → (an open SMTPConnection, its server)."""
    sessions: Sessions[BdatServer] = Sessions()

    def start(*scripts: Script, hold: int) -> tuple[SMTPConnection, BdatServer]:
        return sessions.open(BdatServer(list(scripts), hold=hold))

    yield start
    sessions.close()
