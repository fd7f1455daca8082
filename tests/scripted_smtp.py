"""A hand-written SMTP server for the pipelining tests: it answers on its own schedule.

aiosmtpd answers each command as it reads it, so it cannot show that a client *did not
wait* for a reply. This one can: it answers nothing of an envelope until MAIL, every RCPT
and DATA have arrived, and (``withhold``) keeps the reply to a message's final dot until
the client's next command arrives.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Generic, Protocol, TypeVar

import pytest

from robust_mail.providers import ProviderConfig
from robust_mail.resolver import Resolver
from robust_mail.transport import SMTPConnection


class _Server(Protocol):
    port: int

    def close(self) -> None: ...


S = TypeVar("S", bound=_Server)

MESSAGE = b"Subject: hi\r\nMessage-ID: <1@test>\r\n\r\nHello\r\n"


class ScriptedServer:
    """One plain-SMTP session on 127.0.0.1 that offers PIPELINING.

    For each transaction it reads MAIL, the RCPTs and DATA *before* answering any of them,
    then answers with ``envelope`` (one reply per command); after a ``354`` it reads the
    content up to the dot and answers ``final`` (``"drop"``: closes the connection
    instead) after ``pause`` seconds. With ``withhold``, that answer waits for the
    client's next command (so a client that waits for it before sending on hangs); the
    last transaction's does not.
    Everything received is kept in ``log``.
    """

    def __init__(
        self,
        transactions: list[tuple[list[str], str]],
        *,
        withhold: bool = False,
        pause: float = 0.0,
    ) -> None:
        self.transactions = transactions
        self.withhold = withhold
        self.pause = pause
        self.log: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        # The client may hang up on it, as some tests make it do.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._session()

    def _session(self) -> None:
        conn, _ = self.listener.accept()
        transactions = iter(self.transactions)
        left = len(self.transactions)
        owed = b""  # a withheld reply to a final dot
        with conn, conn.makefile("rb") as reader:
            conn.sendall(b"220 scripted\r\n")
            while line := self._line(reader):
                if owed:
                    if owed == b"drop":
                        return
                    conn.sendall(owed)
                    owed = b""
                command = line[:4].upper()
                if command == b"EHLO":
                    conn.sendall(b"250-scripted\r\n250 PIPELINING\r\n")
                elif command in (b"MAIL", b"RCPT"):
                    continue  # answered together with DATA
                elif command == b"DATA":
                    envelope, final = next(transactions)
                    left -= 1
                    conn.sendall("".join(f"{reply}\r\n" for reply in envelope).encode())
                    if envelope[-1].startswith("354"):
                        while self._line(reader) not in (b".\r\n", b""):
                            pass
                        reply = b"drop" if final == "drop" else f"{final}\r\n".encode()
                        time.sleep(self.pause)
                        if self.withhold and left:
                            owed = reply
                        elif final == "drop":
                            return
                        else:
                            conn.sendall(reply)
                elif command == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 ok\r\n")

    def _line(self, reader: Any) -> bytes:
        line: bytes = reader.readline()
        self.log.append(line)
        return line

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


class Sessions(Generic[S]):
    """Clients opened on scripted servers for one test; all closed after it."""

    def __init__(self) -> None:
        self.made: list[tuple[SMTPConnection, S]] = []

    def open(self, server: S) -> tuple[SMTPConnection, S]:
        provider = ProviderConfig(name="scripted", host="127.0.0.1", port=server.port, timeout=5)
        conn = SMTPConnection(provider, resolver=Resolver(), local_hostname="client.test")
        self.made.append((conn, server))
        conn.open()
        return conn, server

    def close(self) -> None:
        for conn, server in self.made:
            conn.close()
            server.close()


@pytest.fixture
def scripted() -> Iterator[Any]:
    """``scripted(*transactions, withhold=, pause=)`` → (an open SMTPConnection, its server)."""
    sessions: Sessions[ScriptedServer] = Sessions()

    def start(
        *transactions: tuple[list[str], str], withhold: bool = False, pause: float = 0.0
    ) -> tuple[SMTPConnection, ScriptedServer]:
        return sessions.open(ScriptedServer(list(transactions), withhold=withhold, pause=pause))

    yield start
    sessions.close()
