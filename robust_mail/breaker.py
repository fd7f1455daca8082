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
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote

from robust_mail.forks import renew_lock_after_fork

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
        renew_lock_after_fork(self)  # a fresh lock in a forked child

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

    def get_many(self, keys: list[str]) -> dict[str, Any]:
        """The values of the present keys (see :class:`CircuitBreaker` for why)."""
        with self._lock:
            found = {key: self._live(key) for key in keys}
        return {key: item[0] for key, item in found.items() if item is not None}

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

    Cost: ``allow()`` is one store read (``get_many`` of the state and the failure count,
    when the store has it, else ``get``); a half-open breaker adds one ``store.add``. After
    an ``allow()`` that found the breaker closed with no failures counted,
    ``record_success()`` in the same thread costs nothing: there is nothing to reset.
    Otherwise it is a ``delete``, a ``get`` and, if the breaker was open, two ``delete``.

    Why skipping that reset is safe across processes: the caller's send ran from its
    ``allow()`` to its report, so its success may be placed at the moment ``allow()`` read
    the store, when there was nothing to reset. Failures another process reported after
    that read are concurrent with this send and stay counted — as they would had they
    been reported a moment later. A stale reading can only cost an extra ``delete``. So
    placed, such a success also leaves alone a breaker another process opened after that
    read: it stays open until its half-open trial. (A success with failures to reset reads
    the state anyway, and closes an open breaker.)
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
        # Per thread, between an allow() that returned True and the report that follows:
        # whether that allow() found the breaker closed with no failures counted, and the
        # token of the half-open trial it won, if it won one.
        self._seen = threading.local()

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
        record, clean = self._read()
        # A trial this thread won and has not reported yet stays its own until reported.
        self._seen.clean = False
        if record is None:
            self._seen.clean = clean
            return True
        if self.clock() < record["retry_at"]:
            return False
        # The token tells this trial from a later one (after ours expired): a report only
        # ever frees the trial its own allow() won.
        token = secrets.token_hex(8)
        if not self.store.add(self._trial_key, token, self.trial_timeout):
            return False
        self._seen.trial = token
        self._changed(BreakerState.OPEN, BreakerState.HALF_OPEN)
        return True

    def _read(self) -> tuple[dict[str, float] | None, bool]:
        """The open record, and whether no failures are counted (False when unknown)."""
        get_many = getattr(self.store, "get_many", None)
        if get_many is None:
            return self._open_record(), False
        values = get_many([self._state_key, self._failures_key])
        record = values.get(self._state_key)
        if not (isinstance(record, dict) and "retry_at" in record):
            record = None
        return record, not values.get(self._failures_key)

    def _take_seen(self) -> tuple[bool, str | None]:
        """Consume what this thread's last ``allow()`` saw: (closed with no failures,
        the token of the trial it won or None)."""
        clean = bool(getattr(self._seen, "clean", False))
        trial = getattr(self._seen, "trial", None)
        self._seen.clean, self._seen.trial = False, None
        return clean, trial

    def _free_trial(self, token: str | None) -> None:
        """Free the half-open trial ``token`` won, unless it expired and is someone else's."""
        if token is not None and self.store.get(self._trial_key) == token:
            self.store.delete(self._trial_key)

    # -- reporting -------------------------------------------------------------------------

    def record_success(self) -> None:
        """The provider accepted a message (or refused it for message reasons: it is up)."""
        clean, trial = self._take_seen()
        if clean and trial is None:
            return  # nothing to reset (see the class docstring for why this is safe)
        self.store.delete(self._failures_key)
        record = self._open_record()
        if record is None:
            self._free_trial(trial)  # closed meanwhile by another caller's success
            return
        # A success that reads the state closes it, also one of a send that started before
        # it opened: the provider is up. A trial in flight is moot then (everyone may send again).
        old = self._open_state(record)
        self.store.delete(self._state_key)
        self.store.delete(self._trial_key)
        self._changed(old, BreakerState.CLOSED)

    def record_failure(self, *, fatal: bool = False) -> None:
        """The provider failed. ``fatal`` (auth, TLS) opens the breaker at once.

        While open or half-open, only the caller holding the half-open trial changes
        anything: its failure re-opens the breaker with a fresh timeout. A failure of a
        send that started before the breaker opened was already accounted for, and must
        neither re-open it nor free another caller's trial (which would let a second
        trial start while the first is in flight).
        """
        _, trial = self._take_seen()
        record = self._open_record()
        if record is not None:
            if trial is not None and self._open_state(record) is BreakerState.HALF_OPEN:
                # This caller's half-open trial failed: back to open with a fresh timeout.
                self.store.set(self._state_key, self._new_record(), None)
                self._changed(BreakerState.HALF_OPEN, BreakerState.OPEN)
            self._free_trial(trial)
            return
        # Closed meanwhile by another caller's success: a trial this caller won must still
        # be freed, or the next half-open would admit nobody until it expires.
        self._free_trial(trial)
        failures = self.store.incr(self._failures_key, 1, None)
        if fatal or failures >= self.failure_threshold:
            self.trip()

    def release(self) -> None:
        """Report no outcome (the attempt never reached the provider): free the half-open
        trial this caller's ``allow()`` won, if any. Never frees another caller's."""
        _, trial = self._take_seen()
        self._free_trial(trial)

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
