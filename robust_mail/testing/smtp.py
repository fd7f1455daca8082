"""A real SMTP server on 127.0.0.1 for tests, with faults injected on demand.

The server runs aiosmtpd on its own asyncio loop in a daemon thread, so the
code under test talks to it over real sockets exactly as it would to a
provider. Everything public here is safe to call from any thread.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping
from types import TracebackType
from typing import Any, Literal

from robust_mail.testing.certs import TestCertificates, default_certificates
from robust_mail.testing.loop import LoopThread
from robust_mail.testing.modes import Mode
from robust_mail.testing.protocol import DATA_SIZE_LIMIT, FaultySMTP
from robust_mail.testing.received import ReceivedMessage

TLSMode = Literal["starttls", "implicit"]

log = logging.getLogger("robust_mail.testing")


class SMTPTestServer:
    """An SMTP server for tests; see docs/testing.md.

    ``port=0`` picks a free port, kept for the server's lifetime (also across
    ``refuse`` and back). ``tls`` is ``None`` (plain), ``"starttls"`` or
    ``"implicit"`` (SMTPS). ``auth`` maps user names to passwords; when given,
    AUTH PLAIN/LOGIN is offered (over plain text too) and required before MAIL.
    ``refuse_recipients`` are answered ``550 5.1.1`` in every mode.
    ``on_message`` is called, on the server thread, for each recorded message; an
    exception it raises is logged, the message is still accepted, and the first such
    exception is raised again by ``wait_for()`` or ``stop()``.
    ``pipelining`` offers PIPELINING (RFC 2920), as most real providers do.
    ``size_limit`` is the byte limit announced with ``SIZE`` (and enforced); 0 or
    ``None``: no limit, and no ``SIZE``.
    ``chunking`` offers CHUNKING (RFC 3030: ``BDAT``), as Gmail, Microsoft 365 and
    Postfix do.
    """

    def __init__(
        self,
        mode: Mode | str = Mode.ACCEPT,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: TLSMode | None = None,
        certificates: TestCertificates | None = None,
        auth: Mapping[str, str] | None = None,
        refuse_recipients: Iterable[str] = (),
        reply_delay: float = 0.0,
        name: str = "",
        require_starttls: bool = False,
        on_message: Callable[[ReceivedMessage], None] | None = None,
        pipelining: bool = False,
        size_limit: int | None = DATA_SIZE_LIMIT,
        chunking: bool = False,
    ) -> None:
        if tls not in (None, "starttls", "implicit"):
            raise ValueError(f"tls must be None, 'starttls' or 'implicit', not {tls!r}")
        self._mode = Mode(mode)
        self.host = host
        self.port = port
        self.tls = tls
        self.name = name
        self.hostname = "mail.test"
        self.auth: Mapping[str, str] | None = dict(auth) if auth is not None else None
        self.refuse_recipients = refuse_recipients
        self.reply_delay = reply_delay
        #: Offer PIPELINING (RFC 2920) in the EHLO reply; aiosmtpd reads pipelined
        #: commands in order either way, it just does not say so by default.
        self.pipelining = pipelining
        self.size_limit = size_limit
        #: Offer CHUNKING (RFC 3030) and accept ``BDAT``, which aiosmtpd does not do itself.
        self.chunking = chunking
        self.require_starttls = require_starttls
        self.on_message = on_message
        self.certificates = certificates
        if tls is not None and certificates is None:
            self.certificates = default_certificates()

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._mode_lock = threading.Lock()
        self._messages: list[ReceivedMessage] = []
        # The first exception raised by on_message, until wait_for() or stop() raises it.
        self._callback_error: BaseException | None = None
        self._callback_error_raised = False
        self._sessions: set[FaultySMTP] = set()
        self.connections_total = 0
        self.peak_connections = 0

        self._runner: LoopThread | None = None
        self._listener: asyncio.Server | None = None
        self._tls_context: ssl.SSLContext | None = None
        self._listening_lock = asyncio.Lock()

    # -- configuration read by the sessions ----------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, value: Mode | str) -> None:
        new = Mode(value)
        with self._mode_lock:
            self._mode = new
            if self._runner is not None:
                # From another thread: returns once the port is (un)bound, so a connect
                # right after sees it. From on_message: right after the callback.
                self._on_loop(self._runner, self._sync_listening())

    @property
    def refuse_recipients(self) -> frozenset[str]:
        return self._refuse_recipients

    @refuse_recipients.setter
    def refuse_recipients(self, addresses: Iterable[str]) -> None:
        if isinstance(addresses, str):
            addresses = (addresses,)
        self._refuse_recipients = frozenset(address.lower() for address in addresses)

    def refuses(self, address: str) -> bool:
        listed = address.lower() in self._refuse_recipients
        if self._mode is Mode.RCPT_550:
            return listed or not self._refuse_recipients
        return listed

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> SMTPTestServer:
        """Bind the port and start serving. Returns ``self``."""
        if self._runner is not None:
            return self
        if self.tls is not None:
            self._tls_context = self._make_tls_context()
        # One per loop: a mode set from on_message (scheduled) and one set from the test
        # (waited for) may both be (un)binding the port at once.
        self._listening_lock = asyncio.Lock()
        self._runner = LoopThread(f"SMTPTestServer {self.name or self.port}")
        try:
            self._runner.call(self._listen())
            if self._mode is Mode.REFUSE:
                self._runner.call(self._sync_listening())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop listening, close every connection and the loop. Idempotent.

        Then raises the first exception of the ``on_message`` callback, unless
        ``wait_for()`` already did. Not from ``on_message``: the server's thread
        cannot wait for itself to end.
        """
        runner = self._runner
        if runner is not None and runner.in_loop_thread():
            raise RuntimeError(
                f"{self!r}: stop() cannot be called from on_message (the server's own "
                "thread); call it from the test, or use drop_connections() or mode='refuse'"
            )
        self._stop()
        with self._lock:
            error = self._take_callback_error()
        if error is not None:
            raise error

    def _stop(self) -> None:
        runner = self._runner
        if runner is None:
            return
        try:
            # _runner stays set meanwhile: a connection accepted before the listener is
            # closed still needs _new_session, and then gets closed by _shutdown.
            runner.call(self._shutdown())
        finally:
            self._runner = None
            runner.close()

    def __enter__(self) -> SMTPTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.stop()
        else:
            # The error leaving the block is the one to see; the callback's was logged.
            self._stop()

    def __repr__(self) -> str:
        return (
            f"<SMTPTestServer {self.name or '-'} {self.host}:{self.port} "
            f"mode={self._mode.value} tls={self.tls}>"
        )

    # -- messages ----------------------------------------------------------------------

    @property
    def messages(self) -> list[ReceivedMessage]:
        """A copy of the messages recorded so far, oldest first."""
        with self._lock:
            return list(self._messages)

    def clear(self) -> None:
        """Forget the recorded messages (connection counters are kept)."""
        with self._lock:
            self._messages.clear()

    def wait_for(self, count: int = 1, timeout: float = 5.0) -> list[ReceivedMessage]:
        """Block until at least ``count`` messages were recorded; return them all.

        Raises ``TimeoutError`` when they do not arrive within ``timeout`` seconds, and
        the first exception of the ``on_message`` callback when there was one.
        """
        with self._changed:
            arrived = self._changed.wait_for(
                lambda: len(self._messages) >= count or self._callback_error is not None,
                timeout,
            )
            error = self._take_callback_error()
            if error is not None:
                raise error
            if not arrived:
                raise TimeoutError(
                    f"{self!r} received {len(self._messages)} message(s), "
                    f"expected {count} within {timeout}s"
                )
            return list(self._messages)

    def record(self, message: ReceivedMessage) -> None:
        with self._changed:
            self._messages.append(message)
            self._changed.notify_all()
        if self.on_message is None:
            return
        try:
            self.on_message(message)
        except Exception as error:
            # The message is recorded: letting this reach aiosmtpd would answer 451 and
            # the client would send it again. Keep the error for the test's thread.
            log.exception("on_message callback of %r failed", self)
            with self._changed:
                if self._callback_error is None:
                    self._callback_error = error
                self._changed.notify_all()

    def _take_callback_error(self) -> BaseException | None:
        """The callback's first error, the first time it is asked for (lock held)."""
        if self._callback_error is None or self._callback_error_raised:
            return None
        self._callback_error_raised = True
        return self._callback_error

    # -- connections ---------------------------------------------------------------------

    @property
    def connections_open(self) -> int:
        with self._lock:
            return len(self._sessions)

    def session_opened(self, session: FaultySMTP) -> None:
        with self._lock:
            self._sessions.add(session)
            self.connections_total += 1
            self.peak_connections = max(self.peak_connections, len(self._sessions))
            self._changed.notify_all()

    def session_closed(self, session: FaultySMTP) -> None:
        with self._lock:
            self._sessions.discard(session)
            self._changed.notify_all()

    def wait_for_connections(self, count: int = 0, timeout: float = 5.0) -> None:
        """Block until exactly ``count`` connections are open (the server notices a
        client's close a moment after the client returns). Raises ``TimeoutError``.
        """
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._sessions) == count, timeout):
                raise TimeoutError(
                    f"{self!r} has {len(self._sessions)} open connection(s), "
                    f"expected {count} within {timeout}s"
                )

    def drop_connections(self) -> None:
        """Close every open client connection from the server side, now.

        Returns once the server has released them; the port keeps listening.
        From ``on_message``, they are closed right after the callback returns (after
        the reply to the message is sent).
        """
        if self._runner is not None:
            self._on_loop(self._runner, self._close_sessions())

    @staticmethod
    def _on_loop(runner: LoopThread, coroutine: Coroutine[Any, Any, None]) -> None:
        if runner.in_loop_thread():
            # Called from on_message: waiting would block the loop that must run it.
            runner.schedule(coroutine)
        else:
            runner.call(coroutine)

    # -- convenience -----------------------------------------------------------------------

    def provider_settings(self, **overrides: object) -> dict[str, object]:
        """A ``ROBUST_MAIL["PROVIDERS"]`` entry pointing at this server.

        Upper-case keys; ``overrides`` (e.g. ``TIMEOUT=1``) replace or add keys.
        """
        settings: dict[str, object] = {
            "NAME": self.name or f"test-{self.port}",
            "HOST": self.host,
            "PORT": self.port,
            "USE_TLS": self.tls == "starttls",
            "USE_SSL": self.tls == "implicit",
            "TIMEOUT": 5,
        }
        if self.certificates is not None:
            settings["SSL_CAFILE"] = self.certificates.ca_file
        if self.auth:
            username, password = next(iter(self.auth.items()))
            settings["USERNAME"], settings["PASSWORD"] = username, password
        settings.update(overrides)
        return settings

    # -- on the loop thread --------------------------------------------------------------

    def _make_tls_context(self) -> ssl.SSLContext:
        assert self.certificates is not None
        context = self.certificates.server_context()
        untrusted = self.certificates.untrusted_server_context()

        def choose_certificate(
            connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
        ) -> None:
            # Decided per handshake, so switching to untrusted_cert affects the
            # next TLS session, STARTTLS or implicit alike.
            if self._mode is Mode.UNTRUSTED_CERT:
                connection.context = untrusted

        context.sni_callback = choose_certificate
        return context

    def _new_session(self) -> FaultySMTP:
        # Called by the listener on the loop; asserting on _runner here made asyncio
        # drop the accepted socket unclosed when stop() had cleared it.
        offer_starttls = self.tls == "starttls" and self._mode is not Mode.NO_STARTTLS
        return FaultySMTP(
            self,
            loop=asyncio.get_running_loop(),
            tls_context=self._tls_context if offer_starttls else None,
            implicit_tls=self.tls == "implicit",
            require_starttls=offer_starttls and self.require_starttls,
        )

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            self._new_session,
            host=self.host,
            port=self.port,
            ssl=self._tls_context if self.tls == "implicit" else None,
            ssl_handshake_timeout=10.0 if self.tls == "implicit" else None,
            reuse_address=True,
        )
        if self.port == 0:
            self.port = self._listener.sockets[0].getsockname()[1]

    async def _sync_listening(self) -> None:
        async with self._listening_lock:
            await self._sync_listening_now()

    async def _sync_listening_now(self) -> None:
        if self._mode is Mode.REFUSE:
            await self._close_listener()
            # A server that is down does not keep serving old connections either.
            await self._close_sessions()
        elif self._listener is None:
            await self._listen()

    async def _close_sessions(self) -> None:
        # A connection accepted just before the listener closed becomes a session a few
        # loop steps later (accept task, then connection_made): one snapshot would miss
        # it. So let those steps run, and close again until none is left. The sleep
        # also lets connection_lost() run, so the sockets are closed on return.
        for _ in range(200):
            for _ in range(3):
                await asyncio.sleep(0)
            with self._lock:
                sessions = list(self._sessions)
            if not sessions:
                return
            for session in sessions:
                session.abort()
            await asyncio.sleep(0.005)

    async def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        # Stop accepting first, then let the accepts already taken become sessions:
        # Server.close() under an accept in flight makes asyncio fail it in
        # Server._attach() and leak the accepted socket (a ResourceWarning).
        loop = asyncio.get_running_loop()
        for sock in listener.sockets:
            loop.remove_reader(sock)
        for _ in range(3):
            await asyncio.sleep(0)
        listener.close()

    async def _shutdown(self) -> None:
        async with self._listening_lock:  # not under a mode change re-listening
            await self._close_listener()
            await self._close_sessions()
