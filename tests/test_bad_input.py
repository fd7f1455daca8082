"""Bad input gets a clear error before any traffic, and nothing is half-sent."""

from __future__ import annotations

import pytest
from django.core import mail
from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage

from robust_mail import EmailService
from robust_mail.exceptions import InvalidMessage
from tests.conftest import provider


@pytest.fixture
def server(smtp_server, robust):
    server = smtp_server()
    robust([provider(server, "only")])
    return server


@pytest.mark.parametrize(
    "address",
    [
        "not an address",
        "two@example.com, addresses@example.com",
        "victim@example.com\r\nBcc: everyone@example.com",
        "a@",  # the email package's parser raises IndexError on these two
        "a@[",  # (AttributeError), not ValueError
    ],
)
def test_invalid_recipient_raises_before_anything_is_sent(server, address):
    message = EmailMessage("Hi", "Body", "from@example.com", ["ok@example.com", address])

    with pytest.raises(InvalidMessage, match="invalid address"):
        message.send()

    assert server.connections_total == 0


def test_invalid_address_raises_even_with_fail_silently(server):
    message = EmailMessage("Hi", "Body", "from@example.com", ["bad address"])

    with pytest.raises(InvalidMessage):
        message.send(fail_silently=True)


@pytest.mark.parametrize("recipients", [["a@"], ["bad address"]])
def test_email_service_raises_bad_input_even_with_fail_silently(server, recipients):
    from robust_mail.service import EmailService

    with pytest.raises(InvalidMessage):
        EmailService.send_email("Hi", "Body", recipients, fail_silently=True)
    assert server.messages == []


def test_a_malformed_address_costs_only_its_own_message_in_a_batch(server):
    good = [EmailMessage("Hi", "Body", "from@example.com", [f"ok{i}@example.com"]) for i in (1, 2)]
    bad = EmailMessage("Hi", "Body", "from@example.com", ["a@"])

    with mail.get_connection() as connection, pytest.raises(InvalidMessage):
        connection.send_messages([good[0], bad, good[1]])

    assert sorted(m.rcpt_tos[0] for m in server.messages) == ["ok1@example.com", "ok2@example.com"]


def test_header_injection_in_subject_is_refused(server):
    message = EmailMessage(
        "Hi\nBcc: spam@example.com", "Body", "from@example.com", ["a@example.com"]
    )

    with pytest.raises(InvalidMessage):
        message.send()

    assert server.connections_total == 0


def _with_nul(where: str) -> EmailMessage:
    message = EmailMessage("Hi", "Body", "from@example.com", ["a@example.com"])
    if where == "subject":
        message.subject = "Order\x00 #1"
    elif where == "header":
        message.extra_headers["X-Ref"] = "a\x00b"
    elif where == "reply_to":
        message.reply_to = ["r\x00@example.com"]
    else:
        message.attach("a\x00.txt", "x", "text/plain")
    return message


@pytest.mark.parametrize(
    ("where", "named"),
    [
        ("subject", "subject"),
        ("header", "header 'X-Ref'"),
        ("reply_to", "reply_to"),
        ("filename", "attachment #1 filename"),
    ],
)
def test_a_nul_in_a_header_is_refused_before_any_traffic(server, where, named):
    # RFC 5322 forbids NUL in a header; Django would write it raw onto the wire.
    with pytest.raises(InvalidMessage, match=f"the {named} contains a NUL character"):
        _with_nul(where).send(fail_silently=True)
    assert server.connections_total == 0


def test_empty_recipient_list_sends_nothing_like_django(server):
    assert EmailMessage("Hi", "Body", "from@example.com", []).send() == 0
    assert server.connections_total == 0


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.django_db
def test_empty_recipient_list_sends_nothing_from_email_service_like_django(
    server, background, caplog
):
    # Django's send_mail([]) and EmailMessage(to=[]).send() return 0, fail_silently or not.
    from robust_mail.models import OutboxMessage
    from robust_mail.results import DeliveryStatus

    assert EmailService.send_email("Hi", "Body", [], background=background) is False
    assert (
        EmailService.send_email("Hi", "Body", [], background=background, fail_silently=True)
        is False
    )
    result = EmailService.send(
        EmailMessage("Hi", "Body", "f@example.com", []), background=background
    )

    assert result.status is DeliveryStatus.FAILED and not result.ok and result.attempts == 0
    assert server.connections_total == 0 and not OutboxMessage.objects.exists()
    assert "message without recipients not sent: 'Hi'" in caplog.text


def test_idn_domain_is_idna_encoded_in_the_envelope(server):
    EmailMessage("Hi", "Body", "from@example.com", ["user@bücher.example"]).send()

    assert server.messages[0].rcpt_tos == ["user@xn--bcher-kva.example"]


def test_non_ascii_local_part_is_sent_with_smtputf8(server):
    EmailMessage("Hi", "Body", "from@example.com", ["jürgen@example.com"]).send()

    assert server.messages[0].rcpt_tos == ["jürgen@example.com"]


