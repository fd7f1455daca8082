"""One SMTP session of the test server: aiosmtpd's protocol with faults injected.

aiosmtpd does the SMTP work (parsing, ESMTP, STARTTLS, AUTH, DATA framing);
this subclass only decides, from the server's current ``Mode``, where to answer
differently, stay silent or hang up. The mode is read at each step, so changing
it affects sessions already open.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Mapping
from typing import Any, AnyStr, Protocol

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, TLSSetupException

from robust_mail.testing.modes import Mode
from robust_mail.testing.received import ReceivedMessage

log = logging.getLogger("robust_mail.testing")

# Room for a 20 MB attachment after base64 (x4/3) and MIME overhead.
DATA_SIZE_LIMIT = 40 * 1024 * 1024
DEFAULT_SLOW_DELAY = 1.0


class ServerState(Protocol):
    """What a session needs from the server that accepted it."""

    @property
    def mode(self) -> Mode: ...
    @property
    def auth(self) -> Mapping[str, str] | None: ...
    @property
    def reply_delay(self) -> float: ...
    @property
    def hostname(self) -> str: ...
    @property
    def pipelining(self) -> bool: ...
    @property
    def size_limit(self) -> int | None: ...
    @property
    def chunking(self) -> bool: ...
    def refuses(self, address: str) -> bool: ...
    def record(self, message: ReceivedMessage) -> None: ...
    def session_opened(self, session: FaultySMTP) -> None: ...
    def session_closed(self, session: FaultySMTP) -> None: ...


class _QuietSession(Session):
    """aiosmtpd's session without the deprecation log line on every AUTH.

    aiosmtpd itself assigns the deprecated ``login_data`` after a successful
    AUTH; the warning it logs would only be noise in test output.
    """

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class _Hooks:
    """aiosmtpd handler: forwards the hooks to the session, where the state is."""

    async def handle_EHLO(
        self,
        server: FaultySMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        # The five-argument hook replaces aiosmtpd's bookkeeping, so do it here.
        session.host_name = hostname
        return server.ehlo_responses(responses)

    async def handle_RCPT(
        self,
        server: FaultySMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        return server.rcpt_reply(envelope, address, rcpt_options)

    async def handle_DATA(self, server: FaultySMTP, session: Session, envelope: Envelope) -> str:
        return await server.data_reply(envelope)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # A client rejecting our certificate is a scenario under test, not a
            # server fault; aiosmtpd closes the connection after this reply.
            log.debug("TLS handshake failed: %r", error.__cause__)
            return "454 4.7.0 TLS handshake failed"
        log.exception("test SMTP server session failed")
        return f"451 4.3.0 Test server error: {type(error).__name__}"


class FaultySMTP(SMTP):
    """aiosmtpd's ``SMTP`` that consults ``state.mode`` at every step."""

    def __init__(
        self,
        state: ServerState,
        *,
        loop: asyncio.AbstractEventLoop,
        tls_context: ssl.SSLContext | None,
        implicit_tls: bool,
        require_starttls: bool,
    ) -> None:
        self.state = state
        self.implicit_tls = implicit_tls
        self._bdat_chunks: list[bytes] = []  # of the message being sent with BDAT
        super().__init__(
            _Hooks(),
            loop=loop,
            hostname=state.hostname,
            ident="robust_mail test server",
            data_size_limit=state.size_limit,
            enable_SMTPUTF8=True,
            tls_context=tls_context,
            require_starttls=require_starttls,
            # Tests on loopback authenticate over plain text too.
            auth_require_tls=False,
            authenticator=self._check_credentials,
        )
        # Set after __init__: passing auth_required=True with auth_require_tls=False
        # makes aiosmtpd emit a security warning on every connection; loopback tests
        # authenticating in clear is intended here.
        self._auth_required = state.auth is not None

    def _create_session(self) -> Session:
        return _QuietSession(self.loop)

    # -- connection life cycle -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called a second time after STARTTLS, with the TLS transport: count once.
        first = self._original_transport is None
        super().connection_made(transport)
        if first:
            self.state.session_opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            self.state.session_closed(self)

    def abort(self) -> None:
        """Close the connection from the server side now (no QUIT, no reply)."""
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]
        elif self._original_transport is not None:
            self._original_transport.abort()  # type: ignore[attr-defined]

    async def _hang_up(self) -> None:
        """Close the connection and park this session until aiosmtpd cancels it."""
        if self.transport is not None:
            self.transport.close()
        # connection_lost() cancels the session task, which ends the wait cleanly.
        await self.loop.create_future()

    @property
    def uses_tls(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None

    # -- replies -----------------------------------------------------------------

    async def push(self, status: AnyStr) -> None:
        if self.state.mode is Mode.SLOW:
            await asyncio.sleep(self.state.reply_delay or DEFAULT_SLOW_DELAY)
        await super().push(status)

    async def _handle_client(self) -> None:
        mode = self.state.mode
        if mode is Mode.BLACKHOLE:
            # Read and discard until the client gives up; never say a word.
            while await self._reader.read(65536):
                pass
            return
        if mode is Mode.GREETING_421:
            await self.push("421 4.3.2 Service not available, closing transmission channel")
            await self._hang_up()
            return
        await super()._handle_client()

    def ehlo_responses(self, responses: list[str]) -> list[str]:
        if not self._offers_auth():
            responses = [line for line in responses if not line[4:].startswith("AUTH")]
        if self.state.pipelining:
            responses = [*responses[:-1], "250-PIPELINING", responses[-1]]
        if self.state.chunking:
            responses = [*responses[:-1], "250-CHUNKING", responses[-1]]
        return responses

    def _offers_auth(self) -> bool:
        return self.state.auth is not None or self.state.mode is Mode.AUTH_535

    async def smtp_AUTH(self, arg: str) -> None:
        if not self._offers_auth():
            await self.push("502 5.5.1 AUTH not available")
            return
        await super().smtp_AUTH(arg)

    def _check_credentials(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        users = self.state.auth
        if self.state.mode is Mode.AUTH_535 or users is None:
            return AuthResult(success=False, handled=False)
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        if login in users and users[login] == password:
            return AuthResult(success=True, auth_data=login)
        return AuthResult(success=False, handled=False)

    async def smtp_MAIL(self, arg: str | None) -> None:
        if self.state.mode is Mode.MAIL_421 and self.session and self.session.host_name:
            await self.push("421 4.7.0 Try again later, closing connection")
            await self._hang_up()
            return
        await super().smtp_MAIL(arg)

    def rcpt_reply(self, envelope: Envelope, address: str, rcpt_options: list[str]) -> str:
        if self.state.refuses(address):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        # A hook that returns a status takes over aiosmtpd's bookkeeping.
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def smtp_DATA(self, arg: str) -> None:
        if self._bdat_chunks:
            # RFC 3030, 2: DATA and BDAT cannot share a transaction; the client must RSET.
            # Accepting it would record the DATA content and drop the chunks on the floor.
            await self.push("503 5.5.1 Error: DATA not allowed after BDAT in this transaction")
            return
        envelope = self.envelope
        if self.state.mode is Mode.DROP_MID_DATA and envelope and envelope.rcpt_tos:
            # Hang up when the client starts its data phase. Waiting for content
            # would not help a client see the drop "before the dot": a small
            # message is all in flight before the server could react, which
            # looks exactly like disconnect_after_data. Closing here is the
            # deterministic way to say "the message never got here".
            await self._hang_up()
            return
        await super().smtp_DATA(arg)

    async def smtp_BDAT(self, arg: str) -> None:
        """RFC 3030: ``BDAT <size> [LAST]`` then exactly ``size`` octets of the message.

        Once the command reaches this handler, the octets are read whatever the reply will
        be: they are the framing, so a refused chunk leaves the session in step. (aiosmtpd
        answers some commands before any handler sees them — 530 before STARTTLS when it
        is required — and then the chunk is not read.) The message is complete at ``LAST``
        and goes through the same hooks (and faults) as one sent with DATA.
        """
        if not self.state.chunking:
            await self.push('500 Error: command "BDAT" not recognized')
            return
        words = (arg or "").split()
        # Keywords are case-insensitive (RFC 5321, 2.4); isdigit() alone also takes
        # digits int() refuses, such as "²".
        if (
            not 1 <= len(words) <= 2
            or not (words[0].isascii() and words[0].isdigit())
            or [word.upper() for word in words[1:]] not in ([], ["LAST"])
        ):
            # The size is unknown, so the session cannot be kept in step: close it.
            await self.push("501 5.5.4 Syntax: BDAT <size> [LAST]")
            await self._hang_up()
            return
        size, last = int(words[0]), len(words) == 2
        envelope = self.envelope
        assert envelope is not None
        if self.state.mode is Mode.DROP_MID_DATA and envelope.rcpt_tos:
            await self._hang_up()  # as with DATA: the message never got here
            return
        try:
            chunk = await self._reader.readexactly(size)
        except asyncio.IncompleteReadError:
            await self._hang_up()  # the client went away mid-chunk
            return
        chunks = self._bdat_chunks
        if envelope.mail_from is None or (self._auth_required and not self._authenticated()):
            reply = "503 5.5.1 Error: need MAIL command"
        elif not envelope.rcpt_tos:
            reply = "554 5.5.1 Error: no valid recipients"
        # 0 or None is aiosmtpd's "no limit" (no SIZE announced): BDAT must agree with DATA.
        elif self.state.size_limit and sum(map(len, chunks)) + size > self.state.size_limit:
            reply = "552 5.3.4 Error: too much mail data"
        else:
            chunks.append(chunk)
            if not last:
                await self.push(f"250 2.0.0 {size} octets received")
                return
            envelope.content = envelope.original_content = b"".join(chunks)
            reply = await self.data_reply(envelope, chunked=True)
            self._set_post_data_state()
            await self.push(reply)
            return
        self._set_post_data_state()  # a refused chunk ends the transaction (RFC 3030, 2)
        await self.push(reply)

    def _set_post_data_state(self) -> None:
        # The chunks belong to the envelope: every way aiosmtpd or smtp_BDAT ends a
        # transaction (the end of DATA or BDAT LAST, a refused chunk, RSET, EHLO) comes
        # through here, so none can carry them into the next message.
        self._bdat_chunks.clear()
        super()._set_post_data_state()

    def _authenticated(self) -> bool:
        return bool(self.session and self.session.authenticated)

    async def data_reply(self, envelope: Envelope, *, chunked: bool = False) -> str:
        mode = self.state.mode
        if mode is Mode.DATA_451:
            return "451 4.3.0 Temporary failure, message not accepted"
        content = envelope.original_content or b""
        auth_user = self.session.auth_data if self.session and self.session.authenticated else None
        self.state.record(
            ReceivedMessage(
                mail_from=envelope.mail_from or "",
                rcpt_tos=list(envelope.rcpt_tos),
                data=bytes(content),
                tls=self.uses_tls,
                auth_user=auth_user if isinstance(auth_user, str) else None,
                chunked=chunked,
            )
        )
        if mode is Mode.DISCONNECT_AFTER_DATA:
            await self._hang_up()
        elif mode is Mode.STALL_AFTER_DATA:
            await self.loop.create_future()
        return "250 2.0.0 OK: message accepted"
