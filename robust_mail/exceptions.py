"""The error tree and the one function that classifies delivery failures.

This module imports nothing from Django so that the transport, pool and
policy layers (and their tests) can use it as plain Python.

``classify(exc)`` is the single place that decides what a failure means; the
dispatcher, the outbox and the breakers act on its answer and never inspect
exceptions themselves.
"""

from __future__ import annotations

import enum
import re
import smtplib
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass


class Classification(enum.StrEnum):
    """What a failure means for the message and for the provider."""

    #: Worth retrying here, then elsewhere; counts against the provider's breaker.
    TRANSIENT = "transient"
    #: This provider cannot send for us (auth, TLS, policy): no retry, open its breaker,
    #: try the next provider.
    PROVIDER_FATAL = "provider_fatal"
    #: No provider will accept this message as it is: no retry, no failover.
    MESSAGE_FATAL = "message_fatal"
    #: The server may have accepted the message (timeout or disconnect after the final
    #: ``.`` of DATA): retried only with the same Message-ID, and counted.
    AMBIGUOUS = "ambiguous"


Transient = Classification.TRANSIENT
ProviderFatal = Classification.PROVIDER_FATAL
MessageFatal = Classification.MESSAGE_FATAL
Ambiguous = Classification.AMBIGUOUS


class Step(enum.StrEnum):
    """The step of an SMTP session in which a failure happened."""

    RESOLVE = "resolve"
    CONNECT = "connect"
    GREETING = "greeting"
    EHLO = "ehlo"
    STARTTLS = "starttls"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    #: The DATA command and the message content, before the final ``.``.
    DATA = "data"
    #: Waiting for the reply to the final ``.``: the server may already have the message.
    DATA_END = "data_end"
    RSET = "rset"
    NOOP = "noop"
    BUILD = "build"


class RobustMailError(Exception):
    """Base class of every error robust_mail raises."""


class InvalidMessage(RobustMailError, ValueError):
    """The message cannot be sent as built (bad address, header injection, no recipients).

    Raised before any network traffic, so nothing is ever half-sent.
    """


class ResolutionError(RobustMailError, OSError):
    """A provider's host name could not be resolved to an address."""

    def __init__(self, host: str, reason: str, *, permanent: bool = False) -> None:
        super().__init__(f"cannot resolve {host!r}: {reason}")
        self.host = host
        self.reason = reason
        #: True for NXDOMAIN / no such record: retrying soon will not help.
        self.permanent = permanent


class StartTLSUnavailable(RobustMailError, smtplib.SMTPNotSupportedError):
    """The provider requires STARTTLS but the server did not offer it."""


class ProviderMisconfigured(RobustMailError):
    """This provider cannot work as configured (a MAILER alias that cannot be built).

    Always provider-fatal: retrying it cannot help, but another provider may work.
    """


class DeadlineReached(RobustMailError, TimeoutError):
    """The caller's delivery deadline ran out before or during a step.

    A ``TimeoutError``, so it classifies like any timeout: transient before the final dot
    of DATA, ambiguous while waiting for its reply. It says the *caller* ran out of time,
    not that the provider took longer than its own ``timeout``.
    """


class CapabilityMissing(InvalidMessage):
    """This provider cannot take this message, though another may.

    The server lacks something this message needs: SMTPUTF8 for a non-ASCII address, or a
    size limit (its ``SIZE``, or a ``552`` at MAIL) below the message's size. Classified
    like any :class:`InvalidMessage` (message-fatal: retrying here is pointless), but the
    dispatcher tries the next provider instead of failing the message, and does not hold
    it against this provider's breaker. Raised before any of the message is sent; the
    connection stays usable.
    """


