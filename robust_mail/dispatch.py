"""Failover for one message: the providers in order, retries, breakers, classification.

:meth:`Dispatcher.deliver` never applies a fallback and never raises for a
delivery failure: it returns a :class:`DeliveryResult` whose status says what
happened. The backend, the service and the outbox decide what to do with a
FAILED or DEFERRED result. Several messages at once: :meth:`Dispatcher.deliver_many`
(:mod:`robust_mail.runs`).
"""

from __future__ import annotations

import functools
import logging
import os
import smtplib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from django.core.mail import EmailMessage

from robust_mail import metrics
from robust_mail.breaker import BreakerState
from robust_mail.conf import DNSConfig, PoolConfig, RobustMailConfig
from robust_mail.envelope import Envelope, build_envelope, pin_message
from robust_mail.exceptions import (
    Classification,
    InvalidMessage,
    ProviderError,
    ProviderMisconfigured,
    RateLimited,
    RobustMailError,
    Step,
    TransportError,
    classify,
)
from robust_mail.pool import PoolTimeout, pools
from robust_mail.providers import ProviderConfig
from robust_mail.ratelimit import Hit, RateLimiter, check_message_rates
from robust_mail.resolver import Resolver
from robust_mail.results import DeliveryResult, DeliveryStatus
from robust_mail.retry import RetryPolicy
from robust_mail.runs import First, Runs
from robust_mail.signals import emit, message_sent, provider_failed
from robust_mail.state import get_breaker
from robust_mail.transport import SMTPConnection, cut_by_deadline, incapable

__all__ = ["DeliveryResult", "DeliveryStatus", "Dispatcher", "pin_message"]

logger = logging.getLogger("robust_mail")


@functools.cache
def resolver_for(dns: DNSConfig) -> Resolver:
    """One resolver (and so one stale-answer cache) per DNS configuration, process-wide."""
    return Resolver(
        nameservers=list(dns.nameservers) if dns.nameservers else None,
        port=dns.port,
        timeout=dns.timeout,
        stale_ttl=dns.stale_ttl,
    )


@dataclass(frozen=True)
class _PoolKey:
    """A pool's identity: the provider, the DNS configuration its connections resolve with
    (its factory captures that resolver), and the pool settings. One provider under two
    MAILERS aliases with other DNS or POOL settings is two pools: otherwise whichever alias
    sent last would set the size and limits of both."""

    provider: ProviderConfig
    dns: DNSConfig
    pool: PoolConfig

    @property
    def name(self) -> str:  # the pool's name in logs and stats
        return self.provider.name


if hasattr(os, "register_at_fork"):
    # A forked child makes its own resolvers. Those its pools' factories captured are
    # kept, with fresh locks (robust_mail.resolver resets every resolver's at fork).
    os.register_at_fork(after_in_child=resolver_for.cache_clear)


@dataclass
class _Attempts:
    """Mutable bookkeeping for one ``deliver`` call."""

    count: int = 0
    errors: list[ProviderError] = field(default_factory=list)
    ambiguous: bool = False
    busy_locally: bool = False
    #: The last provider failed only because the deadline cut its attempts short.
    out_of_time: bool = False
    #: The last provider lacks what this message needs (SMTPUTF8, a large enough SIZE).
    incapable: bool = False
    unreachable: bool = False
    #: The last failure shared a lost connection with an earlier message of its run.
    collateral: bool = False
    #: Some provider lacked what this message needs / some provider was skipped.
    any_incapable: bool = False
    any_skipped: bool = False
    last_step: str = ""


T = TypeVar("T")


