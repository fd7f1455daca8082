"""One SMTP session with one provider: resolve, connect, TLS, AUTH, and send.

The socket connects to an address from :class:`~robust_mail.resolver.Resolver`
(only A records when IPv4 is forced) while the *configured host name* (less a
trailing dot) is used for SNI and certificate verification, so IPv4 forcing needs
no patching of ``socket.getaddrinfo`` and never weakens TLS.

Every failure is raised as :class:`~robust_mail.exceptions.TransportError`
carrying the :class:`~robust_mail.exceptions.Step` it happened in;
``exceptions.classify()`` turns that into transient / provider-fatal /
message-fatal / ambiguous. Sending (the mail transactions, pipelining, runs of
messages) lives in :mod:`robust_mail.transactions`, the smtplib session under it in
:mod:`robust_mail.session`.

Every network operation is bounded by ``provider.timeout`` as a whole, not per
``recv``: a command, a whole reply (all its lines), a chunk of content, a connect, a
TLS handshake. A server dripping a byte at a time cannot stretch one. ``open()`` and
``send()`` also take an optional absolute ``deadline`` (a ``time.monotonic()``
value): each of those operations must then also end by it, and once the time is up
the session fails with :class:`DeadlineReached` instead of starting another step.
Logs go to ``robust_mail.transport``: provider, step and timing, never a password or
a message body.

Imports nothing from Django.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING

from robust_mail.exceptions import (  # DeadlineReached, CapabilityMissing: re-exported
    CapabilityMissing,
    DeadlineReached,
    ResolutionError,
    StartTLSUnavailable,
    Step,
    TransportError,
)
from robust_mail.session import Session, check_deadline
from robust_mail.tls import clear_tls_contexts, server_name, tls_context
from robust_mail.transactions import Transactions

if TYPE_CHECKING:
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

#: Steps of a mail transaction: a negative reply in one of them leaves the session
#: usable after RSET. A negative reply while opening ends the session.
_TRANSACTION = frozenset({Step.MAIL, Step.RCPT, Step.DATA, Step.DATA_END})

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


class SMTPConnection(Transactions):
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
        self._smtp: Session | None = None

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
            check_deadline(deadline)
            addresses = self.resolver.resolve(
                provider.host, ipv4_only=provider.force_ipv4, deadline=deadline
            )
            if not addresses:
                raise ResolutionError(provider.host, "no address to connect to")
        sock, address = self._connect(addresses, deadline)
        smtp = Session(local_hostname=self.local_hostname, timeout=provider.timeout)
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

    def _start_session(self, smtp: Session, context: ssl.SSLContext | None) -> None:
        """[implicit TLS] → greeting → EHLO → [STARTTLS → EHLO] → [AUTH]."""
        provider = self.provider
        if provider.use_ssl:
            assert context is not None
            with self._step(Step.CONNECT):
                smtp.attach(smtp.handshake(context, server_name(provider.host)))
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
                smtp.start_tls(context, server_name(provider.host))
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

    def _ehlo(self, smtp: Session) -> None:
        with self._step(Step.EHLO):
            code, reply = smtp.ehlo(self.local_hostname)
            if code != 250 and code != 421:
                # A pre-ESMTP server: fall back to HELO (no STARTTLS, AUTH or SIZE then).
                code, reply = smtp.helo(self.local_hostname)
            if code != 250:
                raise smtplib.SMTPHeloError(code, reply)

    def _login(self, smtp: Session) -> None:
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
        except Exception:
            # Interrupted while waiting for the reply (a task's time limit, say): it may
            # still come, out of step with the next command.
            self._abort()
            raise
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
        smtp = self._open_session(Step.RSET)
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