def test_twenty_megabyte_attachment_goes_through(server, robust):
    # Parsing 20 MB takes the test server a while on a loaded machine: a generous timeout.
    robust([provider(server, "only", TIMEOUT=30)])
    message = EmailMessage("Big", "See attachment", "from@example.com", ["a@example.com"])
    payload = bytes(range(256)) * (20 * 1024 * 4)  # 20 MiB
    message.attach("big.bin", payload, "application/octet-stream")

    assert message.send() == 1

    (received,) = server.messages
    (attachment,) = list(received.message.iter_attachments())
    assert attachment.get_content() == payload


def test_configuration_error_is_never_swallowed_by_fail_silently(settings):
    settings.EMAIL_BACKEND = "robust_mail.backends.RobustEmailBackend"
    settings.ROBUST_MAIL = {"PROVIDERS": ["ftp://nowhere"]}

    with pytest.raises(ImproperlyConfigured):
        mail.send_mail("Hi", "Body", "a@example.com", ["b@example.com"], fail_silently=True)


def test_quoted_local_part_keeps_its_quotes_in_the_envelope(server):
    # An address Django's validators accept; unquoted it would become attacker@evil.example.
    tricky = '"attacker@evil.example;"@corp.example'
    EmailMessage("Hi", "Body", "from@example.com", [tricky]).send()

    assert server.messages[0].rcpt_tos == [tricky]


@pytest.mark.parametrize(
    "call",
    [
        lambda: mail.send_mail(
            "s", "b", "f@example.com", ["t@example.com"], auth_user="alice", auth_password="pw"
        ),
        lambda: mail.get_connection(host="smtp.example.com", port=2525),
    ],
    ids=["send_mail-auth_user", "get_connection-host"],
)
def test_smtp_options_per_call_are_refused_rather_than_ignored(server, call):
    # Django's SMTP backend would send as alice; ignoring it would send as the configured
    # account without a word.
    with pytest.raises(TypeError, match="does not take SMTP connection options per call"):
        call()
    assert server.connections_total == 0


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"FALLBACK": "outbox"}, "'FALLBACK' (did you mean 'fallback'?)"),
        ({"retries": 3}, "'retries' (did you mean 'retry'?)"),
        ({"colour": "blue"}, "'colour'"),
    ],
)
def test_unknown_keyword_options_are_ignored_with_a_warning(server, options, named, caplog):
    # Django's contract is to ignore them (its 6.1 backend tests check it); dropped without
    # a word, FALLBACK="outbox" would have sent with no fallback at all.
    with caplog.at_level("WARNING", logger="robust_mail"):
        mail.get_connection(fail_silently=True, **options)
    [warning] = [r.getMessage() for r in caplog.records if "unknown keyword" in r.getMessage()]
    assert named in warning
    assert "fallback" in warning and "providers" in warning
    assert server.connections_total == 0


def test_keyword_options_replace_robust_mail_as_a_whole(server):
    # Documented: like MAILERS OPTIONS, they are the whole configuration, not merged.
    with pytest.raises(ImproperlyConfigured, match="providers"):
        mail.get_connection(fallback="outbox").open()
    connection = mail.get_connection(
        providers=[f"smtp://127.0.0.1:{server.port}?name=kw"], fallback="outbox"
    )
    message = EmailMessage("Hi", "Body", "from@example.com", ["to@example.com"])
    assert connection.send_messages([message]) == 1
    assert message.delivery_result.provider == "kw"
    assert len(server.messages) == 1


def test_django_passing_no_smtp_options_is_fine(server):
    # send_mail() always passes username=None, password=None to get_connection().
    assert mail.send_mail("s", "b", "f@example.com", ["t@example.com"]) == 1


def test_a_backend_used_without_the_app_installed_says_so_once(settings, caplog):
    from robust_mail import backends

    settings.EMAIL_BACKEND = "robust_mail.backends.RobustEmailBackend"
    settings.INSTALLED_APPS = [a for a in settings.INSTALLED_APPS if a != "robust_mail"]
    backends._warn_if_not_installed.cache_clear()
    try:
        mail.get_connection()
        mail.get_connection()
    finally:
        backends._warn_if_not_installed.cache_clear()

    warnings = [r for r in caplog.records if "not in INSTALLED_APPS" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"


@pytest.mark.parametrize("name", ["X-A: 1\r\nX-Injected", "X-A\nB", "X A", "X-Ä", ""])
def test_a_header_name_that_is_not_a_field_name_is_refused(server, name):
    message = EmailMessage("Hi", "Body", "from@example.com", ["a@example.com"], headers={name: "v"})

    with pytest.raises(InvalidMessage, match="invalid header name"):
        message.send()
    assert server.connections_total == 0  # refused before any traffic


@pytest.mark.parametrize(
    ("domain", "envelope"),
    [("faß.example", "xn--fa-hia.example"), ("straße.example", "xn--strae-oqa.example")],
)
def test_the_envelope_encodes_a_domain_as_idna_2008_not_2003(server, domain, envelope):
    # IDNA 2003 maps faß to fass: another domain, whose owner would get the mail.
    EmailMessage("Code", "123456", "from@example.com", [f"user@{domain}"]).send()

    assert server.messages[0].rcpt_tos == [f"user@{envelope}"]
