"""Failover through RobustEmailBackend against real SMTP servers on 127.0.0.1."""

from __future__ import annotations

import logging
import time
from email import message_from_bytes
from typing import Any

import pytest
from django.core import mail
from django.core.mail import EmailMessage, send_mail

from robust_mail.conf import get_config
from robust_mail.exceptions import Classification, DeliveryFailed
from robust_mail.results import DeliveryResult, DeliveryStatus
from robust_mail.state import get_breaker
from tests.conftest import provider, secret_forms


@pytest.fixture(params=[False, True], ids=["sequential", "pipelined"])
def pipelining(request: pytest.FixtureRequest) -> bool:
    """Every failover scenario against servers with and without PIPELINING."""
    return bool(request.param)


pytestmark = pytest.mark.usefixtures("pipelining")


def _send(subject: str = "Hello", to: tuple[str, ...] = ("rcpt@example.com",)) -> EmailMessage:
    message = EmailMessage(subject, "Body text", "sender@example.com", list(to))
    assert mail.get_connection().send_messages([message]) == 1
    return message


def test_connection_refused_fails_over_to_next_provider(smtp_server, robust):
    primary = smtp_server("refuse")
    backup = smtp_server()
    robust([provider(primary, "primary"), provider(backup, "backup")])

    message = _send()

    result = message.delivery_result
    assert result.status is DeliveryStatus.SENT
    assert result.provider == "backup"
    assert [m.message_id for m in backup.messages] == [result.message_id]
    (error,) = result.errors
    assert (error.provider, error.classification, error.step) == (
        "primary",
        Classification.TRANSIENT,
        "connect",
    )
    # Unreachable while a backup exists: failed over at once, not retried, breaker open.
    assert error.attempts == 1


def test_unreachable_last_provider_is_still_retried(smtp_server, robust):
    only = smtp_server("refuse")
    robust([provider(only, "only")])

    with pytest.raises(DeliveryFailed) as caught:
        _send()

    assert caught.value.errors[0].attempts == 2  # ATTEMPTS=2 in the fixture


def test_dead_primary_costs_one_attempt_then_its_breaker_skips_it(smtp_server, robust):
    primary = smtp_server("blackhole")
    backup = smtp_server()
    robust([provider(primary, "primary", TIMEOUT=0.3), provider(backup, "backup")])

    first = _send("first")
    second = _send("second")

    assert first.delivery_result.errors[0].attempts == 1
    assert primary.connections_total == 1
    assert second.delivery_result.errors[0].step == "skipped"
    assert len(backup.messages) == 2


def test_send_mail_works_unchanged(smtp_server, robust):
    backup = smtp_server()
    robust([provider(backup, "only")])

    assert send_mail("Subject", "Body", "from@example.com", ["to@example.com"]) == 1

    (received,) = backup.messages
    assert received.message["Subject"] == "Subject"
    assert received.rcpt_tos == ["to@example.com"]


def test_delivery_result_of_reads_the_attached_result(smtp_server, robust):
    robust([provider(smtp_server(), "only")])
    message = EmailMessage("Hi", "Body", "from@example.com", ["to@example.com"])
    assert DeliveryResult.of(message) is None  # not sent yet

    message.send()

    result = DeliveryResult.of(message)
    assert result is message.delivery_result
    assert result is not None and result.status is DeliveryStatus.SENT


def test_black_hole_is_bounded_by_the_timeout_then_fails_over(smtp_server, robust):
    primary = smtp_server("blackhole")
    backup = smtp_server()
    robust(
        [provider(primary, "primary", TIMEOUT=0.3), provider(backup, "backup")],
        RETRY={"ATTEMPTS": 1, "BACKOFF": 0, "MAX_BACKOFF": 0, "DEADLINE": 10},
    )

    message = _send()

    assert message.delivery_result.provider == "backup"
    (error,) = message.delivery_result.errors
    assert error.classification is Classification.TRANSIENT
    assert error.step == "greeting"


def test_421_at_greeting_is_retried_then_fails_over(smtp_server, robust):
    primary = smtp_server("greeting_421")
    backup = smtp_server()
    robust([provider(primary, "primary"), provider(backup, "backup")])

    message = _send()

    assert message.delivery_result.provider == "backup"
    assert message.delivery_result.attempts == 3
    assert primary.connections_total == 2
    assert message.delivery_result.errors[0].code == 421


