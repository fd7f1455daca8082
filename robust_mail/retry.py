"""Retry policy for one provider: explicit stop, wait and retry rules on top of tenacity.

No Django imports: the dispatcher builds a :class:`RetryPolicy` from ``RetryConfig`` and
tests drive it with a fake clock and sleep.

Wait between attempts (``n`` is the number of the attempt that just failed, from 1)::

    base(n)  = min(max_backoff, backoff * 2 ** (n - 1))
    delay(n) = base(n)                   when jitter is off
    delay(n) = base(n) * (1 - U / 2)     when jitter is on, U uniform in [0, 1)

so with the defaults the waits are 1 s, 2 s, 4 s, 4 s, ... and with jitter each wait lies in
``(base / 2, base]``. Jitter only ever shortens a wait, so it never exceeds ``max_backoff``,
while still spreading the retries of many workers that failed at the same moment.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

import tenacity

__all__ = ["RetryPolicy"]

T = TypeVar("T")

RetryPredicate = Callable[[BaseException], bool]
OnRetry = Callable[[int, BaseException, float], None]


class RetryPolicy:
    """How often and how patiently one operation is retried.

    ``attempts`` counts calls, not retries: ``attempts=3`` means at most three calls of
    ``fn`` and two waits. ``sleep`` and ``clock`` are injectable so tests drive time;
    ``clock`` must be the clock the ``deadline`` passed to :meth:`call` is expressed in
    (``time.monotonic`` by default). ``rng`` returns floats in ``[0, 1)`` for the jitter.

    A policy holds no per-call state and may be shared between threads.
    """

    def __init__(
        self,
        attempts: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 4.0,
        jitter: bool = True,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        *,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        if backoff < 0 or max_backoff < 0:
            raise ValueError("backoff and max_backoff must not be negative")
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.jitter = jitter
        self.sleep = sleep
        self.clock = clock
        self.rng = rng

    def __repr__(self) -> str:
        return (
            f"RetryPolicy(attempts={self.attempts}, backoff={self.backoff}, "
            f"max_backoff={self.max_backoff}, jitter={self.jitter})"
        )

    def delay(self, attempt: int) -> float:
        """Seconds to wait after attempt number ``attempt`` (1-based) failed."""
        base = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        if not self.jitter:
            return base
        return base * (1.0 - self.rng() / 2.0)

    def call(
        self,
        fn: Callable[[], T],
        *,
        retry_if: RetryPredicate,
        deadline: float | None = None,
        on_retry: OnRetry | None = None,
    ) -> T:
        """Call ``fn`` until it returns, retrying exceptions for which ``retry_if`` is true.

        Stops after ``attempts`` calls, or instead of a wait that would end after the
        absolute ``deadline`` (a ``clock()`` value); it never sleeps past the deadline.
        ``on_retry(attempt, exc, delay)`` is called before each wait. When it gives up, the
        exception of the last call is raised as it was (never tenacity's ``RetryError``);
        an exception ``retry_if`` rejects is raised after that single call.
        """

        # The first call goes straight through: nearly every send succeeds at once, and
        # building tenacity's machinery for it costs more than a pooled SMTP send's CPU.
        try:
            return fn()
        except Exception as exc:
            if self.attempts == 1 or not retry_if(exc):
                raise
            first_delay = self.delay(1)
            if deadline is not None and self.clock() + first_delay > deadline:
                raise
            if on_retry is not None:
                on_retry(1, exc, first_delay)
            self.sleep(first_delay)

        # tenacity takes over from the second call; its attempt 1 is our attempt 2.
        def wait(state: tenacity.RetryCallState) -> float:
            return self.delay(state.attempt_number + 1)

        def stop(state: tenacity.RetryCallState) -> bool:
            if state.attempt_number + 1 >= self.attempts:
                return True
            # tenacity computes the wait before asking stop, so the next sleep is known.
            return deadline is not None and self.clock() + state.upcoming_sleep > deadline

        def before_sleep(state: tenacity.RetryCallState) -> None:
            if on_retry is None:
                return
            assert state.outcome is not None
            exc = state.outcome.exception()
            assert exc is not None
            on_retry(state.attempt_number + 1, exc, state.upcoming_sleep)

        retrying = tenacity.Retrying(
            stop=stop,
            wait=wait,
            retry=tenacity.retry_if_exception(retry_if),
            sleep=self.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        return retrying(fn)
