"""A message stored as JSON comes back byte-for-byte the message the caller built."""

from __future__ import annotations

import email.message
import json
import random
import warnings
from email.mime.base import MIMEBase
from email.mime.text import MIMEText
from typing import Any

import django
import pytest
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.utils.translation import gettext_lazy

from robust_mail.envelope import pin_message
from robust_mail.exceptions import InvalidMessage
from robust_mail.serialization import message_from_data, message_to_data

DJANGO_6 = django.VERSION >= (6, 0)
PNG = bytes(range(256)) * 4  # every byte value, as a binary attachment would have


def generated(message: EmailMessage) -> bytes:
    """``message().as_bytes()`` with the MIME boundary made deterministic.

    Python's generator picks a random boundary on each call, even for the same
    object; everything else must match exactly.
    """
    random.seed(20240601)
    return bytes(message.message().as_bytes())


def through_json(message: EmailMessage) -> EmailMessage:
    pin_message(message)
    stored = json.loads(json.dumps(message_to_data(message)))
    return message_from_data(stored)


def assert_round_trip(message: EmailMessage) -> EmailMessage:
    rebuilt = through_json(message)
    assert generated(rebuilt) == generated(message)
    assert rebuilt.recipients() == message.recipients()
    return rebuilt


def test_plain_message_round_trips_byte_for_byte() -> None:
    message = EmailMessage("Hello", "Body text\n", "from@example.com", ["to@example.com"])
    rebuilt = assert_round_trip(message)
    assert type(rebuilt) is EmailMessage


def test_non_ascii_subject_body_and_addresses_round_trip() -> None:
    message = EmailMessage(
        "Grüße aus Köln — ünïcødé ✓",
        "Ça marche très bien.\n日本語のテキスト\n",
        "Jürgen Müller <jurgen@exämple.de>",
        ["Zoë <zoe@例え.jp>", "plain@example.com"],
        cc=["Ñandú <nandu@example.es>"],
        bcc=["hidden@example.com"],
        reply_to=["Répondre <reply@example.fr>"],
    )
    assert_round_trip(message)


def test_html_alternative_with_attachments_round_trips() -> None:
    message = EmailMultiAlternatives(
        "Report €",
        "See the attached report.",
        "reports@example.com",
        ["boss@example.com"],
        headers={"X-Campaign": "q3", "List-Unsubscribe": "<mailto:u@example.com>"},
    )
    message.attach_alternative("<p>See the <b>attached</b> report. €</p>", "text/html")
    message.attach("notes.txt", "plain text notes — ünïcødé\n", "text/plain")
    message.attach("chart.png", PNG, "image/png")
    message.attach("résumé.pdf", b"%PDF-1.4 fake", "application/pdf")
    rebuilt = assert_round_trip(message)
    assert isinstance(rebuilt, EmailMultiAlternatives)
    assert rebuilt.attachments[1][1] == PNG


def test_text_bytes_attachment_keeps_its_type() -> None:
    message = EmailMessage("s", "b", "f@example.com", ["t@example.com"])
    message.attach("data.csv", b"a,b\n1,2\n", "text/csv")
    message.attach("blob.txt", b"\xff\xfe not utf-8", "text/plain")  # Django makes it binary
    assert_round_trip(message)


def test_extra_headers_keep_their_order_and_pinned_identity() -> None:
    headers = {"X-Z": "last?", "X-A": "first?", "Auto-Submitted": "auto-generated"}
    message = EmailMessage("s", "b", "f@example.com", ["t@example.com"], headers=headers)
    message_id = pin_message(message)
    data = json.loads(json.dumps(message_to_data(message)))
    assert [name for name, _ in data["headers"]][:3] == ["X-Z", "X-A", "Auto-Submitted"]
    rebuilt = message_from_data(data)
    assert rebuilt.extra_headers["Message-ID"] == message_id
    assert generated(rebuilt) == generated(message)


def test_html_body_and_custom_encoding_round_trip() -> None:
    message = EmailMessage("Café", "<p>Déjà vu</p>", "f@example.com", ["t@example.com"])
    message.content_subtype = "html"
    message.encoding = "iso-8859-1"
    assert_round_trip(message)


def test_forwarded_message_attachment_is_frozen_and_round_trips() -> None:
    inner = EmailMessage("Inner", "Forwarded body", "a@example.com", ["b@example.com"])
    pin_message(inner)
    message = EmailMessage("Fwd", "See below", "f@example.com", ["t@example.com"])
    message.attach("forward.eml", inner, "message/rfc822")
    pin_message(message)
    rebuilt = message_from_data(json.loads(json.dumps(message_to_data(message))))
    data = generated(rebuilt)
    assert b"Forwarded body" in data
    assert generated(message_from_data(message_to_data(rebuilt))) == data