def test_451_at_data_reaches_next_provider_with_the_same_message_id(smtp_server, robust):
    primary = smtp_server("data_451")
    backup = smtp_server()
    robust([provider(primary, "primary"), provider(backup, "backup")])

    message = _send()

    (received,) = backup.messages
    assert received.message_id == message.delivery_result.message_id
    assert message.extra_headers["Message-ID"] == received.message_id


def test_auth_failure_is_not_retried_and_opens_the_breaker(smtp_server, robust):
    primary = smtp_server("auth_535", auth={"user": "right"})
    backup = smtp_server()
    robust(
        [
            provider(primary, "primary", USERNAME="user", PASSWORD="wrong-password"),
            provider(backup, "backup"),
        ]
    )

    first = _send()
    second = _send()

    assert first.delivery_result.errors[0].classification is Classification.PROVIDER_FATAL
    assert first.delivery_result.errors[0].attempts == 1
    assert primary.connections_total == 1  # the open breaker skips it for the second message
    assert second.delivery_result.errors[0].step == "skipped"
    assert len(backup.messages) == 2


def test_550_for_the_recipient_fails_without_failover(smtp_server, robust):
    primary = smtp_server("rcpt_550")
    backup = smtp_server()
    robust([provider(primary, "primary"), provider(backup, "backup")])
    message = EmailMessage("Hi", "Body", "from@example.com", ["nobody@example.com"])

    with pytest.raises(DeliveryFailed) as caught:
        message.send()

    assert caught.value.classification is Classification.MESSAGE_FATAL
    assert "5.1.1" in str(caught.value)
    assert backup.messages == []
    assert message.delivery_result.status is DeliveryStatus.FAILED
    (error,) = message.delivery_result.errors
    assert (error.step, error.code) == ("rcpt", 550)  # the code, as for any other step


def test_fail_silently_returns_zero_and_keeps_the_result(smtp_server, robust):
    primary = smtp_server("rcpt_550")
    robust([provider(primary, "primary")])
    message = EmailMessage("Hi", "Body", "from@example.com", ["nobody@example.com"])

    assert message.send(fail_silently=True) == 0
    assert message.delivery_result.status is DeliveryStatus.FAILED


def test_missing_starttls_is_a_provider_failure_and_nothing_goes_in_plain_text(
    smtp_server, robust, certs
):
    primary = smtp_server("no_starttls", tls="starttls")
    backup = smtp_server()
    robust(
        [
            provider(primary, "primary", USE_TLS=True, SSL_CAFILE=certs.ca_file, HOST="localhost"),
            provider(backup, "backup"),
        ]
    )

    message = _send()

    assert primary.messages == []
    error = message.delivery_result.errors[0]
    assert (error.classification, error.step) == (Classification.PROVIDER_FATAL, "starttls")
    assert message.delivery_result.provider == "backup"


def test_untrusted_certificate_fails_over(smtp_server, robust, certs):
    primary = smtp_server("untrusted_cert", tls="starttls")
    backup = smtp_server()
    robust(
        [
            provider(primary, "primary", USE_TLS=True, SSL_CAFILE=certs.ca_file, HOST="localhost"),
            provider(backup, "backup"),
        ]
    )

    message = _send()

    assert primary.messages == []
    assert message.delivery_result.errors[0].classification is Classification.PROVIDER_FATAL
    assert message.delivery_result.provider == "backup"


def test_starttls_and_implicit_tls_deliver_over_verified_tls(smtp_server, robust, certs):
    starttls = smtp_server(tls="starttls", auth={"user": "secret"})
    implicit = smtp_server(tls="implicit")
    common = {"SSL_CAFILE": certs.ca_file, "HOST": "localhost"}
    robust([provider(starttls, "tls", USE_TLS=True, USERNAME="user", PASSWORD="secret", **common)])
    _send()
    robust([provider(implicit, "ssl", USE_SSL=True, **common)])
    _send()

    assert [m.tls for m in starttls.messages] == [True]
    assert starttls.messages[0].auth_user == "user"
    assert [m.tls for m in implicit.messages] == [True]


def test_partial_refusal_delivers_to_the_others_and_reports_the_refused(smtp_server, robust):
    primary = smtp_server(refuse_recipients=["gone@example.com"])
    robust([provider(primary, "primary")])

    message = _send(to=("ok@example.com", "gone@example.com"))

    result = message.delivery_result
    assert result.status is DeliveryStatus.PARTIAL
    assert list(result.refused) == ["gone@example.com"]
    assert result.refused["gone@example.com"][0] == 550
    assert primary.messages[0].rcpt_tos == ["ok@example.com"]


