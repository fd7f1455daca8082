"""One SMTP session with one provider: resolve, connect, TLS, AUTH, and send.

The socket connects to an address from :class:`~robust_mail.resolver.Resolver`
(only A records when IPv4 is forced) while the *configured host name* is used
for SNI and certificate verification, so IPv4 forcing needs no patching of
``socket.getaddrinfo`` and never weakens TLS.

Every failure is raised as :class:`~robust_mail.exceptions.TransportError`
carrying the :class:`~robust_mail.exceptions.Step` it happened in;
``exceptions.classify()`` turns that into transient / provider-fatal /
message-fatal / ambiguous. The DATA phase is driven here rather than by
``smtplib.sendmail`` so that a failure while the content is being sent
(``DATA``) is told apart from a failure while waiting for the reply to the
final dot (``DATA_END``), where the server may already have the message.

Every network operation is bounded by ``provider.timeout`` (the socket timeout,
which also covers TLS handshakes). ``open()`` and ``send()`` also take an optional
absolute ``deadline`` (a ``time.monotonic()`` value): before each command, reply,
chunk of content, connect and handshake the socket timeout is set to the smaller of
``provider.timeout`` and the time left, and once the time is up the session fails
with :class:`DeadlineReached` instead of starting another step. Logs go to
``robust_mail.transport``: provider, step and timing, never a password or a message
body.

Imports nothing from Django.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import IO, TYPE_CHECKING

from robust_mail import pipelining
from robust_mail.exceptions import (  # DeadlineReached, CapabilityMissing: re-exported
    CapabilityMissing,
    DeadlineReached,
    InvalidMessage,
    ResolutionError,
    StartTLSUnavailable,
    Step,
    TransportError,
)
from robust_mail.tls import clear_tls_contexts, tls_context

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from robust_mail.providers import ProviderConfig
    from robust_mail.resolver import Resolver

__all__ = [
    "CapabilityMissing",
    "DeadlineReached",
    "SMTPConnection",
    "clear_tls_contexts",
    "cut_by_deadline",
    "incapable",
    "tls_context",
]

logger = logging.getLogger("robust_mail.transport")

#: ``on_step(step, seconds, error_or_None)``.
StepObserver = Callable[[Step, float, BaseException | None], None]

#: The content is written in chunks so that the timeout bounds each chunk (a stalled
#: peer), not the whole transfer: a 20 MB message on a slow link is not a timeout.
_CHUNK = 64 * 1024

#: Steps of a mail transaction: a negative reply in one of them leaves the session
#: usable after RSET. A negative reply while opening ends the session.
_TRANSACTION = frozenset({Step.MAIL, Step.RCPT, Step.DATA, Step.DATA_END})

_LINE_END = re.compile(rb"\r\n|\r|\n")
_FORBIDDEN_IN_ADDRESS = ("\r", "\n", "\0", "<", ">")

#: Errors a network step can raise: OSError covers socket, ssl and smtplib errors;
#: ValueError covers encoding problems and smtplib's refusal of line breaks in commands.
_STEP_ERRORS = (OSError, ValueError)

#: A failure this close to the deadline, in a step whose timeout the deadline shortened,
#: is put down to the deadline (socket timeouts never fire early; this is rounding slack).
_DEADLINE_SLACK = 0.01


def incapable(exc: BaseException) -> bool:
    """Whether ``exc`` (a TransportError or its cause) says this provider can't take it."""
    cause = exc.cause if isinstance(exc, TransportError) else exc
    return isinstance(cause, CapabilityMissing)


def cut_by_deadline(exc: BaseException) -> bool:
    """Whether ``exc`` (a TransportError or its cause) failed only because time ran out."""
    cause = exc.cause if isinstance(exc, TransportError) else exc
    return isinstance(cause, DeadlineReached)


@functools.cache
def default_local_hostname() -> str:
    """The name sent in EHLO when none is given; looked up once per process."""
    name = socket.getfqdn()
    try:
        # EHLO takes an ASCII domain: a non-ASCII host name goes out as IDNA.
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        return "localhost"
    return name if name and " " not in name else "localhost"


class _ArmedReader:
    """The session's reader: re-arms the socket timeout before every line it reads.

    smtplib reads a multi-line reply (EHLO) line by line; arming once per reply would let
    a server dripping one line at a time stretch a single reply far past the deadline.
    An ``OSError`` from here (``DeadlineReached`` included) is reported by smtplib as a
    disconnect, which :meth:`SMTPConnection._blame` puts back down to the deadline.
    """

    def __init__(self, raw: IO[bytes], arm: Callable[[], None]) -> None:
        self._raw = raw
        self._arm = arm

    def readline(self, size: int = -1) -> bytes:
        self._arm()
        return self._raw.readline(size)

    def close(self) -> None:
        self._raw.close()