def test_mimebase_attachment_round_trips() -> None:
    part = MIMEText("a ready-made part\n", "plain", "utf-8")
    part.add_header("Content-Disposition", "attachment", filename="part.txt")
    assert isinstance(part, MIMEBase)
    with warnings.catch_warnings():
        # Django 6.0 deprecates MIMEBase attachments (a PendingDeprecationWarning).
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        message = EmailMessage("s", "b", "f@example.com", ["t@example.com"], attachments=[part])
    rebuilt = assert_round_trip(message)
    assert isinstance(rebuilt.attachments[0], MIMEBase)


@pytest.mark.skipif(not DJANGO_6, reason="MIMEPart attachments are new in Django 6.0")
def test_mimepart_attachment_round_trips() -> None:
    part = email.message.MIMEPart()
    part.set_content(b"\x00\x01binary", maintype="application", subtype="octet-stream")
    part.add_header("Content-Disposition", "attachment", filename="raw.bin")
    message = EmailMessage("s", "b", "f@example.com", ["t@example.com"], attachments=[part])
    assert_round_trip(message)


@pytest.mark.skipif(DJANGO_6, reason="Django 6.0 removed mixed_subtype")
def test_changed_mixed_subtype_round_trips() -> None:
    message = EmailMessage("s", "b", "f@example.com", ["t@example.com"])
    message.mixed_subtype = "related"  # type: ignore[attr-defined]
    message.attach("logo.png", PNG, "image/png")
    rebuilt = assert_round_trip(message)
    assert rebuilt.mixed_subtype == "related"  # type: ignore[attr-defined]


def test_nul_and_lone_surrogates_are_stored_without_raw_nul_in_json() -> None:
    message = EmailMessage("s", "before\x00after", "f@example.com", ["t@example.com"])
    message.attach("odd.txt", "x\udcffy", "text/plain")
    pin_message(message)
    data = message_to_data(message)
    text = json.dumps(data)
    assert "\\u0000" not in text and "\\udcff" not in text
    rebuilt = message_from_data(json.loads(text))
    assert rebuilt.body == "before\x00after"
    assert rebuilt.attachments[0][1] == "x\udcffy"


def maybe_lazy(text: str) -> object:
    """Lazy where Django itself can build the part: 6.1 refuses a lazy alternative or
    attachment content (KeyError in the email content manager), 5.2 takes them."""
    return gettext_lazy(text) if django.VERSION < (6, 1) else text


def test_lazy_translations_round_trip_as_their_text() -> None:
    # gettext_lazy strings are what Django projects pass; Django's backends send them.
    message = EmailMultiAlternatives(
        gettext_lazy("Welcome"), gettext_lazy("Body"), "f@example.com", ["t@example.com"]
    )
    message.attach_alternative(maybe_lazy("<p>Body</p>"), "text/html")
    message.attach(gettext_lazy("invoice.txt"), maybe_lazy("Total: 3"), "text/plain")

    rebuilt = assert_round_trip(message)

    assert rebuilt.body == "Body" and type(rebuilt.body) is str
    assert rebuilt.attachments[0][:2] == ("invoice.txt", "Total: 3")


def test_attachment_json_cannot_hold_is_refused_with_a_clear_error() -> None:
    message = EmailMessage("s", "b", "f@example.com", ["t@example.com"])
    message.attachments.append(("data.bin", object(), "application/octet-stream"))
    with pytest.raises(InvalidMessage, match=r"attachment #1 \(data.bin\).*object.*str or bytes"):
        message_to_data(message)


def test_attachment_of_unknown_shape_is_refused() -> None:
    message = EmailMessage("s", "b", "f@example.com", ["t@example.com"])
    message.attachments.append(42)
    with pytest.raises(InvalidMessage, match=r"attachment #1 .*cannot be stored"):
        message_to_data(message)


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        {"version": 99},
        {"version": 1},
        {"version": 1, "kind": "message", "subject": "s", "body": {"nope": 1}},
    ],
)
def test_data_that_is_not_a_stored_message_raises_invalid_message(data: Any) -> None:
    with pytest.raises(InvalidMessage):
        message_from_data(data)


def test_corrupt_base64_raises_invalid_message() -> None:
    message = EmailMessage("s", "b", "f@example.com", ["t@example.com"])
    message.attach("a.bin", b"\x00", "application/octet-stream")
    data = message_to_data(message)
    data["attachments"][0]["content"] = {"bytes": "!!not base64!!"}
    with pytest.raises(InvalidMessage, match="base64"):
        message_from_data(data)


def test_stored_data_is_plain_json_without_pickles() -> None:
    message = EmailMultiAlternatives("s", "b", "f@example.com", ["t@example.com"])
    message.attach_alternative("<p>b</p>", "text/html")
    message.attach("a.bin", b"\x80\x81", "application/octet-stream")
    data = message_to_data(message)
    assert json.loads(json.dumps(data)) == data
    assert data["version"] == 1
    assert data["attachments"][0]["content"] == {"bytes": "gIE="}
