"""Password reset by emailed code, without telling anyone whether an account exists.

Flow: ``initiate(email)`` → the user gets a code → ``verify(email, code)`` returns a
short-lived signed token → ``complete(token, new_password)`` sets the password.

Accounts by address (cf. Django's CVE-2019-19844): the database's case-insensitive
match (``email__iexact``) only finds candidates — PostgreSQL's ``UPPER()`` makes
``boss@gma<U+0131>l.com`` (a dotless i: someone else's domain) equal ``boss@gmail.com``
— so :func:`users_with_email` keeps only users whose stored address has the same
:func:`~robust_mail.otp_codes.normalize_identifier` form (NFKC + case folding) as the one
typed. A code for an account is then bound to that account's stored address and emailed
to the stored address, never to the text typed; and when several accounts match, none
gets a code.

Enumeration: ``initiate`` does the same work for every well-formed address — one user
query, one code generated, hashed and stored (so the issue limits apply to unknown
addresses exactly as to known ones), the email rendered, built and serialised, and one
row inserted in a transaction of its own. That row is the outbox row when exactly one
account may use the code (its code email) and, by default, when none may (the "no code"
notice, ``OTP["NOTIFY_UNKNOWN"]``: no account, an inactive one, one without a usable
password for a reset, or several sharing the address); with notices off or past
``MAX_NOTICES_PER_HOUR``, a decoy row in the code table (see :meth:`OTPService.issue`,
``discard``). The response time does not depend on SMTP. The token is signed with
``django.core.signing`` and bound to an HMAC of the user's password hash and last login,
so it stops working once used (or once the user signs in), like Django's own
``PasswordResetTokenGenerator``.
"""

from __future__ import annotations

import logging
import unicodedata
from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model, password_validation
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.hashers import make_password
from django.core import signing
from django.core.exceptions import FieldDoesNotExist, ValidationError
from django.core.validators import validate_email
from django.utils.crypto import constant_time_compare, salted_hmac
from django.views.decorators.debug import sensitive_variables

from robust_mail.classcall import class_or_instance
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


def users_with_email(
    email: str, *, usable_password: bool = True, active_only: bool = True
) -> list[Any]:
    """Active users whose stored address *is* ``email``, compared case-insensitively.

    The database's ``iexact`` finds candidates; only those whose stored address has the
    same :func:`normalize_identifier` form as ``email`` are kept, since databases fold
    case more loosely (PostgreSQL upper-cases U+0131, a dotless i, to ``I``). A database
    that folds less (SQLite's ``LIKE`` folds ASCII only) can only find fewer accounts,
    never others.
    Like Django's PasswordResetForm, users without a usable password are left out unless
    ``usable_password=False`` (sign-in by code does not need a password), and inactive
    ones unless ``active_only=False``.
    """
    try:
        wanted = normalize_identifier(email)
    except ValueError:
        return []
    user_model = get_user_model()
    field = user_model.get_email_field_name()
    # NFKC (not case-folded: the database folds case its own way) so that full-width or
    # decomposed input still finds the stored, composed address.
    typed = unicodedata.normalize("NFKC", str(email)).strip()
    where: dict[str, Any] = {f"{field}__iexact": typed}
    if active_only and _has_active_field(user_model):
        where["is_active"] = True
    candidates = list(user_model._default_manager.filter(**where))
    found = bool(candidates)
    if not found:
        # Build and check one user anyway, as a known address has one built from its row:
        # a few hundredths of a millisecond that would otherwise tell the two apart.
        try:
            candidates = [user_model(**{field: typed})]
        except Exception:  # a custom model refusing a bare instance must not 500 only here
            logger.debug("cannot build a stand-in %s", user_model.__name__)
    matches = [
        user
        for user in candidates
        if _same_address(getattr(user, field, None), wanted)
        and (not usable_password or user.has_usable_password())
        # A model without the field may still say so (a property; AbstractBaseUser: True).
        and (not active_only or getattr(user, "is_active", True))
    ]
    return matches if found else []


