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
    It is parsed on first use, not when the message arrives: parsing costs the
    server more than receiving does, and most messages of a long run are only
    counted.
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

    # Kept in the instance's __dict__, written directly (a frozen dataclass allows it);
    # not a field, so equality and repr ignore it. Not functools.cached_property: from
    # Python 3.12 it has no lock, and threads reading it at once each got their own parse.
    # Threads may still parse at the same time, but setdefault() is atomic: every one
    # returns the first object stored.
    @property
    def message(self) -> EmailMessage:
        try:
            return self.__dict__["message"]
        except KeyError:
            pass
        parsed = BytesParser(policy=email.policy.default).parsebytes(
            self.data.replace(b"\r\n", b"\n")
        )
        assert isinstance(parsed, EmailMessage)
        return self.__dict__.setdefault("message", parsed)

    @property
    def message_id(self) -> str | None:
        """The ``Message-ID`` header, or ``None`` when the message has none."""
        value = self.message["Message-ID"]
        return None if value is None else str(value).strip()

    @property
    def subject(self) -> str | None:
        value = self.message["Subject"]
        return None if value is None else str(value)