def test_every_provider_down_raises_with_each_providers_error(smtp_server, robust):
    first = smtp_server("refuse")
    second = smtp_server("mail_421")
    robust([provider(first, "first"), provider(second, "second")])

    with pytest.raises(DeliveryFailed) as caught:
        _send()

    assert [e.provider for e in caught.value.errors] == ["first", "second"]
    assert "first: transient at connect" in str(caught.value)
    assert caught.value.result.status is DeliveryStatus.DEFERRED


def test_console_fallback_prints_a_readable_message(smtp_server, robust, settings, capsys):
    down = smtp_server("refuse")
    robust([provider(down, "down")], FALLBACK="console")
    settings.DEBUG = True
    link = "https://example.com/reset/" + "x" * 120
    message = EmailMessage(
        "Réinitialiser", f"Cliquez ici : {link}", "a@example.com", ["b@example.com"]
    )

    assert message.send() == 1

    out = capsys.readouterr().out
    assert message.delivery_result.status is DeliveryStatus.CONSOLE
    assert "Subject: Réinitialiser" in out
    assert f"Cliquez ici : {link}" in out  # decoded, and the long link on one line
    assert "\\x0d" not in out  # CRLF line ends printed as line ends, not escaped


def test_console_fallback_prints_no_terminal_escape_sequences(
    smtp_server, robust, settings, capsys
):
    down = smtp_server("refuse")
    robust([provider(down, "down")], FALLBACK="console")
    settings.DEBUG = True
    retitle, clipboard = "\x1b]0;pwned\x07", "\x1b]52;c;ZXZpbA==\x07"
    EmailMessage(f"Hi {retitle}", f"Body {clipboard}", "a@example.com", ["b@example.com"]).send()

    out = capsys.readouterr().out

    assert "\x1b" not in out and "\x07" not in out
    assert "Hi \\x1b]0;pwned\\x07" in out  # shown, harmless


def test_console_fallback_withholds_bodies_outside_debug(smtp_server, robust, capsys):
    down = smtp_server("refuse")
    robust([provider(down, "down")], FALLBACK="console")

    EmailMessage("Code", "Your code is 123456", "a@example.com", ["b@example.com"]).send()

    out = capsys.readouterr().out
    assert "123456" not in out
    assert "bodies withheld" in out


def test_drop_in_with_django_email_settings_only(smtp_server, settings):
    server = smtp_server()
    settings.EMAIL_BACKEND = "robust_mail.backends.RobustEmailBackend"
    settings.ROBUST_MAIL = {}
    settings.EMAIL_HOST = "127.0.0.1"
    settings.EMAIL_PORT = server.port
    settings.EMAIL_TIMEOUT = None  # Django's default: robust_mail still bounds every step

    assert send_mail("Hi", "Body", "from@example.com", ["to@example.com"]) == 1
    assert len(server.messages) == 1


def test_logs_name_each_attempt_but_never_the_password_or_body(smtp_server, robust, caplog):
    primary = smtp_server("auth_535", auth={"user": "right"})
    backup = smtp_server()
    robust(
        [
            provider(primary, "primary", USERNAME="user", PASSWORD="hunter2-secret"),
            provider(backup, "backup"),
        ]
    )
    caplog.set_level(logging.DEBUG)

    EmailMessage("Hi", "confidential body text", "a@example.com", ["b@example.com"]).send()

    # Only our own loggers: the test server (aiosmtpd) logs what it receives.
    text = "\n".join(
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("robust_mail") and not r.name.startswith("robust_mail.testing")
    )
    assert "primary" in text and "auth" in text and "provider_fatal" in text
    for leaked in secret_forms("user", "hunter2-secret"):
        assert leaked not in text
    assert "confidential body text" not in text


def test_signals_report_provider_failure_and_sending(smtp_server, robust):
    from robust_mail import signals

    primary = smtp_server("refuse")
    backup = smtp_server()
    robust([provider(primary, "primary"), provider(backup, "backup")])
    seen: list[tuple[str, Any]] = []

    def on_failed(sender: Any, provider: str, **kwargs: Any) -> None:
        seen.append(("provider_failed", provider))

    def on_sent(sender: Any, result: Any, **kwargs: Any) -> None:
        seen.append(("message_sent", result.provider))

    signals.provider_failed.connect(on_failed)
    signals.message_sent.connect(on_sent)
    try:
        _send()
    finally:
        signals.provider_failed.disconnect(on_failed)
        signals.message_sent.disconnect(on_sent)

    assert seen == [("provider_failed", "primary"), ("message_sent", "backup")]


