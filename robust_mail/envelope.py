"""Turn a Django ``EmailMessage`` into what goes on the wire, once per message.

The Message-ID and Date are pinned into the message's own headers before the
first attempt, so every retry, every provider and the outbox send the very
same message. Building fails with :class:`InvalidMessage` before any network
traffic, so a bad address or an injected header never leaves a message
half-sent.
"""

from __future__ import annotations

import email.errors
import email.policy
import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.headerregistry import Address, AddressHeader
from email.utils import formatdate, make_msgid
from typing import Any

import idna
from django.conf import settings
from django.core.mail import EmailMessage
from django.core.mail.message import DNS_NAME  # type: ignore[attr-defined]
from django.utils.encoding import force_str

from robust_mail.exceptions import InvalidMessage

_BUILD_ERRORS = (ValueError, TypeError, UnicodeError, email.errors.MessageError)


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope and the exact bytes of one message."""

    from_addr: str
    recipients: tuple[str, ...]
    data: bytes
    message_id: str

    @property
    def needs_smtputf8(self) -> bool:
        return not all(a.isascii() for a in (self.from_addr, *self.recipients))


def _header(message: EmailMessage, name: str) -> str | None:
    for key, value in message.extra_headers.items():
        if key.lower() == name.lower():
            return str(value)
    return None


#: Attribute holding the headers robust_mail pinned on a message, so a later send of the
#: same object (``msg.to = [x]; msg.send()`` in a loop) gets a fresh identity.
_PINNED = "_robust_mail_pinned"


def pin_message(message: EmailMessage) -> str:
    """Give ``message`` a fixed Message-ID and Date (if it has none) and return the Message-ID.

    Django generates both afresh each time ``message()`` is called; pinning
    them in ``extra_headers`` makes every attempt carry the same identity, so
    a receiver (or a person) can recognise a duplicate. The headers dict is
    copied first: Django keeps the caller's ``headers=`` dict as it is, and it
    may be shared with other messages.
    """
    added: dict[str, str] = {}
    message_id = _header(message, "Message-ID")
    if message_id is None:
        message_id = added["Message-ID"] = make_msgid(domain=str(DNS_NAME))
    if _header(message, "Date") is None:
        use_localtime = bool(getattr(settings, "EMAIL_USE_LOCALTIME", False))
        added["Date"] = formatdate(localtime=use_localtime)
    if added:
        message.extra_headers = {**message.extra_headers, **added}
        setattr(message, _PINNED, {**getattr(message, _PINNED, {}), **added})
    return message_id


def release_pins(message: EmailMessage) -> None:
    """Forget the Message-ID and Date an earlier send pinned: this is a new send.

    Headers the caller set are kept; only values robust_mail added are removed.
    """
    pinned: dict[str, str] = getattr(message, _PINNED, {})
    if not pinned:
        return
    message.extra_headers = {
        key: value for key, value in message.extra_headers.items() if pinned.get(key) != value
    }
    delattr(message, _PINNED)


def prep_address(address: Any) -> str:
    """The addr-spec of one address, IDNA-encoding a non-ASCII domain.

    A non-ASCII local part is kept (it needs a server offering SMTPUTF8; the
    transport checks). Raises :class:`InvalidMessage` for anything that is not
    exactly one valid address, including CR/LF injection.
    """
    return _prep_text(force_str(address))


def _idna_2008(domain: str) -> str | None:
    """``domain`` as IDNA 2008 (UTS #46, non-transitional) encodes it; None when it cannot."""
    try:
        return str(idna.encode(domain, uts46=True, transitional=False).decode("ascii"))
    except (idna.IDNAError, UnicodeError):
        return None  # not a name IDNA 2008 allows: IDNA 2003's answer is all there is


@functools.lru_cache(maxsize=1024)
def _prep_text(text: str) -> str:
    # Parsing an address with the email package costs more than sending a small message
    # to a warm connection; senders and frequent recipients recur, so remember the answers
    # (only good ones: a refusal raises and is not cached).
    if "\r" in text or "\n" in text:
        raise InvalidMessage(f"invalid address {text!r}: line breaks are not allowed")
    try:
        parsed = AddressHeader.value_parser(text)
        defects = {str(d) for d in parsed.all_defects}
        mailboxes = parsed.all_mailboxes
    except Exception as exc:
        # Not only ValueError: the parser trips over some malformed input with IndexError
        # ("a@") or AttributeError ("a@["), which must not escape as a crash of the batch.
        raise InvalidMessage(f"invalid address {text!r}: {exc}") from exc
    # Django allows local mailboxes such as "webmaster" (no domain).
    defects.discard("addr-spec local part with no domain")
    defects = {d for d in defects if "non-ASCII" not in d}
    if defects:
        raise InvalidMessage(f"invalid address {text!r}: {'; '.join(sorted(defects))}")
    if len(mailboxes) != 1:
        raise InvalidMessage(f"invalid address {text!r}: must be a single address")
    mailbox = mailboxes[0]
    local, domain = mailbox.local_part or "", mailbox.domain or ""
    if domain and not domain.isascii():
        # The envelope decides where mail goes: IDNA 2008 (UTS #46), as registries and
        # resolvers do today. IDNA 2003 (Python's codec, and Django's headers) maps "faß.de"
        # to fass.de, another domain whose owner would get the mail (a one-time code, say).
        # A name only IDNA 2003 allows (symbols) keeps its IDNA 2003 form.
        current = _idna_2008(domain)
        if current is None:
            try:
                current = domain.encode("idna").decode("ascii")
            except UnicodeError as exc:
                raise InvalidMessage(f"invalid address {text!r}: bad domain ({exc})") from exc
        domain = current
    if not domain:
        return local
    # Address() re-quotes a local part that needs it ("a@b;"@corp.example): joining the
    # bare parts would let smtplib re-parse it into a different envelope recipient.
    return Address(username=local, domain=domain).addr_spec


def _message_bytes(message: EmailMessage) -> bytes:
    # Django 6.0+ accepts a policy and produces CRLF with email.policy.SMTP;
    # 5.2 takes no argument and needs linesep given to as_bytes(). Typed as Any: each
    # Django's stubs know only one of the two signatures.
    build: Any = message.message
    if _takes_policy(type(message).message):
        return bytes(build(policy=email.policy.SMTP).as_bytes())
    return bytes(build().as_bytes(linesep="\r\n"))


@functools.cache
def _takes_policy(method: Callable[..., Any]) -> bool:
    # Once per message class: inspect.signature costs more than building a small message.
    return "policy" in inspect.signature(method).parameters


#: RFC 5322 field names: printable ASCII but the colon.
_FIELD_NAME = re.compile(r"[!-9;-~]+")


def _check_header_names(message: EmailMessage) -> None:
    # Django checks header values for line breaks, not names: a name holding "\r\n" wrote
    # a header of the caller's choosing (harmful where names come from user input).
    for name in message.extra_headers:
        if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
            raise InvalidMessage(f"invalid header name {name!r}: printable ASCII, no colon")


def _header_texts(message: EmailMessage) -> list[tuple[str, Any]]:
    """Every value that ends up in a header field, with what to call it in an error.

    Not the sender and recipients: :func:`prep_address` has refused a NUL in those already.
    """
    texts: list[tuple[str, Any]] = [("subject", message.subject)]
    texts.extend(("reply_to", address) for address in getattr(message, "reply_to", None) or ())
    texts.extend((f"header {name!r}", value) for name, value in message.extra_headers.items())
    for index, (_, mimetype) in enumerate(getattr(message, "alternatives", None) or ()):
        texts.append((f"alternative #{index + 1} mimetype", mimetype))
    for index, attachment in enumerate(message.attachments):
        if not isinstance(attachment, tuple | list) or not attachment:
            continue  # a ready-made MIME part: its headers are the caller's own bytes
        what = f"attachment #{index + 1}"
        filename = attachment[0]
        parts = filename if isinstance(filename, tuple | list) else (filename,)
        texts.extend((f"{what} filename", part) for part in parts)
        if len(attachment) == 3:
            texts.append((f"{what} mimetype", attachment[2]))
    return texts


def _check_no_nul(message: EmailMessage) -> None:
    # RFC 5322 forbids NUL in a header field, yet Django writes it raw onto the wire; and
    # PostgreSQL refuses NUL in text, so the outbox's INSERT would fail and read as the
    # database being down (retried forever) when it is the message that is wrong.
    for what, value in _header_texts(message):
        if value is None:
            continue
        text = value if isinstance(value, str) else force_str(value, errors="replace")
        if "\x00" in text:
            raise InvalidMessage(
                f"the {what} contains a NUL character (\\x00), which is not allowed in a header"
            )


def build_envelope(message: EmailMessage, *, data: bytes | None = None) -> Envelope:
    """Pin the message and build its envelope; raise :class:`InvalidMessage` if it can't be sent.

    ``data``: the message's bytes as an earlier build of this same message produced them
    (the outbox keeps them), used instead of rendering the message again.
    """
    message_id = pin_message(message)
    recipients_raw = message.recipients()
    if not recipients_raw:
        raise InvalidMessage("the message has no recipients (to, cc and bcc are all empty)")
    from_addr = prep_address(message.from_email or settings.DEFAULT_FROM_EMAIL)
    # The same address twice (to and cc, say) is one RCPT: servers refuse duplicates or
    # count them twice, and a refusal must be judged per mailbox.
    recipients = tuple(dict.fromkeys(prep_address(r) for r in recipients_raw))
    if data is None:
        _check_header_names(message)
        _check_no_nul(message)
        try:
            data = _message_bytes(message)
        except _BUILD_ERRORS as exc:
            raise InvalidMessage(f"the message cannot be built: {exc}") from exc
    return Envelope(from_addr, recipients, data, message_id)
