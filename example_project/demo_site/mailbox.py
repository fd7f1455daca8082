"""Read what the local SMTP servers received, for people: headers and the decoded text."""

from __future__ import annotations

from dataclasses import dataclass
from email.message import EmailMessage

from robust_mail.testing import ReceivedMessage


@dataclass(frozen=True)
class MailView:
    number: int
    subject: str
    sender: str
    recipients: str
    date: str
    message_id: str
    received_at: str
    text: str
    has_html: bool


def text_of(message: EmailMessage) -> str:
    """The plain-text body, else the HTML source, else an empty string."""
    body = message.get_body(preferencelist=("plain", "html"))
    if body is None:
        return ""
    try:
        return str(body.get_content())
    except (KeyError, LookupError, ValueError):  # an unknown charset or a broken part
        payload = body.get_payload(decode=True)
        return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""


def has_html(message: EmailMessage) -> bool:
    return any(part.get_content_type() == "text/html" for part in message.walk())


def view(number: int, received: ReceivedMessage) -> MailView:
    message = received.message
    return MailView(
        number=number,
        subject=received.subject or "(no subject)",
        sender=str(message["From"] or received.mail_from),
        recipients=", ".join(received.rcpt_tos),
        date=str(message["Date"] or ""),
        message_id=received.message_id or "",
        received_at=received.received_at.strftime("%H:%M:%S"),
        text=text_of(message),
        has_html=has_html(message),
    )


def newest_first(messages: list[ReceivedMessage], limit: int = 50) -> list[MailView]:
    numbered = list(enumerate(messages, 1))[-limit:]
    return [view(number, received) for number, received in reversed(numbered)]