class Dispatcher(Runs):
    """Delivers messages through the configured providers, in order."""

    def __init__(
        self,
        config: RobustMailConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock
        retry = config.retry
        self.retry = RetryPolicy(
            attempts=retry.attempts,
            backoff=retry.backoff,
            max_backoff=retry.max_backoff,
            sleep=sleep,
            clock=clock,
        )

    # -- public -------------------------------------------------------------------------

    def deliver(self, message: EmailMessage, *, rendered: bytes | None = None) -> DeliveryResult:
        """Deliver ``message`` through the first provider that takes it.

        Raises :class:`InvalidMessage` (before any network traffic) when the
        message cannot be built; every other failure is reported in the result. An
        exception that is not robust_mail's (a task's time limit, a bug) is not a delivery
        failure: it propagates as raised, the message possibly sent.
        ``rendered``: the bytes an earlier build of this message produced (the outbox's),
        sent as they are.
        """
        envelope = build_envelope(message, data=rendered)
        # The clock starts before anything that may wait (the rate limits ask the cache).
        deadline = self.clock() + self.config.retry.deadline
        limited, hits = self._admit(envelope)
        result = limited or self._deliver(message, envelope, deadline)
        self._settle_hits(hits, result)
        return self._conclude(message, result)

    # -- internals ------------------------------------------------------------------------

    def _conclude(self, message: EmailMessage, result: DeliveryResult) -> DeliveryResult:
        result.attach(message)
        if result.status in (DeliveryStatus.SENT, DeliveryStatus.PARTIAL):
            emit(message_sent, type(self), message=message, result=result)
        return result

    def _admit(self, envelope: Envelope) -> tuple[DeliveryResult | None, list[Hit]]:
        """Count the message against the rate limits: a DEFERRED result when one holds it
        back (nothing counted), else None and the hits to settle once it is delivered."""
        try:
            hits = check_message_rates(
                list(envelope.recipients),
                self.config.rate_limits,
                self.config.cache,
                scope=self.config.alias,
            )
        except RateLimited as exc:
            logger.warning("message %s deferred by a rate limit: %s", envelope.message_id, exc)
            limited = DeliveryResult(
                DeliveryStatus.DEFERRED,
                envelope.message_id,
                retry_after=exc.retry_after,
                rate_limited=True,
                classification=Classification.TRANSIENT,
                errors=(ProviderError("-", Classification.TRANSIENT, "rate_limit", str(exc)),),
            )
            return limited, []
        return None, hits

    def _settle_hits(self, hits: list[Hit], result: DeliveryResult | None) -> None:
        """Give a message's rate-limit hits back unless it may have been delivered.

        ``result`` None: never attempted. Sent, partly sent and ambiguous ones (a provider
        may have them) stay counted: the limits err on the side of sending less.
        """
        if not hits or (result is not None and (result.ok_at_provider or result.ambiguous)):
            return
        # fail_open: through the cache's guard, so a dead cache costs no timeout per hit.
        limiter = RateLimiter(self.config.cache, fail_open=True)
        for hit in hits:
            limiter.release(hit)

    def _closed(self, provider: ProviderConfig) -> bool:
        return get_breaker(provider.name, self.config).state is BreakerState.CLOSED

    def _had_most_of_the_deadline(self, began: float) -> bool:
        # Half of RETRY.DEADLINE: a provider that had less was cut short by the time the
        # others (and our backoff) used before it, which says nothing of its own speed.
        return self.clock() - began >= self.config.retry.deadline / 2

    def _deliver(
        self,
        message: EmailMessage,
        envelope: Envelope,
        deadline: float,
        *,
        first: First | None = None,
        stopped: bool = False,
    ) -> DeliveryResult:
        """Through the providers in order. ``first``: the outcome of an attempt already
        made at the first provider (see :meth:`deliver_many`), which counts as its first.
        ``stopped``: the caller wants nothing more sent (give ``deadline`` as now): the
        other providers are reported skipped for that reason, not for the deadline."""
        attempts = _Attempts()
        last: Classification | None = None
        retry_at: float | None = None
        for index, provider in enumerate(self.config.providers):
            breaker = get_breaker(provider.name, self.config)
            if index == 0 and first is not None:
                pass  # already attempted: the breaker was closed when it started
            # The deadline first: allow() may elect this call as a half-open trial, which
            # must then be reported one way or the other.
            elif stopped:
                self._skip(
                    provider,
                    attempts,
                    "not tried: the sender stopped (a worker stopping, or its lease running out)",
                )
                continue
            elif self.clock() >= deadline:
                self._skip(provider, attempts, "delivery deadline reached")
                continue
            elif not breaker.allow():
                wait = breaker.retry_at
                retry_at = wait if retry_at is None or (wait and wait < retry_at) else retry_at
                self._skip(provider, attempts, "circuit open")
                continue
            if index > 0 and attempts.count:
                metrics.incr(provider.name, "failed_over")
            last_chance = index == len(self.config.providers) - 1
            # An attempt made already (in a run) counts its own time here too.
            began = self.clock() - (first.seconds if index == 0 and first is not None else 0.0)
            try:
                outcome = self._try_provider(
                    provider,
                    envelope,
                    message,
                    deadline,
                    attempts,
                    last_chance=last_chance,
                    first=first if index == 0 else None,
                )
            except BaseException:
                # Interrupted (worker timeout, KeyboardInterrupt, a bad message): a
                # half-open trial this call holds must not stay reserved.
                breaker.release()
                raise
            if isinstance(outcome, dict):
                breaker.record_success()
                return self._success(provider, envelope, outcome, attempts)
            if attempts.incapable:
                # This provider cannot take this message (no SMTPUTF8, too small a size
                # limit) but another may: try it. Says nothing about the provider's health.
                attempts.incapable, attempts.any_incapable = False, True
                breaker.release()
                continue
            last = outcome
            if outcome is Classification.MESSAGE_FATAL:
                # The provider is up and answered: the message, not the provider, is at fault.
                breaker.record_success()
                break
            if attempts.out_of_time and self._had_most_of_the_deadline(began):
                # Our deadline cut it, but only after it had used most of the delivery's
                # time: a provider answering each step just under TIMEOUT. Uncounted, it
                # would take every message's whole deadline and never let the next
                # provider have one; counted, its breaker opens and the others get them.
                attempts.out_of_time = False
                breaker.record_failure()
                continue
            if attempts.busy_locally or attempts.out_of_time or attempts.collateral:
                # Our own pool was exhausted, or our own deadline cut the provider short:
                # neither says anything about the provider's health. Nor does a message
                # lost with the connection another message of its run already counted.
                attempts.busy_locally = attempts.out_of_time = attempts.collateral = False
                breaker.release()
                continue
            # Only a failure of the provider itself (TLS, auth, refusing us as a sender)
            # opens the breaker at once; a policy refusal of one recipient or one message
            # fails over but counts like any failure, so one bad message can't take a
            # healthy provider out of service.
            # A provider that cannot be reached at all, while another is there to take
            # the mail, is opened at once too: every message would otherwise pay its
            # TIMEOUT until FAILURE_THRESHOLD messages had failed.
            breaker.record_failure(
                fatal=(
                    outcome is Classification.PROVIDER_FATAL
                    and attempts.last_step in _PROVIDER_STEPS
                )
                or attempts.unreachable
            )
            attempts.unreachable = False
        if last is None and attempts.any_incapable and not attempts.any_skipped:
            # Every provider was asked and none can take this message as it is.
            last = Classification.MESSAGE_FATAL
        return self._failure(message, envelope, attempts, last, retry_at)

    def _try_provider(
        self,
        provider: ProviderConfig,
        envelope: Envelope,
        message: EmailMessage,
        deadline: float,
        attempts: _Attempts,
        *,
        last_chance: bool = True,
        first: First | None = None,
    ) -> dict[str, tuple[int, str]] | Classification:
        """Send through one provider with retries; the refused recipients, or why it failed.

        ``first``: the outcome of the first attempt, made already.
        """
        tries = 0
        cut_only = True  # every failure here so far came from our own deadline
        in_run = first is not None

        def once() -> dict[str, tuple[int, str]]:
            nonlocal tries, cut_only, first
            tries += 1
            attempts.count += 1
            started = time.perf_counter()
            try:
                if first is not None:
                    made, first = first, None
                    refused, seconds = made.unwrap(), made.seconds
                else:
                    refused = self._send_once(
                        provider, envelope, message, deadline, last_chance=last_chance
                    )
                    seconds = time.perf_counter() - started
            except Exception as exc:
                cut_only = cut_only and cut_by_deadline(exc)
                raise
            metrics.observe(provider.name, seconds)
            logger.info(
                "message %s: attempt %d via %s accepted",
                envelope.message_id,
                tries,
                provider.name,
            )
            return refused

        def on_retry(attempt: int, exc: BaseException, delay: float) -> None:
            metrics.incr(provider.name, "retried")
            self._log_failure(provider, envelope, attempt, exc, f"retrying in {delay:.1f}s")

        try:
            # An unreachable provider (refused, no answer) is not retried while a later one
            # exists: a dead primary then costs one TIMEOUT, not ATTEMPTS of them. A first
            # attempt made in a run asked the breaker before the run: if it opened since,
            # this message moves on as a lone one would, without retrying here.
            def retry_if(exc: BaseException) -> bool:
                if in_run and not self._closed(provider):
                    return False
                return _retryable(exc) and (last_chance or not unreachable(exc))

            return self.retry.call(once, retry_if=retry_if, deadline=deadline, on_retry=on_retry)
        except InvalidMessage:
            raise
        except RobustMailError as exc:
            # Only our own errors are delivery failures. Anything else (a task's soft time
            # limit, a bug) is not classified, retried or failed over: it goes to the
            # caller, the message possibly sent (deliver() releases the breaker).
            classification = classify(exc)
            attempts.busy_locally = isinstance(exc, PoolTimeout)
            attempts.collateral = bool(getattr(exc, "collateral", False))
            attempts.out_of_time = cut_only
            attempts.incapable = incapable(exc)
            attempts.unreachable = unreachable(exc) and not last_chance
            attempts.last_step = str(getattr(exc, "step", ""))
            if classification is Classification.AMBIGUOUS:
                attempts.ambiguous = True
                metrics.incr(provider.name, "ambiguous")
            if attempts.incapable:  # this provider cannot take it (size, SMTPUTF8): others may
                then = "trying the next provider"
            elif classification is Classification.MESSAGE_FATAL:
                then = "the message fails: no provider would take it"
            else:
                then = "giving up on this provider"
            self._log_failure(provider, envelope, tries, exc, then)
            error = ProviderError(
                provider=provider.name,
                classification=classification,
                step=str(getattr(exc, "step", Step.CONNECT)),
                message=exc.detail if isinstance(exc, TransportError) else str(exc),
                code=getattr(exc, "code", None),
                attempts=tries,
            )
            attempts.errors.append(error)
            metrics.incr(provider.name, "failed")
            emit(provider_failed, type(self), provider=provider.name, error=error, message=message)
            return classification

    def _send_once(
        self,
        provider: ProviderConfig,
        envelope: Envelope,
        message: EmailMessage,
        deadline: float,
        *,
        last_chance: bool = True,
    ) -> dict[str, tuple[int, str]]:
        if provider.mailer:
            return _send_via_mailer(provider, message)

        def send(conn: SMTPConnection, until: float) -> dict[str, tuple[int, str]]:
            return conn.send(
                envelope.from_addr, list(envelope.recipients), envelope.data, deadline=until
            )

        return self._on_connection(provider, deadline, send, last_chance=last_chance)

    def _on_connection(
        self,
        provider: ProviderConfig,
        deadline: float,
        send: Callable[[SMTPConnection, float], T],
        *,
        last_chance: bool,
    ) -> T:
        """``send(connection, until)`` on a pooled connection to ``provider``.

        ``until`` is ``deadline`` on the transport's clock. A pooled connection the server
        closed while idle fails at MAIL, before any of the message left: ``send`` is then
        called again on a fresh connection.
        """
        resolver = resolver_for(self.config.dns)
        pool = pools.get(
            _PoolKey(provider, self.config.dns, self.config.pool),
            lambda: SMTPConnection(provider, resolver=resolver),
            size=self.config.pool.size,
            idle_timeout=self.config.pool.idle_timeout,
            max_messages=self.config.pool.max_messages,
        )
        # The pool and the transport measure time with time.monotonic(); ours is injectable.
        left = deadline - self.clock()
        until = time.monotonic() + left
        # A busy local pool may hold the message for at most half the time left when a
        # later provider could take it: waiting must not use up the whole deadline.
        max_wait = None if last_chance else max(0.0, left / 2)
        for _ in range(self.config.pool.size + 1):
            reused = False
            asked_at = time.monotonic()
            try:
                with pool.connection(until, max_wait=max_wait) as conn:
                    reused = conn.opened_at is not None and conn.opened_at < asked_at
                    return send(conn, until)
            except TransportError as exc:
                if not (reused and _closed_while_idle(exc)):
                    raise
                logger.info(
                    "%s: pooled connection was closed by the server; reconnecting", provider.name
                )
        raise AssertionError("unreachable: the last attempt used a fresh connection")

    def _skip(self, provider: ProviderConfig, attempts: _Attempts, why: str) -> None:
        logger.info("provider %s skipped: %s", provider.name, why)
        attempts.any_skipped = True
        attempts.errors.append(
            ProviderError(provider.name, Classification.TRANSIENT, "skipped", why, attempts=0)
        )

    def _log_failure(
        self,
        provider: ProviderConfig,
        envelope: Envelope,
        attempt: int,
        exc: BaseException,
        then: str,
    ) -> None:
        step = getattr(exc, "step", "?")
        logger.warning(
            "message %s: attempt %d via %s failed at %s: %s (%s); %s",
            envelope.message_id,
            attempt,
            provider.name,
            step,
            classify(exc).value,
            exc,
            then,
        )

    def _success(
        self,
        provider: ProviderConfig,
        envelope: Envelope,
        refused: dict[str, tuple[int, str]],
        attempts: _Attempts,
    ) -> DeliveryResult:
        metrics.incr(provider.name, "sent")
        if refused:
            metrics.incr(provider.name, "refused_recipients", len(refused))
        return DeliveryResult.delivered(
            envelope.message_id,
            provider.name,
            refused,
            attempts=attempts.count,
            errors=tuple(attempts.errors),
            ambiguous=attempts.ambiguous,
        )

    def _failure(
        self,
        message: EmailMessage,
        envelope: Envelope,
        attempts: _Attempts,
        last: Classification | None,
        retry_at: float | None,
    ) -> DeliveryResult:
        fatal = last is Classification.MESSAGE_FATAL
        retry_after = None
        if not fatal and retry_at is not None:
            retry_after = max(0.0, retry_at - time.time())
        result = DeliveryResult(
            DeliveryStatus.FAILED if fatal else DeliveryStatus.DEFERRED,
            envelope.message_id,
            attempts=attempts.count,
            errors=tuple(attempts.errors),
            ambiguous=attempts.ambiguous,
            classification=last or Classification.TRANSIENT,
            retry_after=retry_after,
        )
        return result.attach(message)


#: Steps whose provider-fatal failure says the provider cannot send for us at all.
_PROVIDER_STEPS = frozenset({"resolve", "connect", "greeting", "ehlo", "starttls", "auth", "mail"})


def _retryable(exc: BaseException) -> bool:
    # An ambiguous failure (no reply after the final dot) is not retried on the same
    # provider, which most likely has the message already; the next provider still gets
    # it with the same Message-ID, since at-least-once beats a silent loss. A busy local
    # pool is not retried either: waiting again would only burn the deadline. Nor is an
    # attempt the deadline cut short: there is no time left for another.
    if isinstance(exc, PoolTimeout) or cut_by_deadline(exc):
        return False
    # Not ours (a task's time limit, a bug): never retried, it goes to the caller.
    if not isinstance(exc, RobustMailError):
        return False
    return classify(exc) is Classification.TRANSIENT


def unreachable(exc: BaseException) -> bool:
    """The provider did not answer at all: connection refused or timed out, no greeting."""
    if not isinstance(exc, TransportError) or cut_by_deadline(exc) or exc.code is not None:
        return False
    if exc.step is Step.CONNECT:
        return isinstance(exc.cause, OSError) and not isinstance(exc.cause, ssl.SSLError)
    return exc.step is Step.GREETING and isinstance(
        exc.cause, TimeoutError | smtplib.SMTPServerDisconnected | ConnectionError
    )


def _closed_while_idle(exc: TransportError) -> bool:
    return exc.step in (Step.MAIL, Step.RSET) and isinstance(
        exc.cause, smtplib.SMTPServerDisconnected | ConnectionError
    )


def _send_via_mailer(provider: ProviderConfig, message: EmailMessage) -> dict[str, tuple[int, str]]:
    """Deliver through another Django 6.1 mailer alias (e.g. an HTTP API backend)."""
    from django.core import mail

    assert provider.mailer is not None
    try:
        backend = mail.mailers[provider.mailer]  # type: ignore[attr-defined]
    except Exception as exc:
        # No mail.mailers before Django 6.1 (AttributeError), or an alias that is missing
        # or cannot be built (MailerDoesNotExist, InvalidMailer, ImproperlyConfigured):
        # check E010 reports it. At send time it is this provider's configuration, so the
        # next provider, fail_silently and the fallback must still get their turn.
        raise TransportError(
            Step.CONNECT,
            ProviderMisconfigured(f"mailer {provider.mailer!r}: {type(exc).__name__}: {exc}"),
            provider=provider.name,
        ) from exc
    try:
        sent = backend.send_messages([message])
    except Exception as exc:
        cause: BaseException = exc
        if isinstance(exc, ValueError | TypeError) and not isinstance(exc, InvalidMessage):
            # Another backend's ValueError (anymail's "unsupported feature", say) is that
            # backend's limit, not proof that no provider takes the message: transient,
            # like any failure of a mailer provider, so the next provider is tried.
            cause = RuntimeError(f"mailer {provider.mailer!r}: {type(exc).__name__}: {exc}")
        raise TransportError(Step.DATA, cause, provider=provider.name) from exc
    if not sent:
        raise TransportError(
            Step.DATA,
            RuntimeError(f"mailer {provider.mailer!r} sent nothing"),
            provider=provider.name,
        )
    return {}
