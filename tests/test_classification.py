"""exceptions.classify(): one row per failure in the DESIGN.md error table, plus enhanced codes.

Each row is (the failure, what it must be classified as). The failures are built the way
the transport raises them: a TransportError carrying the step and smtplib's / ssl's /
socket's own exception as the cause; bare exceptions are covered for callers that
classify without a TransportError around them.
"""

from __future__ import annotations

import smtplib
import ssl

import pytest

from robust_mail.exceptions import (
    Classification,
    InvalidMessage,
    ProviderMisconfigured,
    ResolutionError,
    StartTLSUnavailable,
    Step,
    TransportError,
    classify,
)

TRANSIENT = Classification.TRANSIENT
PROVIDER_FATAL = Classification.PROVIDER_FATAL
MESSAGE_FATAL = Classification.MESSAGE_FATAL
AMBIGUOUS = Classification.AMBIGUOUS


def at(step: Step, cause: BaseException, **kwargs: object) -> TransportError:
    return TransportError(step, cause, provider="p", **kwargs)  # type: ignore[arg-type]


def refused_at_rcpt(**replies: tuple[int, str]) -> TransportError:
    refused = {f"{name}@example.com": reply for name, reply in replies.items()}
    cause = smtplib.SMTPRecipientsRefused(dict(refused))  # type: ignore[arg-type]
    return at(Step.RCPT, cause, refused=refused)


def cert_error() -> ssl.SSLCertVerificationError:
    return ssl.SSLCertVerificationError(1, "certificate verify failed: unable to get issuer")