class TransportError(RobustMailError):
    """One SMTP step failed at one provider.

    ``cause`` is the underlying exception (``smtplib``, ``ssl``, ``OSError`` ...);
    ``code`` and ``reply`` are the server's answer when there was one.
    """

    def __init__(
        self,
        step: Step,
        cause: BaseException,
        *,
        provider: str = "",
        code: int | None = None,
        reply: str = "",
        refused: Mapping[str, tuple[int, str]] | None = None,
        collateral: bool = False,
    ) -> None:
        self.step = step
        self.cause = cause
        self.provider = provider
        #: For RCPT failures: every refused recipient with its code and reply.
        self.refused = dict(refused or {}) or _refused_of(cause)
        # Every recipient refused: one refusal stands for the failure's code, as a server's
        # reply does for any other step — a temporary one if any (the failure is then
        # classified transient, and its code must not say 5xx).
        replies = list(self.refused.values())
        first = next((r for r in replies if 400 <= r[0] < 500), replies[0] if replies else None)
        self.code = code if code is not None else _code_of(cause) or (first and first[0])
        self.reply = reply or _reply_of(cause) or (first[1] if first else "")
        #: This message failed only because an earlier one of the same run lost the
        #: connection (messages in flight with BDAT): one failure of the provider, which
        #: that earlier message already counts for its breaker.
        self.collateral = collateral
        super().__init__(str(self))

    @property
    def detail(self) -> str:
        """What failed, without the provider's name."""
        answer = f" ({self.code} {self.reply})" if self.code else ""
        if not answer and not isinstance(self.cause, smtplib.SMTPResponseException):
            answer = f" ({type(self.cause).__name__}: {self.cause})"
        return f"{self.step.value} failed{answer}"

    def __str__(self) -> str:
        return f"{self.provider}: {self.detail}" if self.provider else self.detail


@dataclass(frozen=True)
class ProviderError:
    """What went wrong at one provider while delivering one message."""

    provider: str
    classification: Classification
    step: str
    message: str
    code: int | None = None
    attempts: int = 1

    def __str__(self) -> str:
        if self.step == "skipped":
            return f"{self.provider}: skipped ({self.message})"
        tries = f" after {self.attempts} attempts" if self.attempts > 1 else ""
        return f"{self.provider}: {self.classification.value} at {self.step}{tries}: {self.message}"


class DeliveryFailed(RobustMailError, smtplib.SMTPException):
    """No provider accepted the message, and no fallback took it.

    ``errors`` holds one :class:`ProviderError` per provider tried (or skipped). A
    subclass of :class:`smtplib.SMTPException`, so code written for Django's SMTP
    backend (``except (SMTPException, OSError)``) still catches it.
    """

    def __init__(
        self,
        message: str,
        errors: list[ProviderError] | tuple[ProviderError, ...] = (),
        *,
        classification: Classification | None = None,
    ) -> None:
        self.errors = tuple(errors)
        self.classification = classification
        #: The DeliveryResult, when the failure comes from a delivery attempt.
        self.result: object | None = None
        detail = "; ".join(str(e) for e in self.errors)
        super().__init__(f"{message}: {detail}" if detail else message)


class RateLimited(RobustMailError):
    """A rate limit refused the request; ``retry_after`` is in seconds."""

    def __init__(self, message: str = "rate limit exceeded", *, retry_after: float = 0.0) -> None:
        self.retry_after = max(0.0, float(retry_after))
        super().__init__(f"{message}; retry after {self.retry_after:.0f}s")


# --- classification -------------------------------------------------------------------

_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")

#: Steps in which a TLS handshake happens (implicit TLS during CONNECT); None: unknown.
_HANDSHAKE = frozenset({None, Step.CONNECT, Step.GREETING, Step.STARTTLS})
#: Steps where the message itself is being built or sent; None is a bare exception raised
#: outside a session (building the message before any connection).
_MESSAGE_STEPS = frozenset({None, Step.BUILD, Step.MAIL, Step.RCPT, Step.DATA, Step.DATA_END})


def enhanced_status(reply: str) -> tuple[int, int, int] | None:
    """The RFC 3463 enhanced status code in a reply text (``"5.1.1 no such user"``)."""
    match = _ENHANCED.search(reply)
    if match is None:
        return None
    cls, subject, detail = (int(g) for g in match.groups())
    return cls, subject, detail


def _code_of(exc: BaseException) -> int | None:
    if isinstance(exc, smtplib.SMTPResponseException):
        return int(exc.smtp_code)
    return None


def _reply_of(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPResponseException):
        error = exc.smtp_error
        return error.decode("utf-8", "replace") if isinstance(error, bytes) else str(error)
    return ""