def _has_active_field(user_model: Any) -> bool:
    """Whether ``is_active`` is a database field of ``user_model``, so a query can filter
    on it. AbstractBaseUser has it only as a class attribute (always True); a custom model
    may have a property or nothing: those are checked in Python instead."""
    try:
        field = user_model._meta.get_field("is_active")
    except FieldDoesNotExist:
        return False
    return bool(getattr(field, "concrete", False))


def _same_address(stored: Any, wanted: str) -> bool:
    if not isinstance(stored, str):
        return False
    try:
        return normalize_identifier(stored) == wanted
    except ValueError:
        return False


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
    """Issue and email a code if exactly one account may use it; the same work if not.

    The code is bound to the account's stored address and sent there — never to the
    address as typed. With no such account (none has the address, it is inactive, it has
    no usable password where ``usable_password`` asks for one, or several share the
    address: whose would it be?), the same work is done for the typed address, which gets
    the "no code" notice instead (``OTP["NOTIFY_UNKNOWN"]``) or nothing.

    Raises ``ValueError`` for a malformed address and :class:`RateLimited` over a limit —
    both independent of whether an account exists. Delivery errors can only happen for
    existing accounts: callers must report them like success (see docs/otp.md).
    """
    address = str(email).strip() if isinstance(email, str) else ""
    try:
        normalize_identifier(address)
        validate_email(address)
    except (ValueError, ValidationError):
        raise ValueError("not an email address") from None
    # One query either way (the same SQL whatever the answer); the checks are ours.
    everyone = users_with_email(address, usable_password=False, active_only=False)
    users = [
        user
        for user in everyone
        if getattr(user, "is_active", True) and (not usable_password or user.has_usable_password())
    ]
    if len(users) > 1:
        logger.warning("%d accounts share the address %s: no code sent", len(users), mask(address))
    account = users[0] if len(users) == 1 else None
    return otp.issue(
        account if account is not None else address,
        purpose,
        ip_address=ip_address,
        user_agent=user_agent,
        background=background,
        # Accounts that have the address but may not use the code (inactive, no usable
        # password, or several) get the same notice as an address without one: mailing
        # them nothing, as Django's PasswordResetForm does, took the decoy path, whose
        # timing told "an account exists here" apart from "none does" (docs/otp.md).
        discard=account is None,
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

    @class_or_instance
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

    @class_or_instance
    @sensitive_variables("code")  # stars in Django's error reports, as in OTPService.verify
    def verify(self, email: str, code: object, *, ip_address: str | None = None) -> str | None:
        """A single-use reset token when ``code`` is right, else None (never raises).

        The code is checked against the one account whose stored address is ``email``
        (strictly, see :func:`users_with_email`), so a look-alike address the database
        confuses with it reaches no account.
        """
        users = users_with_email(email) if isinstance(email, str) else []
        account = users[0] if len(users) == 1 else None
        result = self.otp.verify(
            account if account is not None else email, code, self.purpose, ip_address=ip_address
        )
        if not result.ok:
            return None
        if account is None:
            # No account, or several sharing the address (or it was just deleted): refuse
            # rather than guess whose password to reset.
            logger.warning("reset code for %s matches %d accounts", mask(str(email)), len(users))
            return None
        return self.make_token(account)

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
            user = user_model._default_manager.get(pk=data["u"])
        except (signing.BadSignature, KeyError, TypeError, ValueError, LookupError):
            raise ResetTokenInvalid("the reset link or code is invalid or has expired") from None
        except get_user_model().DoesNotExist:
            raise ResetTokenInvalid("the reset link or code is invalid or has expired") from None
        # In Python, not in the query: a custom user model may have no is_active field.
        if not getattr(user, "is_active", True):
            raise ResetTokenInvalid("the reset link or code is invalid or has expired")
        if not constant_time_compare(str(data.get("s", "")), self._state(user)):
            raise ResetTokenInvalid("the reset link or code is invalid or has expired")
        return user

    @class_or_instance
    # Stars in Django's error reports for the new password and the token (a later failure:
    # the UPDATE, a hasher, a validator's password_changed), as in verify.
    @sensitive_variables("token", "new_password", "new_hash")
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
