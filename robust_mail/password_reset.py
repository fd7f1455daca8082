"""Password reset by emailed code, without telling anyone whether an account exists.

Flow: ``initiate(email)`` → the user gets a code → ``verify(email, code)`` returns a
short-lived signed token → ``complete(token, new_password)`` sets the password.

Enumeration: ``initiate`` does the same work for every well-formed address — one user
query, one code generated, hashed and stored (so the issue limits apply to unknown
addresses exactly as to known ones), the email rendered — and only at the very end either
queues the email (an account exists) or drops it. Queueing is one INSERT into the
outbox, so the response time does not depend on SMTP. The token is signed with
``django.core.signing`` and bound to an HMAC of the user's password hash and last login,
so it stops working once used (or once the user signs in), like Django's own
``PasswordResetTokenGenerator``.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model, password_validation
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.hashers import make_password
from django.core import signing
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.utils.crypto import constant_time_compare, salted_hmac

from robust_mail.exceptions import RobustMailError
from robust_mail.otp import IssuedCode, OTPService, mask, normalize_identifier

__all__ = [
    "PasswordResetService",
    "ResetTokenInvalid",
    "issue_account_code",
    "users_with_email",
]

logger = logging.getLogger("robust_mail.otp")

PURPOSE = "password_reset"
TOKEN_SALT = "robust_mail.password_reset.token"  # noqa: S105 - a salt, not a secret


class ResetTokenInvalid(RobustMailError, ValueError):
    """The reset token is malformed, expired, or already used."""


def users_with_email(email: str, *, usable_password: bool = True) -> list[Any]:
    """Active users with this address (case-insensitive).

    Like Django's PasswordResetForm, users without a usable password are left out unless
    ``usable_password=False`` (sign-in by code does not need a password).
    """
    user_model = get_user_model()
    field = user_model.get_email_field_name()
    users = user_model._default_manager.filter(**{f"{field}__iexact": email, "is_active": True})
    return [u for u in users if not usable_password or u.has_usable_password()]


def issue_account_code(
    otp: OTPService,
    email: str,
    purpose: str,
    *,
    ip_address: str | None = None,
    user_agent: str = "",
    background: bool = True,
    usable_password: bool = True,
) -> IssuedCode:
    """Issue and email a code if an account has ``email``; the same work if none has.

    Raises ``ValueError`` for a malformed address and :class:`RateLimited` over a limit —
    both independent of whether an account exists. Delivery errors can only happen for
    existing accounts: callers must report them like success (see docs/otp.md).
    """
    address = normalize_identifier(email)
    try:
        validate_email(address)
    except ValidationError:
        raise ValueError("not an email address") from None
    exists = bool(users_with_email(address, usable_password=usable_password))
    return otp.issue(
        address,
        purpose,
        ip_address=ip_address,
        user_agent=user_agent,
        background=background,
        discard=not exists,
    )


class PasswordResetService:
    """``initiate`` / ``verify`` / ``complete``. ``token_max_age`` defaults to the OTP TTL.

    ``background=False`` sends synchronously instead of through the outbox — for tests and
    projects without workers; it makes the response time reveal whether an account exists.
    """

    purpose = PURPOSE

    def __init__(
        self,
        *,
        otp: OTPService | None = None,
        token_max_age: float | None = None,
        background: bool = True,
    ) -> None:
        self.otp = otp or OTPService()
        self.token_max_age = token_max_age or self.otp.config.ttl
        self.background = background

    def initiate(self, email: str, *, ip_address: str | None = None, user_agent: str = "") -> None:
        """Email a reset code if an account has ``email``. Returns None either way.

        Raises ``ValueError`` (malformed address) or :class:`RateLimited`, identically
        for known and unknown addresses.
        """
        issue_account_code(
            self.otp,
            email,
            self.purpose,
            ip_address=ip_address,
            user_agent=user_agent,
            background=self.background,
        )

    def verify(self, email: str, code: object, *, ip_address: str | None = None) -> str | None:
        """A single-use reset token when ``code`` is right, else None (never raises)."""
        result = self.otp.verify(email, code, self.purpose, ip_address=ip_address)
        if not result.ok:
            return None
        users = users_with_email(normalize_identifier(email))
        if len(users) != 1:
            # Several accounts share the address (or it was just deleted): refuse rather
            # than guess whose password to reset.
            logger.warning("reset code for %s matches %d accounts", mask(email), len(users))
            return None
        return self.make_token(users[0])

    # -- tokens ---------------------------------------------------------------------------

    @staticmethod
    def _state(user: AbstractBaseUser) -> str:
        # An HMAC, not the hash itself: a signed token's payload is readable.
        last_login = "" if user.last_login is None else user.last_login.replace(microsecond=0)
        value = f"{user.pk}|{user.password}|{last_login}"
        return salted_hmac(TOKEN_SALT, value, algorithm="sha256").hexdigest()[:32]

    def make_token(self, user: AbstractBaseUser) -> str:
        return signing.dumps({"u": str(user.pk), "s": self._state(user)}, salt=TOKEN_SALT)

    def user_for_token(self, token: str) -> Any:
        """The user a live token belongs to; raises :class:`ResetTokenInvalid`."""
        try:
            data = signing.loads(
                str(token), salt=TOKEN_SALT, max_age=timedelta(seconds=self.token_max_age)
            )
            user_model = get_user_model()
            user = user_model._default_manager.get(pk=data["u"], is_active=True)
        except (signing.BadSignature, KeyError, TypeError, ValueError, LookupError):
            raise ResetTokenInvalid("the reset link or code is invalid or has expired") from None
        except get_user_model().DoesNotExist:
            raise ResetTokenInvalid("the reset link or code is invalid or has expired") from None
        if not constant_time_compare(str(data.get("s", "")), self._state(user)):
            raise ResetTokenInvalid("the reset link or code is invalid or has expired")
        return user

    def complete(self, token: str, new_password: str) -> Any:
        """Validate and set ``new_password``; the token and every old session die with it.

        Raises :class:`ResetTokenInvalid` or Django's ``ValidationError`` (from the
        project's ``AUTH_PASSWORD_VALIDATORS``). Old sessions stop working because
        Django checks each session's stored password-hash HMAC on every request.
        """
        user = self.user_for_token(token)
        password_validation.validate_password(new_password, user)
        old_hash = user.password
        new_hash = make_password(new_password)
        # Conditional UPDATE: of two concurrent completions with one token, one wins.
        updated = (
            type(user)
            ._default_manager.filter(pk=user.pk, password=old_hash)
            .update(password=new_hash)
        )
        if updated != 1:
            raise ResetTokenInvalid("the reset link or code is invalid or has expired")
        user.password = new_hash
        password_validation.password_changed(new_password, user)
        email = getattr(user, user.get_email_field_name(), "") or ""
        if email:
            self.otp.invalidate(email, self.purpose)
        logger.info("password reset completed for user %s", user.pk)
        return user
