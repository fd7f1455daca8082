"""The pieces of a one-time password: alphabets, input rules, and the keyed hash.

Plain functions, shared by :mod:`robust_mail.otp` and the stores' tests.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata
from typing import Any

from django.conf import settings

from robust_mail.conf import OTPConfig

__all__ = [
    "ALPHANUMERIC",
    "DIGITS",
    "MAX_CODE_INPUT",
    "SecretCode",
    "SecretText",
    "check_purpose",
    "code_keys",
    "digest",
    "mask",
    "normalize_identifier",
]

DIGITS = "0123456789"
#: Upper-case letters and digits without the look-alikes 0/O, 1/I/L.
ALPHANUMERIC = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
PURPOSE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
MAX_IDENTIFIER = 254
#: Longer input is not even normalised: nobody types 64 characters for a 6-digit code.
MAX_CODE_INPUT = 64
_KEY_SALT = b"robust_mail.otp.code-key.v1"


class SecretCode(str):
    """A code that keeps out of ``repr()`` (tracebacks with locals, debuggers, logs)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "SecretCode('******')"


class SecretText(str):
    """Text with a code in it (a rendered email body), equally kept out of ``repr()``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "SecretText('<withheld: contains a one-time code>')"


def normalize_identifier(identifier: Any) -> str:
    """An email address or any user with an email field → its comparison form.

    The comparison form is NFKC, stripped, then case-folded: two addresses are the same
    identifier exactly when their forms are equal (``Alice@Example.com``, ``alice@example.com``
    and NFD-typed accents agree; the dotless i, U+0131, stays itself, unlike in PostgreSQL's
    ``UPPER()``). Case folding is Unicode's caseless matching, which is what "compared
    case-insensitively" means; it is for comparing and keying only — mail goes to the
    address as stored (see :mod:`robust_mail.password_reset`).

    Raises ``ValueError`` for empty or over-long identifiers.
    """
    if hasattr(identifier, "get_email_field_name"):
        identifier = getattr(identifier, identifier.get_email_field_name(), "") or ""
    if not isinstance(identifier, str):
        raise ValueError("an identifier is an email address (str) or a user")
    value = identifier.strip()
    if len(value) > 4 * MAX_IDENTIFIER:
        # Decomposed input may be longer than its normalised form, but not by this much;
        # and normalising megabytes of user input is not free.
        raise ValueError("an identifier must be 1 to 254 characters")
    value = unicodedata.normalize("NFKC", value).strip().casefold()
    if not value or len(value) > MAX_IDENTIFIER:
        raise ValueError("an identifier must be 1 to 254 characters")
    return value


def check_purpose(purpose: str) -> str:
    """Purposes are lower-case slugs (``login``, ``password_reset``, a project's own)."""
    if not isinstance(purpose, str) or not PURPOSE.fullmatch(purpose):
        raise ValueError("a purpose is a lower-case slug of 1 to 64 characters, e.g. 'login'")
    return purpose


def code_keys(config: OTPConfig) -> list[bytes]:
    """The HMAC keys: SECRET, or keys derived from SECRET_KEY and its fallbacks.

    The first key hashes new codes; all of them verify, so rotating SECRET_KEY (with the
    old one in SECRET_KEY_FALLBACKS) does not break codes already sent.
    """
    if config.secret:
        return [config.secret.encode()]
    secrets_ = [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]
    return [hmac.new(str(s).encode(), _KEY_SALT, hashlib.sha256).digest() for s in secrets_]


def digest(key: bytes, identifier: str, purpose: str, code: str) -> str:
    data = "\x00".join(("robust_mail.otp", purpose, identifier, code)).encode()
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def mask(identifier: str) -> str:
    """``alice@example.com`` → ``a***@example.com`` for log lines."""
    local, at, domain = identifier.partition("@")
    return f"{local[:1]}***{at}{domain}"