class _Session(smtplib.SMTP):
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


#: What sending one message ended with: the refused recipients, or the failure.
Outcome = dict[str, tuple[int, str]] | TransportError


@dataclass
class _Held:
    """A message whose content has been sent: what judging its final reply needs."""

    index: int
    recipients: list[str]
    refused: dict[str, tuple[int, str]]
    size: int
    started: float
    deadline: float | None = None
    outcome: Outcome | None = None

    def result(self) -> Outcome:
        assert self.outcome is not None, "judged when the next envelope was exchanged"
        return self.outcome


class SMTPConnection:
    """One SMTP session with one provider, used by one thread at a time.

    Call :meth:`open` (or use the object as a context manager), then :meth:`send` any
    number of messages, then :meth:`close`. Every failure raises
    :class:`~robust_mail.exceptions.TransportError`. After a failure, :attr:`reusable`
    says whether the session is still in a known state (a negative reply was followed
    by a successful RSET); if it is False the connection has already been closed.
    """

    def __init__(
        self,
        provider: ProviderConfig,
        *,
        resolver: Resolver,
        local_hostname: str | None = None,
        on_step: StepObserver | None = None,
    ) -> None:
        self.provider = provider
        self.resolver = resolver
        #: Called after every step with (step, seconds, exception or None); for health checks.
        self.on_step = on_step
        self.local_hostname = local_hostname or default_local_hostname()
        #: Messages accepted by the server on this connection since it was opened.
        self.messages_sent = 0
        #: False once a failure left the session in an unknown state (and closed it).
        self.reusable = False
        #: ``time.monotonic()`` when the session was opened / last sent a message.
        self.opened_at: float | None = None
        self.last_used: float | None = None
        #: The address the socket connected to, and whether the session is encrypted.
        self.address: str | None = None
        self.tls = False
        self._smtp: _Session | None = None

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        where = f"{self.provider.host}:{self.provider.port}"
        return f"<SMTPConnection {self.provider.name} {where} {state}>"

    def __enter__(self) -> SMTPConnection:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._smtp is not None and self._smtp.sock is not None

    # --- opening ------------------------------------------------------------------------

    def open(self, *, deadline: float | None = None) -> bool:
        """Open the session; return False if it was already open.

        resolve → connect (each address in turn) → [implicit TLS] → greeting → EHLO →
        [STARTTLS → EHLO] → [AUTH]. Raises :class:`TransportError`; nothing is left
        open on failure. ``deadline`` (absolute ``time.monotonic()``) bounds every step,
        resolution included: the cause is :class:`DeadlineReached` when it runs out after
        resolution (a lookup it cuts short is a transient :class:`ResolutionError`).
        """
        if self.is_open:
            return False
        provider = self.provider
        started = time.monotonic()
        context = self._context() if provider.use_ssl or provider.use_tls else None
        with self._step(Step.RESOLVE):
            # The resolver bounds each query by DNS TIMEOUT, or by the deadline if sooner.
            _check_deadline(deadline)
            addresses = self.resolver.resolve(
                provider.host, ipv4_only=provider.force_ipv4, deadline=deadline
            )
            if not addresses:
                raise ResolutionError(provider.host, "no address to connect to")
        sock, address = self._connect(addresses, deadline)
        smtp = _Session(local_hostname=self.local_hostname, timeout=provider.timeout)
        smtp.attach(sock)
        smtp.deadline = deadline
        self._smtp = smtp
        self.reusable, self.tls, self.address = False, False, address
        self.messages_sent = 0
        try:
            self._start_session(smtp, context)
        except BaseException:
            # Failed steps have settled the session already; anything else (a bug, a
            # KeyboardInterrupt) must not leave a half-open socket behind either.
            self.detach()
            raise
        finally:
            smtp.deadline = None
        self.reusable = True
        self.opened_at = self.last_used = time.monotonic()
        logger.info(
            "%s: connected to %s:%s (%s, tls=%s) in %.1f ms",
            provider.name,
            address,
            provider.port,
            provider.host,
            self.tls,
            (self.opened_at - started) * 1000,
        )
        return True

    def _start_session(self, smtp: _Session, context: ssl.SSLContext | None) -> None:
        """[implicit TLS] → greeting → EHLO → [STARTTLS → EHLO] → [AUTH]."""
        provider = self.provider
        if provider.use_ssl:
            assert context is not None
            with self._step(Step.CONNECT):
                assert smtp.sock is not None
                smtp.arm()  # the handshake inherits the socket's timeout
                smtp.attach(context.wrap_socket(smtp.sock, server_hostname=provider.host))
            self.tls = True
        with self._step(Step.GREETING):
            code, reply = smtp.getreply()
            if code != 220:
                raise smtplib.SMTPConnectError(code, reply)
        self._ehlo(smtp)
        if provider.use_tls and not provider.use_ssl:
            assert context is not None
            with self._step(Step.STARTTLS):
                if not smtp.has_extn("starttls"):
                    raise StartTLSUnavailable(
                        f"{provider.host} does not offer STARTTLS, which this provider "
                        "requires; nothing is sent in plain text"
                    )
                code, reply = smtp.docmd("STARTTLS")
                if code != 220:
                    raise smtplib.SMTPResponseException(code, reply)
                smtp.start_tls(context, provider.host)
            self.tls = True
            self._ehlo(smtp)
        if provider.username:
            with self._step(Step.AUTH):
                self._login(smtp)

    def _context(self) -> ssl.SSLContext:
        step = Step.CONNECT if self.provider.use_ssl else Step.STARTTLS
        try:
            return tls_context(self.provider)
        except ssl.SSLError as exc:
            raise TransportError(step, exc, provider=self.provider.name) from exc
        except (OSError, ValueError) as exc:
            # A missing or unreadable certificate file is this provider's configuration,
            # not a network hiccup: report it as a TLS failure (provider-fatal).
            error = ssl.SSLError(f"cannot load the TLS certificates: {exc}")
            raise TransportError(step, error, provider=self.provider.name) from exc

    def _connect(
        self, addresses: Sequence[str], deadline: float | None
    ) -> tuple[socket.socket, str]:
        provider = self.provider
        failures: list[tuple[str, OSError]] = []
        first = time.monotonic()
        out_of_time = False
        for address in addresses:
            started = time.monotonic()
            timeout = provider.timeout
            if deadline is not None:
                timeout = min(timeout, deadline - started)
                if timeout <= 0:
                    out_of_time = True
                    break
            try:
                sock = socket.create_connection((address, provider.port), timeout)
            except OSError as exc:
                failures.append((address, exc))
                logger.debug(
                    "%s: connect to %s:%s failed after %.1f ms: %s",
                    provider.name,
                    address,
                    provider.port,
                    (time.monotonic() - started) * 1000,
                    exc or type(exc).__name__,
                )
                if timeout < provider.timeout and time.monotonic() >= (
                    started + timeout - _DEADLINE_SLACK
                ):
                    out_of_time = True  # the deadline, not the provider, cut it short
                    break
                continue
            # Pipelined writes follow one another without waiting for a reply: Nagle's
            # algorithm would hold each back until the previous one was acknowledged.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            logger.debug(
                "%s: connect to %s:%s ok in %.1f ms",
                provider.name,
                address,
                provider.port,
                (time.monotonic() - started) * 1000,
            )
            if self.on_step is not None:
                self.on_step(Step.CONNECT, time.monotonic() - first, None)
            return sock, address
        detail = "; ".join(f"{a}: {e or type(e).__name__}" for a, e in failures)
        cause: OSError
        if out_of_time:
            cause = DeadlineReached(
                f"the delivery deadline was reached while connecting to {provider.host}"
                + (f" ({detail})" if detail else "")
            )
        elif len(failures) == 1:
            cause = failures[0][1]
        else:
            cause = OSError(f"no address of {provider.host} accepted a connection ({detail})")
        if failures and cause is not failures[-1][1]:
            cause.__cause__ = failures[-1][1]
        logger.info("%s: connect failed: %s", provider.name, cause or type(cause).__name__)
        if self.on_step is not None:
            self.on_step(Step.CONNECT, time.monotonic() - first, cause)
        raise TransportError(Step.CONNECT, cause, provider=provider.name) from cause

    def _ehlo(self, smtp: _Session) -> None:
        with self._step(Step.EHLO):
            code, reply = smtp.ehlo(self.local_hostname)
            if code != 250 and code != 421:
                # A pre-ESMTP server: fall back to HELO (no STARTTLS, AUTH or SIZE then).
                code, reply = smtp.helo(self.local_hostname)
            if code != 250:
                raise smtplib.SMTPHeloError(code, reply)

    def _login(self, smtp: _Session) -> None:
        provider = self.provider
        if not smtp.has_extn("auth"):
            raise smtplib.SMTPNotSupportedError(
                f"{provider.host} does not offer AUTH, but a username is configured"
            )
        try:
            smtp.login(provider.username, provider.password)
        except UnicodeError:
            # smtplib sends credentials as ASCII; the message must not echo them.
            raise smtplib.SMTPNotSupportedError(
                "the username or password is not ASCII, which SMTP AUTH cannot send"
            ) from None
        except (smtplib.SMTPResponseException, smtplib.SMTPServerDisconnected):
            raise
        except smtplib.SMTPException as exc:
            # "No suitable authentication method": the server and we share no mechanism.
            raise smtplib.SMTPNotSupportedError(str(exc)) from exc

    # --- sending ------------------------------------------------------------------------

    def send(
        self,
        from_addr: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        deadline: float | None = None,
    ) -> dict[str, tuple[int, str]]:
        """Send one message; return the refused recipients as ``{address: (code, reply)}``.

        ``data`` is the message as bytes; line endings are normalised to CRLF and lines
        starting with a dot are escaped here. An empty result means every recipient was
        accepted. Raises :class:`TransportError` when no recipient was accepted
        (``step=RCPT``, ``refused`` filled in) or any step failed. Addresses that cannot
        be sent (line breaks, non-ASCII without SMTPUTF8) fail before any traffic.
        ``deadline`` (absolute ``time.monotonic()``) bounds every network operation; a
        send called after it fails at MAIL before any traffic and keeps the connection.
        """
        smtp = self._smtp
        if smtp is None or smtp.sock is None:
            raise TransportError(
                Step.MAIL,
                smtplib.SMTPServerDisconnected("the connection is not open"),
                provider=self.provider.name,
            )
        recipients = list(recipients)
        options = self._mail_options(smtp, from_addr, recipients, data)
        wire = _wire_data(data)
        try:
            _check_deadline(deadline)
        except DeadlineReached as exc:
            raise TransportError(Step.MAIL, exc, provider=self.provider.name) from exc
        smtp.deadline = deadline
        try:
            refused = self._transaction(smtp, from_addr, recipients, data, wire, options)
            return self._send_the_rest(smtp, from_addr, recipients, refused, data, wire, options)
        finally:
            smtp.deadline = None

    def send_many(
        self,
        messages: Sequence[tuple[str, Sequence[str], bytes]],
        *,
        budget: float | None = None,
        proceed: Callable[[], bool] | None = None,
        on_outcome: Callable[[int, Outcome], None] | None = None,
    ) -> list[Outcome | None]:
        """Send ``(from_addr, recipients, data)`` messages in turn; one outcome for each.

        Each outcome is what :meth:`send` would have returned (the refused recipients) or
        raised (a :class:`TransportError`), or None for a message not attempted because
        the session closed (after an earlier failure) or ``proceed()`` returned False
        before its turn: nothing of it was sent. ``budget``: seconds each message may
        take from its turn on, as ``deadline`` bounds :meth:`send`. ``on_outcome(index,
        outcome)`` is called as soon as each outcome is known.

        With PIPELINING, the reply to each message's final dot is read after the next
        message's envelope is written: one round trip per message instead of two (see
        :mod:`robust_mail.pipelining`).
        """
        outcomes: list[Outcome | None] = [None] * len(messages)
        unreported: list[int] = []

        def settle(index: int, outcome: Outcome) -> None:
            outcomes[index] = outcome
            unreported.append(index)

        def report() -> None:
            # Called while a pipelined write is on its way: the caller's work on earlier
            # outcomes (recording them) overlaps the round trip instead of delaying it.
            while unreported and on_outcome is not None:
                index = unreported.pop(0)
                on_outcome(index, outcomes[index])  # type: ignore[arg-type]

        smtp = self._smtp
        held: _Held | None = None
        try:
            for index, (from_addr, recipients, data) in enumerate(messages):
                if smtp is None or smtp.sock is None or self._smtp is None:
                    break
                if held is None:
                    report()  # no pipelined write to overlap with: report now
                if proceed is not None and not proceed():
                    break
                started = time.monotonic()
                deadline = None if budget is None else started + budget
                try:
                    recipients = list(recipients)
                    options = self._mail_options(smtp, from_addr, recipients, data)
                except TransportError as exc:
                    settle(index, exc)
                    continue
                wire = _wire_data(data)
                chained = (
                    smtp.has_extn("pipelining") and len(recipients) <= pipelining.MAX_RECIPIENTS
                )
                if held is not None and not chained:
                    settle(held.index, self._end_held(smtp, held))
                    held = None
                    if not self.is_open:
                        break
                sent = _Held(index, recipients, {}, len(data), started, deadline)
                # The previous message's final reply is read under its own deadline.
                smtp.deadline = held.deadline if held is not None else deadline
                try:
                    sent.refused = self._start_transaction(
                        smtp,
                        from_addr,
                        recipients,
                        data,
                        wire,
                        options,
                        held=held,
                        sent=sent,
                        budget=budget,
                        idle=report,
                    )
                except TransportError as exc:
                    if held is not None:
                        settle(held.index, held.result())
                        held = None
                    settle(index, exc)
                    continue
                if held is not None:
                    settle(held.index, held.result())
                    held = None
                if chained and not any(400 <= code < 500 for code, _ in sent.refused.values()):
                    held = sent
                    continue
                # Recipients put off with a 4xx get another transaction after this one ends.
                try:
                    self._end_transaction(smtp, sent)
                    rest = self._send_the_rest(
                        smtp, from_addr, recipients, sent.refused, data, wire, options
                    )
                except TransportError as exc:
                    settle(index, exc)
                else:
                    settle(index, rest)
            if held is not None and smtp is not None:
                smtp.deadline = held.deadline
                settle(held.index, self._end_held(smtp, held))
        except Exception:
            # Not a failure of the session (those are outcomes): whatever broke, replies
            # may be owed on it, so it must not be used again.
            self._abort()
            raise
        finally:
            if smtp is not None:
                smtp.deadline = None
        report()
        return outcomes

    def _end_held(self, smtp: _Session, held: _Held) -> Outcome:
        try:
            return self._end_transaction(smtp, held)
        except TransportError as exc:
            return exc

    def _send_the_rest(
        self,
        smtp: _Session,
        from_addr: str,
        recipients: list[str],
        refused: dict[str, tuple[int, str]],
        data: bytes,
        wire: bytes,
        options: list[str],
    ) -> dict[str, tuple[int, str]]:
        """Recipients put off with a 4xx while others were accepted: another transaction.

        RFC 5321 4.5.3.1.10: a server that limits the recipients of one transaction answers
        ``452`` to those over the limit, and the client sends them in a new transaction.
        Repeated while each transaction gets at least one more recipient accepted; the
        message has been delivered to some already, so nothing here raises — whoever is
        still put off (or lost with a failed transaction) is reported refused.
        """
        while self.is_open and self.reusable:
            later = [r for r in recipients if r in refused and 400 <= refused[r][0] < 500]
            if not later:
                break
            logger.info(
                "%s: %d recipients put off (%s); sending them in another transaction",
                self.provider.name,
                len(later),
                refused[later[0]][0],
            )
            try:
                again = self._transaction(smtp, from_addr, later, data, wire, options)
            except TransportError as exc:
                if exc.step is Step.RCPT and exc.refused:
                    refused.update(exc.refused)  # no progress: they stay refused
                else:
                    for recipient in later:
                        refused[recipient] = (
                            exc.code or 451,
                            f"another transaction for this recipient failed: {exc.detail}",
                        )
                break
            for recipient in later:
                if recipient in again:
                    refused[recipient] = again[recipient]
                else:
                    del refused[recipient]
            recipients = later
        return refused

    def _transaction(
        self,
        smtp: _Session,
        from_addr: str,
        recipients: list[str],
        data: bytes,
        wire: bytes,
        options: list[str],
    ) -> dict[str, tuple[int, str]]:
        """MAIL → RCPT… → DATA → content → final dot, on an open session."""
        started = time.monotonic()
        refused = self._start_transaction(smtp, from_addr, recipients, data, wire, options)
        return self._end_transaction(smtp, _Held(-1, recipients, refused, len(data), started))

    def _start_transaction(
        self,
        smtp: _Session,
        from_addr: str,
        recipients: list[str],
        data: bytes,
        wire: bytes,
        options: list[str],
        *,
        held: _Held | None = None,
        sent: _Held | None = None,
        budget: float | None = None,
        idle: Callable[[], None] | None = None,
    ) -> dict[str, tuple[int, str]]:
        """MAIL → RCPT… → DATA → content; the refused recipients. The final reply is left.

        With a server offering PIPELINING the envelope goes out in one write
        (:mod:`robust_mail.pipelining`); its replies are then judged below one by one,
        as on the sequential path. A broken connection during that exchange is a
        failure at MAIL: no content has been sent. ``held``: a message whose final reply
        is still owed (pipelining only); it is read after this envelope is written, and
        its outcome put in ``held.outcome`` whatever happens here. Only then does the
        ``budget`` of this message (``sent``) start: until that reply came, the server was
        busy with the previous message, not with this one.
        """
        early: pipelining.Replies | None = None
        if held is not None or (
            smtp.has_extn("pipelining") and len(recipients) <= pipelining.MAX_RECIPIENTS
        ):
            try:
                with self._step(Step.MAIL):
                    early = pipelining.exchange(
                        smtp,
                        from_addr,
                        recipients,
                        options,
                        before=int(held is not None),
                        idle=idle,
                    )
            except TransportError as exc:
                if held is not None:  # the envelope could not be written: nor read the reply
                    held.outcome = self._held_outcome(smtp, held, None, exc.cause)
                raise
            if held is not None:
                final = early.before[0] if early.before else None
                held.outcome = self._held_outcome(smtp, held, final, early.error)
                if sent is not None and budget is not None:
                    sent.deadline = time.monotonic() + budget
                smtp.deadline = sent.deadline if sent is not None else None

        try:
            with self._step(Step.MAIL):
                code, reply = early.mail() if early else smtp.mail(from_addr, options)
                if code != 250:
                    raise smtplib.SMTPSenderRefused(code, reply, from_addr)
        except TransportError as exc:
            if exc.code != 552:
                raise
            # "Exceeded storage allocation" at MAIL: too big for this provider's limit
            # (the session was reset by RSET and stays usable); another may take it.
            too_big = CapabilityMissing(
                f"{self.provider.host} refused a message of {len(data)} bytes at MAIL"
            )
            raise TransportError(
                Step.MAIL, too_big, provider=self.provider.name, code=exc.code, reply=exc.reply
            ) from exc

        refused: dict[str, tuple[int, str]] = {}
        with self._step(Step.RCPT):
            for index, recipient in enumerate(recipients):
                code, reply = early.rcpt(index) if early else smtp.rcpt(recipient)
                if code == 421:
                    # The server is closing the session: no point asking about the rest.
                    raise smtplib.SMTPResponseException(code, reply)
                if code not in (250, 251):
                    refused[recipient] = (code, _text(reply))
        if len(refused) == len(recipients):
            self._recover(Step.RCPT)
            logger.info("%s: every recipient refused", self.provider.name)
            cause = smtplib.SMTPRecipientsRefused(dict(refused))  # type: ignore[arg-type]
            raise TransportError(Step.RCPT, cause, provider=self.provider.name, refused=refused)

        with self._step(Step.DATA):
            if early:
                code, reply = early.data()
            else:
                smtp.putcmd("data")
                code, reply = smtp.getreply()
            if code != 354:
                raise smtplib.SMTPDataError(code, reply)
            sock = smtp.sock
            assert sock is not None
            view = memoryview(wire)
            try:
                for offset in range(0, len(view), _CHUNK):
                    smtp.arm()
                    sock.sendall(view[offset : offset + _CHUNK])
            except ssl.SSLError as exc:
                # A TLS error after the handshake is a broken connection, not a TLS policy
                # failure: report it as the disconnect it is.
                raise smtplib.SMTPServerDisconnected(f"connection broken: {exc}") from exc
        return refused

    def _end_transaction(self, smtp: _Session, sent: _Held) -> dict[str, tuple[int, str]]:
        """Read the reply to the final dot of ``sent``; its refused recipients if 250."""
        with self._step(Step.DATA_END):
            code, reply = smtp.getreply()
            if code != 250:
                raise smtplib.SMTPDataError(code, reply)
        self._accepted(smtp, sent)
        return sent.refused

    def _held_outcome(
        self,
        smtp: _Session,
        held: _Held,
        reply: tuple[int, bytes] | None,
        error: BaseException | None,
    ) -> Outcome:
        """Judge the final reply of ``held``, read while the next envelope was in flight.

        As :meth:`_end_transaction` would, except that nothing is sent afterwards (no RSET:
        the transaction is over either way and the next one is already under way).
        """
        if reply is not None and reply[0] == 250:
            self._accepted(smtp, held)
            return held.refused
        cause: BaseException
        if reply is not None:
            cause = smtplib.SMTPDataError(*reply)
        else:
            assert error is not None
            cause = self._blame(Step.DATA_END, error)
        logger.info("%s: %s failed: %s", self.provider.name, Step.DATA_END, cause)
        return TransportError(Step.DATA_END, cause, provider=self.provider.name)

    def _accepted(self, smtp: _Session, sent: _Held) -> None:
        smtp.command_encoding = "ascii"  # SMTPUTF8 lasts one transaction
        self.messages_sent += 1
        self.last_used = time.monotonic()
        logger.debug(
            "%s: message of %d bytes accepted for %d of %d recipients in %.1f ms",
            self.provider.name,
            sent.size,
            len(sent.recipients) - len(sent.refused),
            len(sent.recipients),
            (self.last_used - sent.started) * 1000,
        )

    def _mail_options(
        self, smtp: _Session, from_addr: str, recipients: list[str], data: bytes
    ) -> list[str]:
        """Check the envelope before any traffic and return the MAIL FROM parameters."""
        if not isinstance(data, bytes | bytearray):
            raise TransportError(
                Step.DATA,
                InvalidMessage(f"message data must be bytes, not {type(data).__name__}"),
                provider=self.provider.name,
            )
        if not recipients:
            raise TransportError(
                Step.RCPT, InvalidMessage("no recipients"), provider=self.provider.name
            )
        _check_address(from_addr, Step.MAIL, self.provider.name, allow_empty=True)
        for recipient in recipients:
            _check_address(recipient, Step.RCPT, self.provider.name)
        options: list[str] = []
        if smtp.has_extn("size"):
            limit = _size_limit(smtp.esmtp_features.get("size", ""))
            if limit and len(data) > limit:
                raise TransportError(
                    Step.MAIL,
                    CapabilityMissing(
                        f"the message of {len(data)} bytes is larger than the "
                        f"{limit}-byte limit of {self.provider.host}"
                    ),
                    provider=self.provider.name,
                )
            options.append(f"SIZE={len(data)}")
        if smtp.has_extn("8bitmime") and not data.isascii():
            options.append("BODY=8BITMIME")
        if not all(a.isascii() for a in (from_addr, *recipients)):
            if not smtp.has_extn("smtputf8"):
                raise TransportError(
                    Step.MAIL,
                    CapabilityMissing(
                        f"{self.provider.host} does not support SMTPUTF8, "
                        "needed for a non-ASCII address"
                    ),
                    provider=self.provider.name,
                )
            options.append("SMTPUTF8")
        return options

    # --- session upkeep -----------------------------------------------------------------

    def noop(self, *, deadline: float | None = None) -> bool:
        """True when the server answers NOOP with 250; otherwise close quietly and return False.

        ``deadline`` (absolute ``time.monotonic()``) bounds the wait like in :meth:`send`.
        """
        smtp = self._smtp
        if smtp is None or smtp.sock is None:
            return False
        smtp.deadline = deadline
        try:
            code, _ = smtp.noop()
        except _STEP_ERRORS as exc:
            logger.debug("%s: NOOP failed: %s", self.provider.name, exc)
            code = -1
        finally:
            smtp.deadline = None
        if code == 250:
            return True
        self._abort()
        return False

    def reset(self) -> None:
        """Abort the current mail transaction with RSET.

        Raises :class:`TransportError` (``step=RSET``) and closes the connection when the
        server does not answer 250.
        """
        smtp = self._smtp
        if smtp is None or smtp.sock is None:
            raise TransportError(
                Step.RSET,
                smtplib.SMTPServerDisconnected("the connection is not open"),
                provider=self.provider.name,
            )
        with self._step(Step.RSET):
            code, reply = smtp.rset()
            if code != 250:
                raise smtplib.SMTPResponseException(code, reply)

    def close(self, *, timeout: float | None = None) -> None:
        """Send QUIT if the session is healthy, then close the socket. Never raises.

        ``timeout`` bounds the wait for the reply to QUIT when it is shorter than the
        provider's (e.g. at interpreter exit, where a hung server must not hold us up).
        """
        smtp, self._smtp = self._smtp, None
        reusable, self.reusable = self.reusable, False
        if smtp is None:
            return
        if timeout is not None:
            smtp.deadline = time.monotonic() + timeout
        try:
            if reusable and smtp.sock is not None:
                with contextlib.suppress(Exception):
                    smtp.quit()
        finally:
            with contextlib.suppress(Exception):
                smtp.close()

    def detach(self) -> None:
        """Close this process's socket without sending anything (not even QUIT).

        For a connection inherited across ``fork()``: the parent still owns the session, so
        the child must neither talk on it nor shut it down. Never raises.
        """
        self.reusable = False
        self.close()

    def _abort(self) -> None:
        """Drop the connection without QUIT: its state is unknown."""
        self.detach()

    def _recover(self, step: Step) -> None:
        """After a negative reply in a transaction: RSET so the session can be reused."""
        smtp = self._smtp
        if smtp is None or smtp.sock is None:
            self._abort()
            return
        try:
            code, _ = smtp.rset()
        except _STEP_ERRORS:
            code = -1
        if code == 250:
            self.reusable = True
        else:
            logger.debug("%s: RSET after %s failed; closing", self.provider.name, step)
            self._abort()

    @contextlib.contextmanager
    def _step(self, step: Step) -> Iterator[None]:
        """Time one step; turn any failure into a TransportError and settle the session."""
        started = time.monotonic()
        try:
            yield
        except TransportError:
            raise
        except _STEP_ERRORS as exc:
            elapsed = (time.monotonic() - started) * 1000
            cause = self._blame(step, exc)
            self._settle(step, cause)
            if self.on_step is not None:
                self.on_step(step, elapsed / 1000, cause)
            logger.info(
                "%s: %s failed after %.1f ms: %s",
                self.provider.name,
                step,
                elapsed,
                cause or type(cause).__name__,
            )
            raise TransportError(step, cause, provider=self.provider.name) from exc
        elapsed = time.monotonic() - started
        if self.on_step is not None:
            self.on_step(step, elapsed, None)
        logger.debug("%s: %s ok in %.1f ms", self.provider.name, step, elapsed * 1000)

    def _blame(self, step: Step, exc: BaseException) -> BaseException:
        """``exc``, or :class:`DeadlineReached` when the deadline cut this step short.

        A read that timed out (smtplib reports it as a disconnect) after the deadline
        shortened its timeout says nothing about the provider: report it as ours.
        """
        smtp = self._smtp
        if isinstance(exc, DeadlineReached) or smtp is None or not isinstance(exc, OSError):
            return exc
        if not smtp.cut_short or smtp.deadline is None:
            return exc
        if time.monotonic() < smtp.deadline - _DEADLINE_SLACK:
            return exc
        blamed = DeadlineReached(f"the delivery deadline was reached during {step}")
        blamed.__cause__ = exc
        return blamed

    def _settle(self, step: Step, exc: BaseException) -> None:
        """Leave the session reusable after a clean negative reply, closed otherwise."""
        smtp = self._smtp
        intact = (
            smtp is not None
            and smtp.sock is not None
            and (
                isinstance(exc, smtplib.SMTPNotSupportedError)
                or (
                    isinstance(exc, smtplib.SMTPResponseException)
                    and exc.smtp_code not in (421, -1)
                )
            )
        )
        if not intact:
            self._abort()
        elif step in _TRANSACTION:
            self._recover(step)
        else:
            # A failure while opening: the session is fine but useless. Say goodbye.
            self.reusable = True
            self.close()


