"""What happened to one message: :class:`DeliveryResult`."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from robust_mail.exceptions import (
    Classification,
    DeliveryFailed,
    ProviderError,
    RateLimited,
    RobustMailError,
)

if TYPE_CHECKING:
    from django.core.mail import EmailMessage

#: The attribute of an EmailMessage that holds its result (documented; kept for callers).
ATTRIBUTE = "delivery_result"


class DeliveryStatus(enum.StrEnum):
    #: A provider accepted the message for every recipient.
    SENT = "sent"
    #: A provider accepted it for some recipients; the others are in ``refused``.
    PARTIAL = "partial"
    #: No provider will ever take it as it is (message-fatal): no retry, no failover.
    FAILED = "failed"
    #: Every provider was down, open or rate limited: it may succeed later.
    DEFERRED = "deferred"
    #: Stored in the durable outbox; a worker delivers it.
    QUEUED = "queued"
    #: Printed by the console fallback (development only).
    CONSOLE = "console"


#: Statuses for which the message counts as handled by ``send_messages``.
HANDLED = frozenset(
    {DeliveryStatus.SENT, DeliveryStatus.PARTIAL, DeliveryStatus.QUEUED, DeliveryStatus.CONSOLE}
)


@dataclass
class DeliveryResult:
    """The outcome of delivering one message, attached to it as ``message.delivery_result``."""

    status: DeliveryStatus
    message_id: str
    provider: str | None = None
    #: SMTP attempts made across all providers.
    attempts: int = 0
    #: Recipients a provider refused while accepting the others: address → (code, reply).
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: One entry per provider that failed or was skipped, in the order tried.
    errors: tuple[ProviderError, ...] = ()
    #: True when a provider may have the message although we saw no reply (see the docs).
    ambiguous: bool = False
    #: Seconds after which a DEFERRED message is worth trying again, when known.
    retry_after: float | None = None
    #: Classification of the failure that decided a FAILED / DEFERRED status.
    classification: Classification | None = None
    #: Primary key of the outbox row, for QUEUED results.
    outbox_id: int | None = None
    #: True when a rate limit, not a provider, deferred the message.
    rate_limited: bool = False
    #: The exception of a fallback that could not take the message (e.g. the database is down).
    fallback_error: BaseException | None = field(default=None, repr=False)

    @classmethod
    def of(cls, message: EmailMessage) -> DeliveryResult | None:
        """The result attached to ``message``; None if no robust_mail backend has sent it.

        The same as ``message.delivery_result``, for code checked by a type checker (Django's
        EmailMessage does not declare the attribute).
        """
        result = getattr(message, ATTRIBUTE, None)
        return result if isinstance(result, cls) else None

    def attach(self, message: EmailMessage) -> DeliveryResult:
        """Set this as ``message.delivery_result``; returns self."""
        setattr(message, ATTRIBUTE, self)
        return self

    @classmethod
    def delivered(
        cls,
        message_id: str,
        provider: str,
        refused: dict[str, tuple[int, str]],
        *,
        attempts: int = 1,
        errors: tuple[ProviderError, ...] = (),
        ambiguous: bool = False,
    ) -> DeliveryResult:
        """SENT, or PARTIAL when some recipients were ``refused``."""
        return cls(
            DeliveryStatus.PARTIAL if refused else DeliveryStatus.SENT,
            message_id,
            provider=provider,
            attempts=attempts,
            refused=refused,
            errors=errors,
            ambiguous=ambiguous,
        )

    @property
    def ok_at_provider(self) -> bool:
        """True when a provider accepted it, for all recipients or some (SENT, PARTIAL)."""
        return self.status in (DeliveryStatus.SENT, DeliveryStatus.PARTIAL)

    @property
    def ok(self) -> bool:
        """True when the message was accepted, queued or (in development) printed."""
        return self.status in HANDLED

    def describe(self) -> str:
        """One line a person can act on."""
        if self.status in (DeliveryStatus.SENT, DeliveryStatus.PARTIAL):
            text = f"{self.status.value} via {self.provider} after {self.attempts} attempt(s)"
            if self.refused:
                text += f"; refused: {', '.join(sorted(self.refused))}"
            return text
        detail = "; ".join(str(e) for e in self.errors)
        return f"{self.status.value}: {detail}" if detail else self.status.value

    def to_exception(self) -> RobustMailError:
        """The exception that reports this (unsuccessful) result to a caller."""
        if self.rate_limited:
            return RateLimited("mail rate limit reached", retry_after=self.retry_after or 0.0)
        if self.fallback_error is not None:
            what = (
                "no provider accepted the message and the fallback could not take it"
                if self.attempts or self.errors
                else "the message could not be queued"  # OutboxEmailBackend, background=True
            )
            error = DeliveryFailed(
                f"{what} ({type(self.fallback_error).__name__}: {self.fallback_error})",
                self.errors,
                classification=self.classification,
            )
            error.__cause__ = self.fallback_error
        elif self.status is DeliveryStatus.FAILED:
            error = DeliveryFailed(
                "the message was refused", self.errors, classification=self.classification
            )
        else:
            error = DeliveryFailed(
                "no provider accepted the message", self.errors, classification=self.classification
            )
        error.result = self
        return error
