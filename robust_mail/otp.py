"""One-time passwords by email: issue a code, verify it once.

Security properties (docs/otp.md says what they do and do not protect against):

- codes come from :mod:`secrets` and are stored only as HMAC-SHA256 over (purpose,
  identifier, code) keyed with ``ROBUST_MAIL["OTP"]["SECRET"]`` — or, when that is None,
  a key derived from ``SECRET_KEY`` — so a database dump does not reveal them;
- comparison is constant time; each code allows ``MAX_ATTEMPTS`` tries, expires after
  ``TTL`` and is used at most once (a conditional UPDATE, see :mod:`robust_mail.otp_store`);
- issuing is limited by a cooldown, hourly and daily limits per identifier and an hourly
  limit per IP address (an IPv6 /64 counting as one address); a code whose email could
  not be sent is withdrawn and uses up no limit;
- a code is pending, and cannot be verified, until its email has been handed to the mail
  system (:meth:`OTPStore.activate <robust_mail.otp_store.OTPStore.activate>`), so no
  attempt can be made on a code that a failed send then withdraws;
- the code is never in a subject, a log line, an exception or a ``repr`` — the rendered
  bodies are :class:`SecretText`, whose ``repr`` is withheld, so tracebacks with local
  variables (error trackers) do not show them either.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.core.validators import validate_email
from django.template.loader import render_to_string, select_template
from django.utils import timezone
from django.utils.module_loading import import_string
from django.views.decorators.debug import sensitive_variables

from robust_mail import serialization
from robust_mail.classcall import class_or_instance
from robust_mail.conf import OTPConfig, get_config
from robust_mail.envelope import build_envelope, pin_message
from robust_mail.exceptions import DeliveryFailed, RateLimited
from robust_mail.otp_cache_store import CacheOTPStore
from robust_mail.otp_codes import (
    ALPHANUMERIC,
    DIGITS,
    MAX_CODE_INPUT,
    SecretCode,
    SecretText,
    check_purpose,
    code_keys,
    digest,
    mask,
    normalize_identifier,
)
from robust_mail.otp_store import (
    IssueLimits,
    NewCode,
    OTPStore,
    StoredCode,
    purge_decoys,
    write_decoy,
)
from robust_mail.ratelimit import Rate, RateLimiter, ip_bucket
from robust_mail.state import guard, shared_incr

if TYPE_CHECKING:
    from robust_mail.password_reset import PasswordResetService

__all__ = [
    "ALPHANUMERIC",
    "DIGITS",
    "IssuedCode",
    "OTPService",
    "PasswordResetService",
    "Reason",
    "SecretCode",
    "SecretText",
    "VerifyResult",
    "check_purpose",
    "code_keys",
    "mask",
    "normalize_identifier",
    "purge_expired",
]

logger = logging.getLogger("robust_mail.otp")


class Reason(StrEnum):
    OK = "ok"
    INVALID = "invalid"
    EXPIRED = "expired"
    LOCKED = "locked"
    NO_CODE = "no_code"


@dataclass(frozen=True)
class VerifyResult:
    """``ok`` and why. Show users one message for every failure reason (docs/otp.md)."""

    ok: bool
    reason: Reason

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class IssuedCode:
    """What :meth:`OTPService.issue` did. ``code`` is set only when ``send=False``."""

    identifier: str
    purpose: str
    expires_at: datetime
    key: str
    sent: bool
    code: SecretCode | None = field(default=None, repr=False)


def _default_store(config: Any) -> OTPStore:
    # ROBUST_MAIL["OTP"]["STORE"] (a dotted path) once conf.py reads it.
    dotted = getattr(config.otp, "store", None) or "robust_mail.otp_store.DatabaseOTPStore"
    cls = import_string(dotted)
    if isinstance(cls, type) and issubclass(cls, CacheOTPStore):
        return cls(config.cache)
    store: OTPStore = cls()
    return store


class OTPService:
    """Issue and verify codes. Stateless apart from the store: one per request is fine.

    ``config`` defaults to ``get_config().otp``; ``store`` to the configured store
    (:class:`DatabaseOTPStore`); ``clock`` returns an aware datetime, for tests.
    """

    def __init__(
        self,
        *,
        config: OTPConfig | None = None,
        store: OTPStore | None = None,
        clock: Callable[[], datetime] = timezone.now,
        cache_alias: str | None = None,
    ) -> None:
        full = get_config()
        self.config = config or full.otp
        self.store = store or _default_store(full)
        self.clock = clock
        self.cache_alias = cache_alias or full.cache

    # -- codes ----------------------------------------------------------------------------

    @property
    def alphabet(self) -> str:
        return ALPHANUMERIC if self.config.alphabet == "alphanumeric" else DIGITS

    def generate(self) -> SecretCode:
        return SecretCode("".join(secrets.choice(self.alphabet) for _ in range(self.config.length)))

    def hash_code(self, identifier: str, purpose: str, code: str) -> str:
        """The stored form of ``code``: hex HMAC-SHA256 under the current key."""
        return digest(code_keys(self.config)[0], identifier, purpose, code)

    def _matches(self, identifier: str, purpose: str, code: str, stored: str) -> bool:
        # Every key is tried, no early exit, each comparison in constant time.
        results = [
            hmac.compare_digest(digest(key, identifier, purpose, code), stored)
            for key in code_keys(self.config)
        ]
        return any(results)

    def normalize_code(self, raw: object) -> str | None:
        """User input → a code in the alphabet, or None. Never raises."""
        if not isinstance(raw, str) or len(raw) > MAX_CODE_INPUT:
            return None
        value = "".join(raw.split()).replace("-", "")
        if self.config.alphabet == "alphanumeric":
            value = value.upper()
        if (
            not value.isascii()
            or len(value) != self.config.length
            or any(c not in self.alphabet for c in value)
        ):
            return None
        return value

    # -- issue ----------------------------------------------------------------------------

    @property
    def limits(self) -> IssueLimits:
        c = self.config
        return IssueLimits(
            cooldown=c.cooldown,
            per_hour=c.max_per_hour,
            per_day=c.max_per_day,
            per_ip_per_hour=c.max_per_ip_per_hour,
        )

    @class_or_instance
    def issue(
        self,
        identifier: Any,
        purpose: str = "login",
        *,
        ip_address: str | None = None,
        user_agent: str = "",
        send: bool = True,
        background: bool = False,
        discard: bool = False,
        recipient: str | None = None,
        notify: bool = True,
    ) -> IssuedCode:
        """Create a code for ``identifier`` and (``send=True``) email it.

        The code is bound to ``identifier`` (its :func:`normalize_identifier` form). The
        email goes to ``recipient``; by default to the stored address of a user passed as
        ``identifier``, else to ``identifier`` as given. Pass the user, not an address
        someone typed, whenever a code is for an account (see
        :mod:`robust_mail.password_reset`).

        Raises :class:`RateLimited` (with ``retry_after``) over a limit, ``ValueError`` for
        a bad identifier or purpose, and the delivery error when the email could not be
        sent — in which case the code is withdrawn and counts toward no limit.
        With ``send=False`` the caller delivers ``IssuedCode.code`` itself. ``discard=True``
        does all the work of sending — the email is built and serialised as for the
        outbox, and one row is written in a transaction of its own — but queues nothing:
        the same work for an address without an account as for one with (enumeration).
        ``notify=False`` (with ``discard``): not even the "no account" notice (see
        :meth:`send`); its rehearsal takes less time than a queued email, which tells the
        two cases apart.
        """
        ident = normalize_identifier(identifier)
        check_purpose(purpose)
        address = recipient.strip() if recipient is not None else _address_of(identifier)
        if send:
            try:
                validate_email(address)
            except ValidationError:
                raise ValueError("send=True needs an email address to send to") from None
        now = self.clock()
        code = self.generate()
        expires_at = now + timedelta(seconds=self.config.ttl)
        key = self.store.add(
            NewCode(
                identifier=ident,
                purpose=purpose,
                code_hash=self.hash_code(ident, purpose, code),
                created_at=now,
                expires_at=expires_at,
                ip_address=ip_bucket(ip_address),
                user_agent=(user_agent or "")[:255],
            ),
            self.limits,
        )
        if send:
            try:
                self.send(
                    address,
                    code,
                    purpose,
                    expires_at,
                    background=background,
                    discard=discard,
                    notify=notify,
                )
            except BaseException:
                # Not sent: as if never issued, so the user may ask again at once.
                self.store.withdraw(key)
                logger.warning("could not send a %s code to %s; withdrawn", purpose, mask(ident))
                raise
        self._activate(key, purpose, ident)
        logger.info("issued a %s code for %s, key %s", purpose, mask(ident), key)
        return IssuedCode(
            identifier=ident,
            purpose=purpose,
            expires_at=expires_at,
            key=key,
            sent=send and not discard,
            code=None if send else code,
        )

    def _activate(self, key: str, purpose: str, ident: str) -> None:
        # The email is out: a code left pending would never verify. One more try through a
        # blip of the store, and a clear log line if even that fails.
        try:
            self.store.activate(key)
        except Exception:
            logger.warning("activating %s code key %s failed; trying once more", purpose, key)
            try:
                self.store.activate(key)
            except Exception:
                logger.exception(
                    "the %s code for %s was sent but could not be made usable (key %s): "
                    "the user must ask for another",
                    purpose,
                    mask(ident),
                    key,
                )
                raise

    def render(
        self,
        identifier: str,
        code: str,
        purpose: str,
        expires_at: datetime,
        *,
        no_account: bool = False,
    ) -> tuple[str, SecretText, SecretText]:
        """(subject, text, html) from the project-overridable templates.

        Templates: ``robust_mail/otp/<purpose>_{subject.txt,email.txt,email.html}``, else
        ``robust_mail/otp/{subject.txt,email.txt,email.html}``; with ``no_account`` (the
        address has no account: no code is sent), ``<purpose>_no_account_...`` and
        ``no_account_...`` instead, rendered without the code and without the identifier
        (what was typed is anyone's text). The subject is rendered without the code in its
        context, so no template can put it there. The bodies are
        :class:`SecretText`: they hold the code, and their ``repr`` does not.
        """
        context: dict[str, Any] = {
            "identifier": identifier,
            "purpose": purpose,
            "expires_at": expires_at,
            "valid_minutes": max(1, round(self.config.ttl / 60)),
        }
        if no_account:
            # What was typed is anyone's text: keep it out of reach of the templates.
            del context["identifier"]
        base = "robust_mail/otp/"
        kind = "no_account_" if no_account else ""

        def names(part: str) -> list[str]:
            return [f"{base}{purpose}_{kind}{part}", f"{base}{kind}{part}"]

        subject = select_template(names("subject.txt"))
        subject_text = " ".join(subject.render(context).split())
        if not no_account:
            context["code"] = code
        return (
            subject_text,
            SecretText(render_to_string(names("email.txt"), context)),
            SecretText(render_to_string(names("email.html"), context)),
        )

    def send(
        self,
        address: str,
        code: str,
        purpose: str,
        expires_at: datetime,
        *,
        background: bool,
        discard: bool = False,
        notify: bool = True,
    ) -> None:
        """Email the code to ``address`` (``background``: through the outbox).

        The email is marked sensitive: waiting in the outbox, its bodies are withheld from
        the admin and erased once it is sent. ``discard=True`` (no account has the address)
        sends the "no account" email instead (templates ``..._no_account_...``, without the
        code), through the same calls; with ``OTP["NOTIFY_UNKNOWN"] = False``, or past
        ``OTP["MAX_NOTICES_PER_HOUR"]``, it builds the code email and does the work of
        queueing it (:func:`rehearse_queueing`) without queueing it; so does ``notify=False``.
        Raises the delivery error. The bodies are :class:`SecretText` (masked ``repr``)
        and no exception raised here quotes them.
        """
        from robust_mail.service import EmailService

        # Asked for a code email too, not only for a notice: the cache round trips would
        # otherwise tell a known address from an unknown one (see _may_notify).
        may_notify = self.config.notify_unknown and self._may_notify(count=discard and notify)
        if discard and not (notify and may_notify):
            subject, text, html = self.render(address, code, purpose, expires_at)
            # What EmailService.send_email builds from the same arguments.
            message = EmailMultiAlternatives(subject, text, settings.DEFAULT_FROM_EMAIL, [address])
            message.attach_alternative(html, "text/html")
            rehearse_queueing(message, self.clock())
            return
        subject, text, html = self.render(address, code, purpose, expires_at, no_account=discard)
        sent = EmailService.send_email(
            subject,
            text,
            [address],
            html_message=html,
            background=background,
            sensitive=True,
            using=getattr(self.config, "mailer", None),  # a custom OTPConfig may lack it
        )
        if not sent:  # only with fail_silently, which is not used here; never quietly lost
            raise DeliveryFailed("the code email was not sent")

    # -- verify ---------------------------------------------------------------------------

    @class_or_instance
    # Innermost: it wraps the function, which class_or_instance then binds. Django's error
    # reports (DEBUG off) then show the typed and the normalised code, and the stored
    # record with its hash, as stars, here and in every frame below this one.
    @sensitive_variables("code", "candidate", "record")
    def verify(
        self,
        identifier: Any,
        code: object,
        purpose: str = "login",
        *,
        ip_address: str | None = None,
    ) -> VerifyResult:
        """Check ``code`` and use it up. Never raises for bad user input.

        Reasons: ``no_code`` (nothing live), ``expired``, ``locked`` (no attempts left, or
        too many attempts from ``ip_address``), ``invalid`` (wrong, malformed, or already
        used by a concurrent request), ``ok``. Every call with a live code counts one
        attempt, the successful one included.
        """
        check_purpose(purpose)
        try:
            ident = normalize_identifier(identifier)
        except ValueError:
            return VerifyResult(False, Reason.NO_CODE)
        now = self.clock()
        if ip_address and not self._ip_may_try(ip_address):
            return VerifyResult(False, Reason.LOCKED)
        record = self.store.latest(ident, purpose)
        if record is None:
            return VerifyResult(False, Reason.NO_CODE)
        if record.expires_at <= now:
            return VerifyResult(False, Reason.EXPIRED)
        if (
            record.attempts >= self.config.max_attempts
            or not self.store.count_attempt(record.key, self.config.max_attempts)
            or not self._attempt_may_count(record, now)
        ):
            return VerifyResult(False, Reason.LOCKED)
        candidate = self.normalize_code(code)
        if candidate is None or not self._matches(ident, purpose, candidate, record.code_hash):
            logger.info("wrong %s code for %s, key %s", purpose, mask(ident), record.key)
            return VerifyResult(False, Reason.INVALID)
        if not self.store.consume(record.key, now):
            return VerifyResult(False, Reason.INVALID)
        # Two codes whose emails crossed can both have been made live (activations racing):
        # once one is used, none of the others may be. The code is used up by now: a store
        # error here must not turn that success into an error page.
        try:
            self.store.invalidate(ident, purpose)
        except Exception:
            logger.exception("could not retire the other %s codes for %s", purpose, mask(ident))
        logger.info("verified a %s code for %s, key %s", purpose, mask(ident), record.key)
        return VerifyResult(True, Reason.OK)

    def _may_notify(self, *, count: bool) -> bool:
        """Whether ``MAX_NOTICES_PER_HOUR`` lets one more "no account" notice go out.

        ``count=True`` (a notice) counts it. ``count=False`` (a code for an account) counts
        nothing, but makes the same cache calls on the same counter — ``add``, ``incr`` and,
        exactly when a counted hit would be refused, the ``decr`` — so that the number of
        round trips to the cache does not tell the two apart, capped or not. A separate
        counter would not do: its ``decr`` would follow another count than the one an
        attacker can drive to the cap with unknown addresses.
        """
        # Notices go to whatever address was typed; the per-address limits cannot see that
        # a+1@x and a+2@x are one mailbox, and the per-client one needs the caller's IP.
        cap = self.config.max_notices_per_hour
        if cap is None:
            return True
        limiter = RateLimiter(
            self.cache_alias,
            clock=lambda: self.clock().timestamp(),
            prefix="robust_mail:otp-notice",
            fail_open=True,
        )
        try:
            hit = limiter.hit("all", Rate(cap, 3600), amount=1 if count else 0)
        except RateLimited:
            if count:
                logger.warning(
                    "over OTP MAX_NOTICES_PER_HOUR: no notice sent for an unknown address"
                )
            return False
        if not count and hit is not None and hit.count >= cap:
            # A counted hit would have gone over and been given back: give back nothing,
            # in the same call.
            limiter.release(hit, amount=0)
        return True

    def _attempt_may_count(self, record: StoredCode, now: datetime) -> bool:
        """Count one attempt on ``record`` in the cache too; False once over ``MAX_ATTEMPTS``.

        The store's count (an UPDATE) is part of the caller's transaction: a view under
        ``ATOMIC_REQUESTS`` that refuses a wrong code by raising rolls it back, and the code
        would allow guesses without end. The cache is outside every transaction. A store
        whose counts are too (``counts_outside_transactions``, the cache store) needs no
        second count. A dead cache lets the attempt through, as the per-IP limit does: the
        store's count still holds wherever nothing rolls it back.
        """
        if getattr(self.store, "counts_outside_transactions", False):
            return True
        # The created_at tells a code from one with the same key in a database since reset.
        key = "\x00".join((record.purpose, record.identifier, record.key, str(record.created_at)))
        cache_key = "robust_mail:otp-attempts:" + hashlib.sha256(key.encode()).hexdigest()[:40]
        # Outlives the code, whose expiry ends its attempts anyway.
        timeout = (record.expires_at - now).total_seconds() + 60

        def count_in(cache: Any) -> int | None:
            return shared_incr(cache, cache_key, 1, timeout)

        count = guard(self.cache_alias).call(count_in, lambda: None)
        return count is None or count <= self.config.max_attempts

    def _ip_may_try(self, ip_address: str) -> bool:
        # Guessing across many identifiers from one address: bound it too.
        rate = Rate(self.config.max_per_ip_per_hour * self.config.max_attempts, 3600)
        limiter = RateLimiter(
            self.cache_alias,
            clock=lambda: self.clock().timestamp(),
            prefix="robust_mail:otp-verify",
            fail_open=True,
        )
        try:
            limiter.hit(f"ip:{ip_bucket(ip_address)}", rate)
        except RateLimited:
            logger.warning("too many code attempts from one address")
            return False
        return True

    def invalidate(self, identifier: Any, purpose: str = "login") -> int:
        """Invalidate every unused code for identifier and purpose (one whose email is
        still on its way too); how many."""
        return self.store.invalidate(normalize_identifier(identifier), check_purpose(purpose))


def _address_of(identifier: Any) -> str:
    """The address to email for ``identifier``: a user's stored address, or the text."""
    if hasattr(identifier, "get_email_field_name"):
        identifier = getattr(identifier, identifier.get_email_field_name(), "") or ""
    return str(identifier).strip()


def rehearse_queueing(message: EmailMessage, now: datetime) -> None:
    """Do the work of queueing ``message`` in the outbox, but queue nothing.

    For requests about addresses without an account, so they take as long as requests
    about addresses with one. Mirrors :meth:`EmailService.send` with ``background=True``,
    i.e. :func:`robust_mail.outbox.enqueue`: pin the Message-ID and Date, serialise the
    message to the outbox's JSON payload, build it once (enqueue checks it can be sent),
    and insert one row in a transaction of its own — a decoy row in the code table
    (:func:`~robust_mail.otp_store.write_decoy`) where enqueue inserts the outbox row.
    Nothing is kept: the payload is dropped and the decoy can never be used.
    ``tests/test_password_reset.py`` checks that both paths build and serialise the
    message as often, and run the same statements: keep this in step with ``enqueue``.
    """
    pin_message(message)
    serialization.message_to_data(message)
    build_envelope(message)
    write_decoy(now)


def purge_expired(now: datetime | None = None) -> int:
    """Delete OTP rows no longer needed (for ``robust_mail_purge``); how many.

    That is the store's expired codes and, whatever the store, every decoy row.
    """
    return OTPService().store.purge_expired(now or timezone.now()) + purge_decoys()


def __getattr__(name: str) -> Any:
    # PasswordResetService lives in its own module, which imports this one.
    if name == "PasswordResetService":
        from robust_mail.password_reset import PasswordResetService

        return PasswordResetService
    raise AttributeError(f"module 'robust_mail.otp' has no attribute {name!r}")
