"""Circuit breaker per provider, with its state in a pluggable store.

No Django imports. The store is the only shared thing: with :class:`MemoryStore` a breaker is
per process; with ``robust_mail.state.CacheStore`` every process and machine that shares the
Django cache (Redis) sees the same breaker.

States::

    CLOSED ──failure_threshold consecutive failures, or one fatal failure──► OPEN
    OPEN ──reset_timeout passed──► HALF_OPEN (derived from the clock, nothing is written)
    HALF_OPEN ──one caller wins the trial (atomic store.add)──► trial in progress
        trial succeeds ──► CLOSED        trial fails ──► OPEN with a fresh reset_timeout

The breaker never holds a lock while the caller talks SMTP: ``allow()`` decides and returns,
the caller sends, then reports with ``record_success()`` / ``record_failure()``.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote

__all__ = ["BreakerState", "BreakerStore", "CircuitBreaker", "MemoryStore", "OnChange"]


#: A half-open trial is reserved at least this long by default: one SMTP send, with every
#: step bounded by the provider's timeout, normally finishes well within it.
MIN_TRIAL_TIMEOUT = 30.0


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


OnChange = Callable[[str, BreakerState, BreakerState], None]


@runtime_checkable
class BreakerStore(Protocol):
    """Key-value store holding breaker state. Timeouts are seconds; ``None`` never expires.

    Implementations must be thread-safe and must not raise on storage failures (degrade
    instead): a breaker must never stop mail because its store is down. ``add`` and ``incr``
    must be atomic across every process sharing the store, because ``add`` elects the single
    half-open trial and ``incr`` counts failures reported by many processes at once.
    """

    def get(self, key: str) -> Any: ...

    def set(self, key: str, value: Any, timeout: float | None) -> None: ...

    def add(self, key: str, value: Any, timeout: float | None) -> bool:
        """Store ``value`` only if ``key`` is absent; return whether it was stored."""
        ...

    def delete(self, key: str) -> None: ...

    def incr(self, key: str, delta: int, timeout: float | None) -> int:
        """Add ``delta`` to the integer at ``key`` (absent counts as 0); return the result.

        ``timeout`` applies when the key is created.
        """
        ...


class MemoryStore:
    """Per-process :class:`BreakerStore`; ``clock`` (monotonic by default) drives expiry."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._data: dict[str, tuple[Any, float | None]] = {}

    def _expires(self, timeout: float | None) -> float | None:
        return None if timeout is None else self._clock() + timeout

    def _live(self, key: str) -> tuple[Any, float | None] | None:
        # Caller holds the lock.
        item = self._data.get(key)
        if item is not None and item[1] is not None and self._clock() >= item[1]:
            del self._data[key]
            return None
        return item

    def get(self, key: str) -> Any:
        with self._lock:
            item = self._live(key)
            return None if item is None else item[0]

    def set(self, key: str, value: Any, timeout: float | None) -> None:
        with self._lock:
            self._data[key] = (value, self._expires(timeout))

    def add(self, key: str, value: Any, timeout: float | None) -> bool:
        with self._lock:
            if self._live(key) is not None:
                return False
            self._data[key] = (value, self._expires(timeout))
            return True

    def delete(self, key: str) -> None:
        with self._lock:
            self._data.pop(key, None)

    def incr(self, key: str, delta: int, timeout: float | None) -> int:
        with self._lock:
            item = self._live(key)
            if item is None:
                self._data[key] = (delta, self._expires(timeout))
                return delta
            value = int(item[0]) + delta
            self._data[key] = (value, item[1])
            return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


