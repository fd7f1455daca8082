"""What the test SMTP server keeps of each message it accepted."""

from __future__ import annotations

import datetime
import email.policy
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser


@dataclass(frozen=True)
class ReceivedMessage:
    """One message as the server received it.

    ``data`` is the content exactly as transmitted (dot-unstuffed, CRLF line
    ends); ``message`` is the same bytes parsed with ``email.policy.default``
    after turning CRLF into LF, so ``get_content()`` reads like Python text.
    ``chunked`` is True for a message sent with BDAT (CHUNKING) rather than DATA.
    """

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool = False
    auth_user: str | None = None
    chunked: bool = False
    received_at: datetime.datetime = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC)
    )
    message: EmailMessage = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parsed = BytesParser(policy=email.policy.default).parsebytes(
            self.data.replace(b"\r\n", b"\n")
        )
        assert isinstance(parsed, EmailMessage)
        # Frozen: the parsed form is derived once, here.
        object.__setattr__(self, "message", parsed)

    @property
    def message_id(self) -> str | None:
        """The ``Message-ID`` header, or ``None`` when the message has none."""
        value = self.message["Message-ID"]
        return None if value is None else str(value).strip()

    @property
    def subject(self) -> str | None:
        value = self.message["Subject"]
        return None if value is None else str(value)