ROWS: list[tuple[str, BaseException, Classification]] = [
    # --- transient: worth retrying here, then elsewhere ---------------------------------
    ("connection refused", at(Step.CONNECT, ConnectionRefusedError(111, "refused")), TRANSIENT),
    ("connect timeout", at(Step.CONNECT, TimeoutError("timed out")), TRANSIENT),
    ("network unreachable", at(Step.CONNECT, OSError(101, "Network is unreachable")), TRANSIENT),
    ("DNS timeout", at(Step.RESOLVE, ResolutionError("mx.test", "DNS timeout")), TRANSIENT),
    (
        "NXDOMAIN",
        at(Step.RESOLVE, ResolutionError("mx.test", "NXDOMAIN", permanent=True)),
        PROVIDER_FATAL,
    ),
    ("bare ResolutionError", ResolutionError("mx.test", "no nameserver"), TRANSIENT),
    (
        "greeting timeout",
        at(Step.GREETING, smtplib.SMTPServerDisconnected("closed: timed out")),
        TRANSIENT,
    ),
    ("421 at greeting", at(Step.GREETING, smtplib.SMTPConnectError(421, b"busy")), TRANSIENT),
    ("421 at EHLO", at(Step.EHLO, smtplib.SMTPHeloError(421, b"closing")), TRANSIENT),
    ("454 at STARTTLS", at(Step.STARTTLS, smtplib.SMTPResponseException(454, b"4.7.0")), TRANSIENT),
    ("timeout at AUTH", at(Step.AUTH, smtplib.SMTPServerDisconnected("timed out")), TRANSIENT),
    (
        "454 at AUTH",
        at(Step.AUTH, smtplib.SMTPAuthenticationError(454, b"4.7.0 try later")),
        TRANSIENT,
    ),
    (
        "421 at MAIL",
        at(Step.MAIL, smtplib.SMTPSenderRefused(421, b"4.7.0 closing", "a@b")),
        TRANSIENT,
    ),
    (
        "451 at MAIL",
        at(Step.MAIL, smtplib.SMTPSenderRefused(451, b"4.3.0 local error", "a@b")),
        TRANSIENT,
    ),
    (
        "452 at MAIL",
        at(Step.MAIL, smtplib.SMTPSenderRefused(452, b"4.3.1 no space", "a@b")),
        TRANSIENT,
    ),
    (
        "451 4.7.1 greylisted at RCPT",
        refused_at_rcpt(a=(451, "4.7.1 greylisted, try again")),
        TRANSIENT,
    ),
    ("421 at RCPT", at(Step.RCPT, smtplib.SMTPResponseException(421, b"closing")), TRANSIENT),
    (
        "mixed 4xx and 5xx refusals",
        refused_at_rcpt(a=(450, "4.2.1 mailbox busy"), b=(550, "5.1.1 no such user")),
        TRANSIENT,
    ),
    (
        "disconnect before DATA",
        at(Step.MAIL, smtplib.SMTPServerDisconnected("Connection unexpectedly closed")),
        TRANSIENT,
    ),
    ("disconnect at RCPT", at(Step.RCPT, smtplib.SMTPServerDisconnected("closed")), TRANSIENT),
    ("451 at the DATA command", at(Step.DATA, smtplib.SMTPDataError(451, b"4.3.0")), TRANSIENT),
    ("timeout at DATA", at(Step.DATA, TimeoutError("timed out")), TRANSIENT),
    (
        "TLS EOF while sending DATA",
        at(Step.DATA, ssl.SSLEOFError(8, "EOF occurred in violation of protocol")),
        TRANSIENT,
    ),
    (
        "TLS connection closed at MAIL",
        at(Step.MAIL, ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed")),
        TRANSIENT,
    ),
    ("drop mid-DATA", at(Step.DATA, BrokenPipeError(32, "Broken pipe")), TRANSIENT),
    ("reset mid-DATA", at(Step.DATA, ConnectionResetError(104, "reset by peer")), TRANSIENT),
    (
        "451 at DATA_END",
        at(Step.DATA_END, smtplib.SMTPDataError(451, b"4.3.0 try later")),
        TRANSIENT,
    ),
    ("421 at DATA_END", at(Step.DATA_END, smtplib.SMTPDataError(421, b"4.4.2 closing")), TRANSIENT),
    ("disconnect at RSET", at(Step.RSET, smtplib.SMTPServerDisconnected("closed")), TRANSIENT),
    ("bare disconnect", smtplib.SMTPServerDisconnected("closed"), TRANSIENT),
    ("bare ConnectionRefusedError", ConnectionRefusedError(111, "refused"), TRANSIENT),
    ("bare 421 reply", smtplib.SMTPResponseException(421, b"closing"), TRANSIENT),
    ("garbled reply", at(Step.MAIL, smtplib.SMTPResponseException(-1, b"garbage")), TRANSIENT),
    # --- provider-fatal: this provider cannot send for us -------------------------------
    (
        "535 at AUTH",
        at(Step.AUTH, smtplib.SMTPAuthenticationError(535, b"5.7.8 bad")),
        PROVIDER_FATAL,
    ),
    (
        "bare 535",
        smtplib.SMTPAuthenticationError(535, b"5.7.8 credentials invalid"),
        PROVIDER_FATAL,
    ),
    (
        "534 at AUTH",
        at(Step.AUTH, smtplib.SMTPAuthenticationError(534, b"5.7.9 weak mechanism")),
        PROVIDER_FATAL,
    ),
    (
        "no common AUTH mechanism",
        at(Step.AUTH, smtplib.SMTPException("No suitable authentication method found.")),
        PROVIDER_FATAL,
    ),
    (
        "AUTH not offered",
        at(Step.AUTH, smtplib.SMTPNotSupportedError("AUTH not offered")),
        PROVIDER_FATAL,
    ),
    (
        "530 auth required at MAIL",
        at(Step.MAIL, smtplib.SMTPSenderRefused(530, b"5.7.0 Authentication required", "a@b")),
        PROVIDER_FATAL,
    ),
    ("certificate failure at STARTTLS", at(Step.STARTTLS, cert_error()), PROVIDER_FATAL),
    (
        "certificate failure at CONNECT (implicit TLS)",
        at(Step.CONNECT, cert_error()),
        PROVIDER_FATAL,
    ),
    (
        "TLS handshake failure",
        at(Step.STARTTLS, ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")),
        PROVIDER_FATAL,
    ),
    (
        "host name mismatch",
        at(Step.CONNECT, ssl.CertificateError("hostname 'x' doesn't match 'y'")),
        PROVIDER_FATAL,
    ),
    ("bare ssl error", cert_error(), PROVIDER_FATAL),
    (
        "STARTTLS not offered",
        at(Step.STARTTLS, StartTLSUnavailable("no STARTTLS")),
        PROVIDER_FATAL,
    ),
    (
        "501 at STARTTLS",
        at(Step.STARTTLS, smtplib.SMTPResponseException(501, b"5.5.4")),
        PROVIDER_FATAL,
    ),
    (
        "554 at greeting",
        at(Step.GREETING, smtplib.SMTPConnectError(554, b"no service")),
        PROVIDER_FATAL,
    ),
    ("5xx at EHLO and HELO", at(Step.EHLO, smtplib.SMTPHeloError(550, b"go away")), PROVIDER_FATAL),
    (
        "550 5.7.1 at MAIL (sender not allowed)",
        at(Step.MAIL, smtplib.SMTPSenderRefused(550, b"5.7.1 sender not authorized", "a@b")),
        PROVIDER_FATAL,
    ),
    (
        "bare 550 5.7.1 sender refusal",
        smtplib.SMTPSenderRefused(550, b"5.7.1 not authorized to send as a@b", "a@b"),
        PROVIDER_FATAL,
    ),
    (
        "554 5.7.1 relay denied at RCPT",
        refused_at_rcpt(a=(554, "5.7.1 Relay access denied"), b=(554, "5.7.1 Relay access denied")),
        PROVIDER_FATAL,
    ),
    (
        "554 5.7.1 relay denied at RCPT, no refused dict",
        at(Step.RCPT, smtplib.SMTPResponseException(554, b"5.7.1 Relay access denied")),
        PROVIDER_FATAL,
    ),
    # --- message-fatal: no provider will take this message as it is ---------------------
    ("550 5.1.1 at RCPT", refused_at_rcpt(a=(550, "5.1.1 no such user")), MESSAGE_FATAL),
    (
        "550 5.1.1 at RCPT, no refused dict",
        at(Step.RCPT, smtplib.SMTPResponseException(550, b"5.1.1 <a@b>: no such user")),
        MESSAGE_FATAL,
    ),
    ("553 at RCPT", refused_at_rcpt(a=(553, "5.1.3 bad address syntax")), MESSAGE_FATAL),
    (
        "bare SMTPRecipientsRefused 550",
        smtplib.SMTPRecipientsRefused({"a@b": (550, b"5.1.1 unknown")}),
        MESSAGE_FATAL,
    ),
    (
        "relay denial mixed with an unknown user",
        refused_at_rcpt(a=(554, "5.7.1 Relay access denied"), b=(550, "5.1.1 no such user")),
        MESSAGE_FATAL,
    ),
    (
        "552 at MAIL (SIZE too big)",
        at(Step.MAIL, smtplib.SMTPSenderRefused(552, b"5.3.4 message too big", "a@b")),
        MESSAGE_FATAL,
    ),
    (
        "553 5.1.7 at MAIL (bad sender syntax)",
        at(Step.MAIL, smtplib.SMTPSenderRefused(553, b"5.1.7 bad sender address", "a@b")),
        MESSAGE_FATAL,
    ),
    (
        "554 at the DATA command",
        at(Step.DATA, smtplib.SMTPDataError(554, b"5.5.1 no rcpt")),
        MESSAGE_FATAL,
    ),
    (
        "552 at DATA_END",
        at(Step.DATA_END, smtplib.SMTPDataError(552, b"5.3.4 too big")),
        MESSAGE_FATAL,
    ),
    (
        "554 at DATA_END",
        at(Step.DATA_END, smtplib.SMTPDataError(554, b"5.6.0 bad content")),
        MESSAGE_FATAL,
    ),
    (
        "550 5.7.1 policy refusal at DATA_END (fails over)",
        at(Step.DATA_END, smtplib.SMTPDataError(550, b"5.7.1 spam")),
        PROVIDER_FATAL,
    ),
    ("bare 554 data error", smtplib.SMTPDataError(554, b"5.6.0 rejected"), MESSAGE_FATAL),
    (
        "554 5.7.1 sender not verified after DATA",
        at(Step.DATA_END, smtplib.SMTPDataError(554, b"5.7.1 Email address is not verified")),
        PROVIDER_FATAL,
    ),
    (
        "TLS handshake dropped by the peer",
        at(Step.STARTTLS, ssl.SSLEOFError(8, "EOF occurred in violation of protocol")),
        TRANSIENT,
    ),
    ("InvalidMessage", InvalidMessage("invalid address 'a\\nb'"), MESSAGE_FATAL),
    ("InvalidMessage at MAIL", at(Step.MAIL, InvalidMessage("no SMTPUTF8")), MESSAGE_FATAL),
    ("InvalidMessage at BUILD", at(Step.BUILD, InvalidMessage("no recipients")), MESSAGE_FATAL),
    ("unencodable message", UnicodeEncodeError("ascii", "é", 0, 1, "nope"), MESSAGE_FATAL),
    (
        "unencodable message at DATA",
        at(Step.DATA, UnicodeEncodeError("ascii", "é", 0, 1, "nope")),
        MESSAGE_FATAL,
    ),
    # A ValueError while reaching the server is the provider's configuration, never the
    # message's: it must fail over, not fail the message.
    (
        "a MAILER alias that cannot be built",
        at(Step.CONNECT, ProviderMisconfigured("mailer 'api': MailerDoesNotExist")),
        PROVIDER_FATAL,
    ),
    ("ValueError at RESOLVE", at(Step.RESOLVE, ValueError("bad nameserver")), PROVIDER_FATAL),
    ("ValueError at CONNECT", at(Step.CONNECT, ValueError("bad address")), PROVIDER_FATAL),
    ("ValueError at STARTTLS", at(Step.STARTTLS, ValueError("bad context")), PROVIDER_FATAL),
    (
        "unencodable password at AUTH",
        at(Step.AUTH, UnicodeEncodeError("ascii", "é", 0, 1, "nope")),
        PROVIDER_FATAL,
    ),
    # --- ambiguous: the server may have the message ------------------------------------
    (
        "disconnect at DATA_END",
        at(Step.DATA_END, smtplib.SMTPServerDisconnected("Connection unexpectedly closed")),
        AMBIGUOUS,
    ),
    ("timeout at DATA_END", at(Step.DATA_END, TimeoutError("timed out")), AMBIGUOUS),
    ("reset at DATA_END", at(Step.DATA_END, ConnectionResetError(104, "reset")), AMBIGUOUS),
    (
        "TLS EOF at DATA_END",
        at(Step.DATA_END, ssl.SSLEOFError(8, "EOF occurred in violation of protocol")),
        AMBIGUOUS,
    ),
]


@pytest.mark.parametrize(("failure", "expected"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_classify_follows_the_error_table(failure: BaseException, expected: Classification) -> None:
    assert classify(failure) is expected


def test_refused_recipients_travel_with_the_error() -> None:
    error = refused_at_rcpt(a=(550, "5.1.1 no such user"))
    assert error.refused == {"a@example.com": (550, "5.1.1 no such user")}
    assert error.step is Step.RCPT


def test_every_recipient_refused_reports_a_code_that_agrees_with_its_class() -> None:
    permanent = refused_at_rcpt(a=(550, "5.1.1 no such user"))
    mixed = refused_at_rcpt(a=(550, "5.1.1 no such user"), b=(451, "4.3.0 try later"))

    assert (permanent.code, classify(permanent)) == (550, Classification.MESSAGE_FATAL)
    # Retried (transient): its code must not say 5xx.
    assert (mixed.code, mixed.reply) == (451, "4.3.0 try later")
    assert classify(mixed) is Classification.TRANSIENT


def test_reply_code_and_text_are_taken_from_the_cause() -> None:
    error = at(Step.AUTH, smtplib.SMTPAuthenticationError(535, b"5.7.8 bad credentials"))
    assert error.code == 535
    assert error.reply == "5.7.8 bad credentials"
    assert str(error) == "p: auth failed (535 5.7.8 bad credentials)"