def _size_limit(value: str) -> int:
    """The byte limit an EHLO ``SIZE`` keyword announces; 0 when none (RFC 1870)."""
    try:
        return max(0, int(value.split()[0])) if value.strip() else 0
    except ValueError:
        return 0


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineReached("the delivery deadline was reached")


def _check_address(address: str, step: Step, provider: str, *, allow_empty: bool = False) -> None:
    if not isinstance(address, str) or (not address and not allow_empty):
        raise TransportError(
            step, InvalidMessage(f"invalid address {address!r}"), provider=provider
        )
    if any(c in address for c in _FORBIDDEN_IN_ADDRESS):
        raise TransportError(
            step,
            InvalidMessage(f"invalid address {address!r}: line breaks and <> are not allowed"),
            provider=provider,
        )


def _wire_data(data: bytes) -> bytes:
    """The message as sent after DATA: CRLF line endings, dot-stuffed, ending in CRLF.CRLF."""
    body = bytes(data)
    crlf = body.count(b"\r\n")
    if body.count(b"\n") != crlf or body.count(b"\r") != crlf:
        body = _LINE_END.sub(b"\r\n", body)
    # RFC 5321 4.5.2: a line starting with "." gets another one, so no line is a lone ".".
    if body.startswith(b"."):
        body = b"." + body
    body = body.replace(b"\r\n.", b"\r\n..")
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"


def _text(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
