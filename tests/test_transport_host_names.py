"""Provider host names as written in settings: a trailing dot, and names DNS cannot hold.

Real SMTP and DNS servers on 127.0.0.1; certificates from the suite's test CA (they name
localhost, 127.0.0.1 and mail.test).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core import mail
from django.core.mail import EmailMessage

from robust_mail.exceptions import Classification, ResolutionError, Step, TransportError, classify
from robust_mail.providers import ProviderConfig
from robust_mail.resolver import Resolver
from robust_mail.results import DeliveryResult
from robust_mail.testing.dns import DNSTestServer
from robust_mail.transport import SMTPConnection
from tests.conftest import provider

SENDER = "sender@example.com"
MESSAGE = b"From: sender@example.com\r\nTo: rcpt@example.com\r\nSubject: hi\r\n\r\nHello\r\n"

#: Names a settings check that splits on "." lets through, though DNS cannot hold them.
UNRESOLVABLE = [
    "smtp\u3002\u3002example.com",  # ideographic full stops: an empty label, as "smtp..x"
    "sm\u200dtp.example.com",  # a zero-width joiner: no IDNA encoding exists
]


@pytest.fixture
def dns_server() -> Iterator[DNSTestServer]:
    records = {"mail.test": {"A": ["127.0.0.1"]}, "other.test": {"A": ["127.0.0.1"]}}
    with DNSTestServer(records) as server:
        yield server


def tls_provider(server: Any, host: str, tls: str) -> ProviderConfig:
    return ProviderConfig(
        name="dotted",
        host=host,
        port=server.port,
        timeout=2.0,
        use_tls=tls == "starttls",
        use_ssl=tls == "implicit",
        ssl_cafile=server.certificates.ca_file,
    )


# --- a trailing dot ------------------------------------------------------------------------


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_a_host_with_a_trailing_dot_verifies_tls_against_the_name_without_it(
    smtp_server: Callable[..., Any], dns_server: DNSTestServer, tls: str
) -> None:
    server = smtp_server(tls=tls)
    resolver = Resolver(nameservers=["127.0.0.1"], port=dns_server.port, timeout=1.0)
    with SMTPConnection(tls_provider(server, "mail.test.", tls), resolver=resolver) as conn:
        assert conn.tls is True
        conn.send(SENDER, ["rcpt@example.com"], MESSAGE)
    assert [m.tls for m in server.messages] == [True]


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_a_trailing_dot_does_not_make_a_certificate_for_another_name_pass(
    smtp_server: Callable[..., Any], dns_server: DNSTestServer, tls: str
) -> None:
    server = smtp_server(tls=tls)
    resolver = Resolver(nameservers=["127.0.0.1"], port=dns_server.port, timeout=1.0)
    conn = SMTPConnection(tls_provider(server, "other.test.", tls), resolver=resolver)
    with pytest.raises(TransportError) as caught:
        conn.open()
    assert "other.test" in str(caught.value.cause)
    assert classify(caught.value) is Classification.PROVIDER_FATAL
    assert server.messages == []


# --- names DNS cannot hold -----------------------------------------------------------------


@pytest.mark.parametrize("host", ["smtp..example.com", *UNRESOLVABLE])
def test_a_malformed_host_fails_open_at_resolve_as_provider_fatal(
    dns_server: DNSTestServer, host: str
) -> None:
    resolver = Resolver(nameservers=["127.0.0.1"], port=dns_server.port, timeout=1.0)
    conn = SMTPConnection(ProviderConfig(name="typo", host=host, port=25), resolver=resolver)
    with pytest.raises(TransportError) as caught:
        conn.open()
    assert caught.value.step is Step.RESOLVE
    assert isinstance(caught.value.cause, ResolutionError)
    assert classify(caught.value) is Classification.PROVIDER_FATAL
    assert dns_server.queries == []


@pytest.mark.parametrize("host", UNRESOLVABLE)
def test_a_malformed_host_is_skipped_and_a_batch_goes_through_the_backup(
    smtp_server: Callable[..., Any],
    robust: Callable[..., Any],
    dns_server: DNSTestServer,
    host: str,
) -> None:
    backup = smtp_server()
    robust(
        [provider(backup, "primary", HOST=host, PORT=25), provider(backup, "backup")],
        DNS={"NAMESERVERS": ["127.0.0.1"], "PORT": dns_server.port, "TIMEOUT": 1.0},
    )

    sent = mail.send_mass_mail(
        [
            ("first", "Body", SENDER, ["one@example.com"]),
            ("second", "Body", SENDER, ["two@example.com"]),
        ]
    )

    assert sent == 2
    assert sorted(m.message["Subject"] for m in backup.messages) == ["first", "second"]
    assert dns_server.queries == []


def test_a_malformed_host_is_provider_fatal_not_retried_and_then_skipped(
    smtp_server: Callable[..., Any], robust: Callable[..., Any], dns_server: DNSTestServer
) -> None:
    backup = smtp_server()
    robust(
        [provider(backup, "primary", HOST=UNRESOLVABLE[0]), provider(backup, "backup")],
        DNS={"NAMESERVERS": ["127.0.0.1"], "PORT": dns_server.port, "TIMEOUT": 1.0},
    )
    messages = [EmailMessage(s, "Body", SENDER, ["rcpt@example.com"]) for s in ("a", "b")]

    assert mail.get_connection().send_messages(messages) == 2

    first, second = (DeliveryResult.of(message) for message in messages)
    assert first is not None and second is not None
    assert first.provider == second.provider == "backup"
    (error,) = first.errors
    assert (error.provider, error.step, error.classification, error.attempts) == (
        "primary",
        "resolve",
        Classification.PROVIDER_FATAL,
        1,
    )
    # Provider-fatal opens its breaker: the rest of the batch does not ask again.
    assert [(e.provider, e.step) for e in second.errors] == [("primary", "skipped")]
