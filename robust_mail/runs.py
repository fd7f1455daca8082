"""Runs: several messages' first attempts on one connection, then each on its own.

:class:`Runs` is a mixin of :class:`~robust_mail.dispatch.Dispatcher` holding
``deliver_many``: the first attempt of every message at the first provider goes out in one
pipelined run (:meth:`SMTPConnection.send_many <robust_mail.transport.SMTPConnection>`),
and each message then goes on from its own outcome as a lone ``deliver()`` would.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from django.core.mail import EmailMessage

from robust_mail.envelope import Envelope, build_envelope
from robust_mail.exceptions import CapabilityMissing, InvalidMessage, TransportError
from robust_mail.pool import PoolTimeout
from robust_mail.results import DeliveryResult
from robust_mail.transactions import Outcome

if TYPE_CHECKING:
    from robust_mail.conf import RobustMailConfig
    from robust_mail.providers import ProviderConfig
    from robust_mail.ratelimit import Hit
    from robust_mail.transport import SMTPConnection

__all__ = ["First", "Runs"]

logger = logging.getLogger("robust_mail")

T = TypeVar("T")


@dataclass
class First:
    """A first attempt made already: its outcome, and its share of the time it took."""

    outcome: Outcome | PoolTimeout
    seconds: float

    def unwrap(self) -> dict[str, tuple[int, str]]:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


class Runs:
    """``deliver_many`` for :class:`~robust_mail.dispatch.Dispatcher`, which provides the rest."""

    config: RobustMailConfig
    clock: Callable[[], float]

    def _admit(self, envelope: Envelope) -> tuple[DeliveryResult | None, list[Hit]]:
        raise NotImplementedError

    def _conclude(self, message: EmailMessage, result: DeliveryResult) -> DeliveryResult:
        raise NotImplementedError

    def _settle_hits(self, hits: list[Hit], result: DeliveryResult | None) -> None:
        raise NotImplementedError

    def _deliver(
        self,
        message: EmailMessage,
        envelope: Envelope,
        deadline: float,
        *,
        first: First | None = None,
        stopped: bool = False,
    ) -> DeliveryResult:
        raise NotImplementedError

    def _closed(self, provider: ProviderConfig) -> bool:
        raise NotImplementedError

    def _on_connection(
        self,
        provider: ProviderConfig,
        deadline: float,
        send: Callable[[SMTPConnection, float], T],
        *,
        last_chance: bool,
    ) -> T:
        raise NotImplementedError

    def deliver_many(
        self,
        messages: Sequence[tuple[EmailMessage, bytes | None]],
        *,
        proceed: Callable[[], bool] | None = None,
        on_result: Callable[[int, DeliveryResult | Exception], None] | None = None,
    ) -> list[DeliveryResult | Exception | None]:
        """Deliver several ``(message, rendered)``; for each, what :meth:`deliver` would
        return or raise (:class:`InvalidMessage`, or any other exception, which stops
        only that message) — or None when ``proceed()`` (asked before each message is
        first sent) returned False: that message was left alone.

        The messages' first attempt at the first provider, when it is an SMTP server
        whose breaker is closed, goes over one pooled connection with
        :meth:`SMTPConnection.send_many` (one round trip per message where the server
        pipelines). Each message then goes on from its own outcome as in :meth:`deliver`
        — retries, failover, classification, breaker reports — with its own deadline.
        ``on_result(index, result)`` is called as soon as each result is known: a message
        accepted at once is reported while the run is still going.
        """
        results: list[DeliveryResult | Exception | None] = [None] * len(messages)

        def done(index: int, result: DeliveryResult | Exception) -> None:
            results[index] = result
            if on_result is not None:
                try:
                    on_result(index, result)
                except Exception:
                    # The caller's problem; the result stays in the returned list.
                    logger.exception("message %s: on_result raised; ignored", index)

        envelopes: dict[int, Envelope] = {}
        for index, (message, rendered) in enumerate(messages):
            try:
                envelopes[index] = build_envelope(message, data=rendered)
            except InvalidMessage as exc:
                done(index, exc)
        admitted: list[int] = []
        hits: dict[int, list[Hit]] = {}  # by index: two messages may share a Message-ID
        for index, envelope in envelopes.items():
            limited, hits[index] = self._admit(envelope)
            if limited is None:
                admitted.append(index)
            else:
                done(index, self._conclude(messages[index][0], limited))

        def finish(index: int, first: First | None, *, more: bool = True) -> None:
            message, envelope = messages[index][0], envelopes[index]
            # Its own DEADLINE, as if it had come alone: what its first attempt took counts,
            # the time spent on the other messages of the run does not. Not ``more``: no
            # time at all, so its first attempt decides (retried later by the caller).
            budget = self.config.retry.deadline - (first.seconds if first else 0)
            deadline = self.clock() + (budget if more else 0.0)
            result: DeliveryResult | Exception
            try:
                result = self._deliver(message, envelope, deadline, first=first, stopped=not more)
            except Exception as exc:
                result = exc
                if first is not None and isinstance(first.outcome, dict):
                    # The provider has the message; what failed after is our bookkeeping
                    # (metrics, breaker). Reporting an error would get it sent again.
                    logger.exception("message %s: after it was accepted", envelope.message_id)
                    provider = self.config.providers[0].name
                    result = DeliveryResult.delivered(envelope.message_id, provider, first.outcome)
            if isinstance(result, DeliveryResult):
                try:
                    self._settle_hits(hits.pop(index), result)
                    self._conclude(message, result)
                except Exception:
                    logger.exception("message %s: reporting it failed", envelope.message_id)
            done(index, result)

        try:
            firsts = self._first_attempts(
                [envelopes[i] for i in admitted],
                proceed,
                accepted=lambda position, first: finish(admitted[position], first),
            )
            for index, first in zip(admitted, firsts, strict=True):
                if results[index] is not None:
                    continue  # accepted in the run, already finished
                if proceed is not None and not proceed():
                    if first is not None:
                        # Tried in the run and failed, but the caller wants nothing more
                        # sent now (a worker stopping, or its lease running out): no retry
                        # and no failover, which could still be sending when another worker
                        # has taken the message over; its first attempt is its outcome.
                        finish(index, first, more=False)
                    continue
                finish(index, first)
        finally:
            for index in admitted:
                # Never attempted (the run stopped, or raised before it): not sent, its
                # hits go back. Raised out of its delivery: it may have gone out, they stay.
                if results[index] is None and index in hits:
                    self._settle_hits(hits.pop(index), None)
        return results

    def _first_attempts(
        self,
        envelopes: list[Envelope],
        proceed: Callable[[], bool] | None,
        *,
        accepted: Callable[[int, First], None],
    ) -> list[First | None]:
        """The first provider's answer to each envelope, sent on one connection.

        ``accepted(position, first)`` is called for each message the provider accepts, as
        soon as it does. None for a message not attempted: the run stopped before it (its
        session closed after an earlier failure, or ``proceed()`` said stop), or there is
        no run (fewer than two messages; the first provider is a mailer alias or its
        breaker is not closed, where each message must ask the breaker itself).
        """
        providers = self.config.providers
        if len(envelopes) < 2 or not providers or providers[0].mailer:
            return [None] * len(envelopes)
        provider = providers[0]
        if not self._closed(provider):
            return [None] * len(envelopes)
        items = [(e.from_addr, list(e.recipients), e.data) for e in envelopes]
        started = time.perf_counter()
        spent: dict[int, float] = {}  # what each message's own attempt took
        last: list[Outcome | None] = []  # the outcomes of the latest pass

        def on_outcome(position: int, outcome: Outcome, seconds: float) -> None:
            spent[position] = seconds
            if not isinstance(outcome, TransportError):
                accepted(position, First(outcome, seconds))

        def send(conn: SMTPConnection, until: float) -> list[Outcome | None]:
            # POOL.MAX_MESSAGES holds for a run too: the rest go out on their own afterwards.
            room = len(items)
            if self.config.pool.max_messages:
                room = max(1, self.config.pool.max_messages - conn.messages_sent)
            last[:] = [
                *conn.send_many(
                    items[:room],
                    budget=self.config.retry.deadline,
                    proceed=proceed,
                    on_outcome=on_outcome,
                ),
                *[None] * (len(items) - room),
            ]
            # The first message that reached the server failed and ended the session: if the
            # pooled connection had been closed while idle, the whole run goes again on a
            # fresh one (nothing of any message was sent; those refused before any traffic
            # are refused again).
            lead = next((o for o in last if o is not None and not _before_traffic(o)), None)
            if isinstance(lead, TransportError):
                after = last[next(i for i, o in enumerate(last) if o is lead) + 1 :]
                if all(o is None for o in after):
                    raise lead
            return list(last)

        deadline = self.clock() + self.config.retry.deadline  # for the connection itself
        try:
            outcomes: list[Outcome | PoolTimeout | None] = list(
                self._on_connection(provider, deadline, send, last_chance=len(providers) == 1)
            )
        except (TransportError, PoolTimeout) as exc:
            if any(o is exc for o in last):
                outcomes = list(last)  # the run's own failure, not a stale connection
            else:
                # No connection: that was the first message's attempt; no other was tried.
                outcomes = [exc, *[None] * (len(envelopes) - 1)]
                spent[0] = time.perf_counter() - started
        return [None if o is None else First(o, spent.get(i, 0.0)) for i, o in enumerate(outcomes)]


def _before_traffic(outcome: Outcome) -> bool:
    """Refused by our own checks before anything was sent (an address, SIZE, SMTPUTF8)."""
    return (
        isinstance(outcome, TransportError)
        and outcome.code is None
        and isinstance(outcome.cause, InvalidMessage | CapabilityMissing)
    )
