"""A Django ``EmailMessage`` to and from plain JSON, for the outbox. Never pickle.

The contract: for a pinned message (Message-ID and Date in ``extra_headers``,
see :func:`robust_mail.envelope.pin_message`), ``message_from_data(message_to_data(m))``
generates the same bytes as ``m`` itself — same headers in the same order, same
parts, same encodings. MIME boundaries are random in Python's generator, so two
generations of even the *same* object differ there unless the random seed is
fixed; everything else is identical.

What is kept: subject, body, ``content_subtype``, ``encoding``, from / to / cc /
bcc / reply-to, ``extra_headers`` in their order, HTML and other alternatives,
attachments (``(filename, content, mimetype)`` with ``str`` or ``bytes``
content, and ready-made ``MIMEBase`` / ``MIMEPart`` objects, stored as their
bytes), and on Django 5.2 a changed ``mixed_subtype`` / ``alternative_subtype``.
Lazy translations (``gettext_lazy``) are stored as their text in the language active
when the message is stored, as a synchronous send would have rendered them.
What is not: the ``connection`` and any attribute a subclass adds; the message
comes back as an ``EmailMessage`` or an ``EmailMultiAlternatives``.

Ordered things (headers) are stored as lists of pairs because PostgreSQL's
``jsonb`` does not keep the order of object keys.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.message
import email.policy
from collections.abc import Iterable
from email.mime.base import MIMEBase
from typing import Any

from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.core.mail.message import EmailAlternative, EmailAttachment
from django.utils.encoding import force_str
from django.utils.functional import Promise

from robust_mail.exceptions import InvalidMessage

__all__ = ["FORMAT_VERSION", "message_from_data", "message_to_data"]

#: Bumped when the layout changes; ``message_from_data`` refuses versions it does not know.
FORMAT_VERSION = 1

_KIND_PLAIN = "message"
_KIND_ALTERNATIVES = "alternatives"


# --- values ----------------------------------------------------------------------------


def _resolved(value: Any) -> Any:
    """``value`` with a lazy translation (``gettext_lazy``) turned into its text.

    Django's backends send lazy strings (they are str() when the message is built), so
    the outbox must take them too: resolved now, in the active language, as a synchronous
    send would have rendered them.
    """
    return force_str(value) if isinstance(value, Promise) else value


def _pack(value: Any, what: str) -> dict[str, str]:
    """A str or bytes value as a JSON object that gives back exactly the same value."""
    value = _resolved(value)
    if isinstance(value, str):
        if "\x00" in value or not _utf8_clean(value):
            # PostgreSQL refuses NUL and lone surrogates in jsonb: carry the code points
            # through base64 instead.
            raw = value.encode("utf-8", "surrogatepass")
            return {"text_b64": base64.b64encode(raw).decode("ascii")}
        return {"text": value}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"bytes": base64.b64encode(bytes(value)).decode("ascii")}
    raise InvalidMessage(
        f"{what} of type {type(value).__name__} cannot be stored in the outbox: use str or bytes"
    )


def _utf8_clean(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unpack(data: Any) -> str | bytes:
    if not isinstance(data, dict):
        raise InvalidMessage(f"stored value {data!r} is not an object")
    if "text" in data:
        return str(data["text"])
    if "text_b64" in data:
        return _b64(data["text_b64"]).decode("utf-8", "surrogatepass")
    if "bytes" in data:
        return _b64(data["bytes"])
    raise InvalidMessage(f"stored value has no known content key: {sorted(data)}")


def _b64(text: Any) -> bytes:
    try:
        return base64.b64decode(str(text), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidMessage(f"stored base64 is corrupt: {exc}") from exc


def _strings(values: Iterable[Any] | None) -> list[str]:
    # Django itself turns each address with str() when it builds the headers.
    return [force_str(v) for v in (values or [])]


# --- attachments ------------------------------------------------------------------------


def _pack_attachment(attachment: Any, index: int) -> dict[str, Any]:
    what = f"attachment #{index + 1}"
    if isinstance(attachment, MIMEBase):
        # Generating also fixes a multipart attachment's boundary on the original
        # object, so the caller's own later generations match the stored bytes.
        return {"mimebase": _pack(attachment.as_bytes(), what)["bytes"]}
    if isinstance(attachment, email.message.MIMEPart):
        return {"mimepart": _pack(attachment.as_bytes(), what)["bytes"]}
    if not isinstance(attachment, tuple | list) or len(attachment) not in (2, 3):
        raise InvalidMessage(
            f"{what} ({type(attachment).__name__}) cannot be stored in the outbox: expected "
            "(filename, content, mimetype) or a MIME part"
        )
    filename, content, mimetype = (*attachment, None) if len(attachment) == 2 else attachment
    filename = _resolved(filename)
    if filename is not None and not isinstance(filename, str):
        if not (isinstance(filename, tuple | list) and all(isinstance(p, str) for p in filename)):
            raise InvalidMessage(f"{what}: filename {filename!r} is not a string")
        filename = list(filename)
    if mimetype is not None:
        mimetype = force_str(mimetype)
    if isinstance(content, EmailMessage):
        # A forwarded Django message: freeze it now (it would get a new Message-ID and
        # Date each time it is generated).
        content = content.message().as_bytes()
    elif isinstance(content, email.message.Message):
        content = content.as_bytes()
    name = f"{what} ({filename})" if isinstance(filename, str) else what
    return {"filename": filename, "content": _pack(content, name), "mimetype": mimetype}


class _RestoredMIMEBase(MIMEBase):
    """A ``MIMEBase`` that the parser can create without arguments (it sets the headers)."""

    def __init__(self) -> None:
        email.message.Message.__init__(self)


def _unpack_attachment(data: Any) -> Any:
    if not isinstance(data, dict):
        raise InvalidMessage(f"stored attachment {data!r} is not an object")
    if "mimebase" in data:
        return email.message_from_bytes(_b64(data["mimebase"]), _class=_RestoredMIMEBase)
    if "mimepart" in data:
        return email.message_from_bytes(_b64(data["mimepart"]), policy=email.policy.default)
    filename: Any = data.get("filename")
    if isinstance(filename, list):
        filename = tuple(filename)
    mimetype: Any = data.get("mimetype")
    return EmailAttachment(filename, _unpack(data.get("content")), mimetype)


# --- messages ---------------------------------------------------------------------------


def message_to_data(message: EmailMessage) -> dict[str, Any]:
    """The message as JSON-ready data. Raises :class:`InvalidMessage` for what JSON can't hold.

    Pin the message first (:func:`~robust_mail.envelope.pin_message`) so the
    stored copy carries the Message-ID and Date the caller's copy has.
    """
    alternatives = getattr(message, "alternatives", None)
    is_multi = isinstance(message, EmailMultiAlternatives) or alternatives is not None
    data: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "kind": _KIND_ALTERNATIVES if is_multi else _KIND_PLAIN,
        "subject": force_str(message.subject),
        "body": _pack(message.body if message.body is not None else "", "the body"),
        "content_subtype": force_str(message.content_subtype),
        "encoding": None if message.encoding is None else force_str(message.encoding),
        "from_email": force_str(message.from_email),
        "to": _strings(message.to),
        "cc": _strings(message.cc),
        "bcc": _strings(message.bcc),
        "reply_to": _strings(message.reply_to),
        "headers": [[force_str(k), force_str(v)] for k, v in message.extra_headers.items()],
        "alternatives": [
            {
                "content": _pack(content, f"alternative #{i + 1} ({mimetype})"),
                "mimetype": force_str(mimetype),
            }
            for i, (content, mimetype) in enumerate(alternatives or [])
        ],
        "attachments": [_pack_attachment(a, i) for i, a in enumerate(message.attachments)],
    }
    # Django 5.2 lets a message change these; 6.0 removed them (and refuses them if set).
    for attribute, default in (("mixed_subtype", "mixed"), ("alternative_subtype", "alternative")):
        value = getattr(message, attribute, default)
        if value != default:
            data[attribute] = force_str(value)
    return data


def message_from_data(data: Any) -> EmailMessage:
    """Rebuild the message stored by :func:`message_to_data`.

    Raises :class:`InvalidMessage` when the data is not a message this version
    can rebuild (a poison row): the caller marks it failed rather than retrying.
    """
    if not isinstance(data, dict):
        raise InvalidMessage(f"stored message is a {type(data).__name__}, not an object")
    version = data.get("version")
    if version != FORMAT_VERSION:
        raise InvalidMessage(f"stored message has format version {version!r}; expected 1")
    try:
        return _rebuild(data)
    except InvalidMessage:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidMessage(f"stored message cannot be rebuilt: {exc!r}") from exc


def _rebuild(data: dict[str, Any]) -> EmailMessage:
    cls = EmailMultiAlternatives if data["kind"] == _KIND_ALTERNATIVES else EmailMessage
    message = cls(
        subject=data["subject"],
        from_email=data["from_email"],
        to=list(data["to"]),
        cc=list(data["cc"]),
        bcc=list(data["bcc"]),
        reply_to=list(data["reply_to"]),
    )
    # Assigned after construction so that nothing is normalised twice: these are the
    # values the original message held after its own constructor and attach() ran.
    message.from_email = str(data["from_email"])
    message.body = _unpack(data["body"])  # type: ignore[assignment]
    message.extra_headers = {str(k): str(v) for k, v in data["headers"]}
    message.content_subtype = str(data["content_subtype"])
    if data.get("encoding") is not None:
        message.encoding = str(data["encoding"])
    message.attachments = [_unpack_attachment(a) for a in data["attachments"]]
    if isinstance(message, EmailMultiAlternatives):
        message.alternatives = [
            EmailAlternative(_unpack(a["content"]), str(a["mimetype"]))
            for a in data["alternatives"]
        ]
    for attribute in ("mixed_subtype", "alternative_subtype"):
        # Only where this Django still has the attribute (5.2): 6.0 rejects it outright.
        if attribute in data and hasattr(message, attribute):
            setattr(message, attribute, str(data[attribute]))
    return message


def redacted(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with every body, alternative and attachment erased; headers kept.

    For sensitive messages once they are sent, failed or dead: what remains says what
    the message was without keeping the secret it carried.
    """
    return {
        **data,
        "body": _pack("", "the body"),
        "alternatives": [],
        "attachments": [],
        "redacted": True,
    }