def _classify_reply(step: Step, code: int, reply: str) -> Classification:
    """Classify a negative SMTP reply by the step that got it."""
    enhanced = enhanced_status(reply)
    if 400 <= code < 500:
        return Transient
    if code in (530, 534, 535, 538):
        # Authentication required / failed: this provider's credentials, not the message.
        return ProviderFatal
    if step in (Step.GREETING, Step.EHLO, Step.STARTTLS, Step.AUTH):
        return ProviderFatal
    if step is Step.MAIL:
        if code == 552 or (enhanced and enhanced[1] == 1 and enhanced[2] in (3, 7)):
            # Message too large for any server / the sender address itself is malformed.
            return MessageFatal
        # 5.7.x and friends: the provider refuses *us* as a sender (policy, not verified).
        return ProviderFatal
    if step is Step.RCPT:
        if enhanced and enhanced[1] == 7 and enhanced[2] == 1:
            # "Relaying denied": this provider will not relay for us.
            return ProviderFatal
        return MessageFatal
    if step in (Step.DATA, Step.DATA_END):
        if enhanced and enhanced[1] == 7:
            # 5.7.x after DATA is a policy refusal at this provider (sender not verified,
            # account paused, relaying denied): another provider may well take it.
            return ProviderFatal
        return MessageFatal
    return ProviderFatal


def classify(exc: BaseException) -> Classification:
    """Decide what a delivery failure means. The table lives in DESIGN.md and the docs."""
    if isinstance(exc, TransportError):
        return _classify_step(exc.step, exc.cause, exc.code, exc.reply, exc.refused)
    return _classify_step(None, exc, _code_of(exc), _reply_of(exc), {})


def _classify_step(
    step: Step | None,
    cause: BaseException,
    code: int | None,
    reply: str,
    refused: Mapping[str, tuple[int, str]],
) -> Classification:
    if isinstance(cause, InvalidMessage):
        return MessageFatal
    if isinstance(cause, ProviderMisconfigured):
        return ProviderFatal
    if isinstance(cause, StartTLSUnavailable):
        # A missing STARTTLS never falls back to plain text.
        return ProviderFatal
    if isinstance(cause, ssl.SSLEOFError | ssl.SSLZeroReturnError) and step in _HANDSHAKE:
        # The peer hung up during the handshake: a network hiccup, not a bad certificate.
        return Transient
    if isinstance(cause, ssl.SSLError | ssl.CertificateError) and step in _HANDSHAKE:
        # A bad certificate or a failed handshake is this provider's problem. After the
        # handshake, a TLS error is just a broken connection (handled as OSError below).
        return ProviderFatal
    if (
        step is Step.AUTH
        and code is None
        and isinstance(cause, smtplib.SMTPException)
        and not isinstance(cause, smtplib.SMTPServerDisconnected)
    ):
        # No common AUTH mechanism, or AUTH not offered: this provider's configuration.
        return ProviderFatal
    if isinstance(cause, smtplib.SMTPRecipientsRefused) or (step is Step.RCPT and refused):
        codes = [c for c, _ in (refused or _refused_of(cause)).values()]
        if codes and any(400 <= c < 500 for c in codes):
            return Transient
        replies = [r for _, r in (refused or _refused_of(cause)).values()]
        if replies and all(
            (e := enhanced_status(r)) is not None and e[1:] == (7, 1) for r in replies
        ):
            return ProviderFatal
        return MessageFatal
    if isinstance(cause, smtplib.SMTPNotSupportedError):
        return ProviderFatal
    if code is not None and code >= 400:
        effective = step or _step_of_response(cause)
        return _classify_reply(effective, code, reply)
    if isinstance(cause, ResolutionError):
        # NXDOMAIN / no such record: the configured host name is wrong, retrying won't help.
        return ProviderFatal if cause.permanent else Transient
    if isinstance(cause, smtplib.SMTPServerDisconnected | TimeoutError | socket.timeout | OSError):
        if step is Step.DATA_END:
            return Ambiguous
        return Transient
    if isinstance(cause, UnicodeError | ValueError | TypeError):
        if step in _MESSAGE_STEPS:
            return MessageFatal
        # Raised while reaching or greeting the server (a nameserver dnspython refuses, a
        # password SMTP AUTH cannot encode): the provider's configuration, not the
        # message, so another provider or the outbox may still take it.
        return ProviderFatal
    return Transient


def _refused_of(exc: BaseException) -> dict[str, tuple[int, str]]:
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        out: dict[str, tuple[int, str]] = {}
        for rcpt, (code, reply) in exc.recipients.items():
            text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
            out[str(rcpt)] = (int(code), text)
        return out
    return {}


def _step_of_response(exc: BaseException) -> Step:
    if isinstance(exc, smtplib.SMTPSenderRefused):
        return Step.MAIL
    if isinstance(exc, smtplib.SMTPDataError):
        return Step.DATA_END
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return Step.AUTH
    if isinstance(exc, smtplib.SMTPConnectError):
        return Step.GREETING
    return Step.MAIL