class CircuitBreaker:
    """Decides whether a provider may be tried, from failures reported by every process.

    ``clock`` is wall-clock time by default because ``retry_at`` is shared between machines
    (their clocks must agree to within a small fraction of ``reset_timeout``).
    ``trial_timeout`` (default ``reset_timeout``, at least 30 s) is how long a half-open
    trial is reserved: if its holder dies without reporting, another caller gets a trial
    after that long.
    ``on_change(name, old, new)`` fires in the process that made a transition, once per
    transition.

    Cost: ``allow()`` on a closed or open breaker is one ``store.get``; a half-open breaker
    adds one ``store.add``. ``record_success()`` is a ``get`` and a ``delete``.
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        reset_timeout: float = 60.0,
        store: BreakerStore,
        clock: Callable[[], float] = time.time,
        on_change: OnChange | None = None,
        trial_timeout: float | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if reset_timeout < 0:
            raise ValueError("reset_timeout must not be negative")
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        if trial_timeout is None:
            trial_timeout = max(reset_timeout, MIN_TRIAL_TIMEOUT)
        self.trial_timeout = trial_timeout
        self.store = store
        self.clock = clock
        self.on_change = on_change
        prefix = "robust_mail:breaker:" + quote(name, safe="")
        self._state_key = prefix + ":state"
        self._failures_key = prefix + ":failures"
        self._trial_key = prefix + ":trial"

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} {self.state}>"

    # -- reading ---------------------------------------------------------------------------

    def _open_record(self) -> dict[str, float] | None:
        record = self.store.get(self._state_key)
        if isinstance(record, dict) and "retry_at" in record:
            return record
        return None

    @property
    def state(self) -> BreakerState:
        record = self._open_record()
        return BreakerState.CLOSED if record is None else self._open_state(record)

    def _open_state(self, record: dict[str, float]) -> BreakerState:
        if self.clock() >= record["retry_at"]:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    @property
    def retry_at(self) -> float | None:
        """When an open breaker admits its half-open trial (a ``clock()`` value), else None."""
        record = self._open_record()
        return None if record is None else record["retry_at"]

    @property
    def failures(self) -> int:
        """Consecutive failures counted so far (0 after a success)."""
        return int(self.store.get(self._failures_key) or 0)

    # -- deciding --------------------------------------------------------------------------

    def allow(self) -> bool:
        """Whether the caller may try this provider now.

        True while closed. While open, False until ``reset_timeout`` has passed; then True
        for exactly one caller across every process sharing the store (the trial), which
        must report its outcome with ``record_success`` or ``record_failure``.
        """
        record = self._open_record()
        if record is None:
            return True
        if self.clock() < record["retry_at"]:
            return False
        if not self.store.add(self._trial_key, self.clock(), self.trial_timeout):
            return False
        self._changed(BreakerState.OPEN, BreakerState.HALF_OPEN)
        return True

    # -- reporting -------------------------------------------------------------------------

    def record_success(self) -> None:
        """The provider accepted a message (or refused it for message reasons: it is up)."""
        self.store.delete(self._failures_key)
        record = self._open_record()
        if record is None:
            return
        old = self._open_state(record)
        self.store.delete(self._state_key)
        self.store.delete(self._trial_key)
        self._changed(old, BreakerState.CLOSED)

    def record_failure(self, *, fatal: bool = False) -> None:
        """The provider failed. ``fatal`` (auth, TLS) opens the breaker at once."""
        record = self._open_record()
        if record is not None:
            if self._open_state(record) is BreakerState.HALF_OPEN:
                # The half-open trial failed: back to open with a fresh timeout.
                self.store.set(self._state_key, self._new_record(), None)
                self.store.delete(self._trial_key)
                self._changed(BreakerState.HALF_OPEN, BreakerState.OPEN)
            # Otherwise a send that started before the breaker opened: already counted.
            return
        failures = self.store.incr(self._failures_key, 1, None)
        if fatal or failures >= self.failure_threshold:
            self.trip()

    def release(self) -> None:
        """Report no outcome (the attempt never reached the provider): free a held trial."""
        record = self._open_record()
        if record is not None and self._open_state(record) is BreakerState.HALF_OPEN:
            self.store.delete(self._trial_key)

    def trip(self) -> None:
        """Open a closed breaker now. Only one process wins the transition."""
        if self.store.add(self._state_key, self._new_record(), None):
            self._changed(BreakerState.CLOSED, BreakerState.OPEN)

    def reset(self) -> None:
        """Forget all state: the breaker is closed with no failures counted."""
        old = self.state
        for key in (self._state_key, self._failures_key, self._trial_key):
            self.store.delete(key)
        if old is not BreakerState.CLOSED:
            self._changed(old, BreakerState.CLOSED)

    def _new_record(self) -> dict[str, float]:
        now = self.clock()
        return {"opened_at": now, "retry_at": now + self.reset_timeout}

    def _changed(self, old: BreakerState, new: BreakerState) -> None:
        if self.on_change is not None and old is not new:
            self.on_change(self.name, old, new)