def test_backend_is_a_context_manager_and_close_is_safe(smtp_server, robust):
    server = smtp_server()
    robust([provider(server, "only")])

    with mail.get_connection() as connection:
        assert connection.open() is False  # already opened by __enter__
        connection.send_messages([EmailMessage("a", "b", "c@example.com", ["d@example.com"])])
    connection.close()

    assert len(server.messages) == 1


def test_pooled_connection_closed_by_the_server_is_replaced_transparently(smtp_server, robust):
    server = smtp_server()
    robust([provider(server, "only")])
    _send("first")
    server.drop_connections()  # the server hangs up on the idle pooled connection

    second = _send("second")

    assert second.delivery_result.attempts == 1
    assert second.delivery_result.errors == ()
    assert [m.message["Subject"] for m in server.messages] == ["first", "second"]
    assert server.connections_total == 2


# --- a provider that lacks what the message needs -------------------------------------------
#
# These run aiosmtpd itself (a real SMTP server on 127.0.0.1) with capabilities taken away
# or replies scripted: the ``limited_server`` fixture, tests/limited_smtp.py.


def test_server_without_smtputf8_hands_a_non_ascii_address_to_the_next_provider(
    smtp_server, robust, limited_server
):
    primary = limited_server(enable_SMTPUTF8=False)
    backup = smtp_server()
    robust([provider(primary, "primary"), provider(backup, "backup")])
    message = EmailMessage("Hi", "Body", "sender@example.com", ["jörg@example.com"])

    assert message.send() == 1

    result = message.delivery_result
    assert (result.status, result.provider) == (DeliveryStatus.SENT, "backup")
    (error,) = result.errors
    assert (error.provider, error.step, error.attempts) == ("primary", "mail", 1)
    assert "SMTPUTF8" in error.message
    assert primary.handler.messages == []
    assert backup.messages[0].rcpt_tos == ["jörg@example.com"]
    breaker = get_breaker("primary", get_config())
    assert (breaker.failures, breaker.state.value) == (0, "closed")  # not held against it


def test_message_over_one_providers_size_limit_goes_to_one_with_room(smtp_server, robust, caplog):
    primary = smtp_server(size_limit=2000)
    backup = smtp_server()
    robust([provider(primary, "primary"), provider(backup, "backup")])
    message = EmailMessage("Big", "x" * 5000, "sender@example.com", ["rcpt@example.com"])
    caplog.set_level(logging.WARNING, logger="robust_mail")

    assert message.send() == 1

    assert message.delivery_result.provider == "backup"
    assert "2000-byte limit" in message.delivery_result.errors[0].message
    # The log says what happened: not "the message fails", it went on to the next one.
    assert "trying the next provider" in caplog.text and "message fails" not in caplog.text
    assert len(backup.messages) == 1
    assert get_breaker("primary", get_config()).failures == 0


def test_552_at_mail_fails_over_without_touching_the_breaker(smtp_server, robust, limited_server):
    primary = limited_server(mail_reply="552 5.3.4 Message size exceeds fixed limit")
    backup = smtp_server()
    robust(
        [provider(primary, "primary"), provider(backup, "backup")],
        CIRCUIT_BREAKER={"FAILURE_THRESHOLD": 1, "RESET_TIMEOUT": 60},
    )

    first, second = _send("first"), _send("second")

    assert [first.delivery_result.provider, second.delivery_result.provider] == ["backup"] * 2
    error = first.delivery_result.errors[0]
    assert (error.step, error.code) == ("mail", 552)
    # With a threshold of 1 a single counted failure would have opened it: it was not counted.
    assert second.delivery_result.errors[0].step == "mail"
    assert get_breaker("primary", get_config()).state.value == "closed"


def test_message_no_provider_can_take_fails_as_message_fatal(robust, limited_server):
    first = limited_server(enable_SMTPUTF8=False)
    second = limited_server(enable_SMTPUTF8=False)
    robust([provider(first, "first"), provider(second, "second")])
    message = EmailMessage("Hi", "Body", "sender@example.com", ["jörg@example.com"])

    with pytest.raises(DeliveryFailed) as caught:
        message.send()

    result = message.delivery_result
    assert result.status is DeliveryStatus.FAILED
    assert caught.value.classification is Classification.MESSAGE_FATAL
    assert [e.provider for e in result.errors] == ["first", "second"]
    assert result.attempts == 2  # neither was retried


def test_when_the_only_capable_provider_is_down_the_message_is_deferred(
    smtp_server, robust, limited_server
):
    primary = limited_server(enable_SMTPUTF8=False)
    backup = smtp_server("refuse")
    robust([provider(primary, "primary"), provider(backup, "backup")])
    message = EmailMessage("Hi", "Body", "sender@example.com", ["jörg@example.com"])

    with pytest.raises(DeliveryFailed):
        message.send()

    # The backup may take it once it is back: not a message-fatal failure.
    assert message.delivery_result.status is DeliveryStatus.DEFERRED


def test_incapable_provider_frees_its_half_open_trial(smtp_server, robust, limited_server):
    primary = limited_server(enable_SMTPUTF8=False)
    backup = smtp_server()
    robust(
        [provider(primary, "primary"), provider(backup, "backup")],
        CIRCUIT_BREAKER={"FAILURE_THRESHOLD": 1, "RESET_TIMEOUT": 0.01},
    )
    breaker = get_breaker("primary", get_config())
    breaker.trip()
    time.sleep(0.05)  # past RESET_TIMEOUT: the next message holds the half-open trial

    message = EmailMessage("Hi", "Body", "sender@example.com", ["jörg@example.com"])
    assert message.send() == 1

    assert message.delivery_result.provider == "backup"
    assert breaker.allow()  # the trial this message held was handed back


# --- recipients put off with a 4xx while others were accepted ---------------------------------


def test_recipients_over_a_per_transaction_limit_go_in_further_transactions(robust, limited_server):
    server = limited_server(rcpt_limit=2)
    robust([provider(server, "primary")])
    to = ["a@example.com", "b@example.com", "c@example.com", "d@example.com", "e@example.com"]

    message = _send(to=tuple(to))

    result = message.delivery_result
    assert (result.status, result.refused) == (DeliveryStatus.SENT, {})
    assert server.handler.transactions == [to[:2], to[2:4], to[4:]]
    ids = {message_from_bytes(m)["Message-ID"] for m in server.handler.messages}
    assert ids == {result.message_id}  # the same message, in three transactions


def test_a_recipient_still_put_off_is_reported_refused_with_its_4xx(robust, limited_server):
    server = limited_server(put_off=("later@example.com",))
    robust([provider(server, "primary")])

    message = _send(to=("now@example.com", "later@example.com"))

    result = message.delivery_result
    assert result.status is DeliveryStatus.PARTIAL
    assert list(result.refused) == ["later@example.com"]
    assert result.refused["later@example.com"][0] == 450
    assert server.handler.transactions == [["now@example.com"]]  # tried again, still put off


def test_a_failed_further_transaction_reports_its_recipients_and_never_resends_the_first(
    robust, limited_server
):
    server = limited_server(rcpt_limit=1, later_data_reply="554 5.6.0 Rejected")
    robust([provider(server, "primary")])

    message = _send(to=("a@example.com", "b@example.com"))

    result = message.delivery_result
    assert result.status is DeliveryStatus.PARTIAL  # a@ has it: no retry, no failover
    assert result.attempts == 1
    code, reply = result.refused["b@example.com"]
    assert code == 554 and "another transaction" in reply
    assert server.handler.transactions == [["a@example.com"]]


@pytest.mark.django_db
@pytest.mark.parametrize("first", [True, False], ids=["mailer-first", "mailer-last"])
def test_a_mailer_provider_that_cannot_be_built_fails_over_and_falls_back(
    smtp_server, robust, first
):
    # Before Django 6.1 there is no mail.mailers at all; on 6.1 the alias is missing.
    # Check E010 reports both; at send time neither may escape failover or the fallback.
    from robust_mail.models import OutboxMessage

    if first:
        backup = smtp_server()
        robust([{"NAME": "api", "MAILER": "nope"}, provider(backup, "backup")])
        message = _send()
        result = message.delivery_result
        assert result.status is DeliveryStatus.SENT and result.provider == "backup"
        (error,) = result.errors
        assert (error.provider, error.classification, error.step) == (
            "api",
            Classification.PROVIDER_FATAL,
            "connect",
        )
        assert "mailer 'nope'" in error.message
    else:
        down = smtp_server("refuse")
        robust(
            [provider(down, "down"), {"NAME": "api", "MAILER": "nope"}],
            RETRY={"ATTEMPTS": 1, "BACKOFF": 0.0, "MAX_BACKOFF": 0.0, "DEADLINE": 20.0},
            FALLBACK="outbox",
        )
        assert send_mail("s", "b", "sender@example.com", ["rcpt@example.com"]) == 1
        assert OutboxMessage.objects.count() == 1
