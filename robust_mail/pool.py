"""Process-wide pools of open SMTP connections, one pool per provider.

No Django imports. Django builds a new email backend for every ``send_mail`` call, so
connections kept on a backend instance would be opened (DNS, TCP, TLS handshake, AUTH) for
every message. The pools here live for the whole process instead, keyed by provider, and
hand each connection to one thread at a time.

Lifecycle of a connection, all inside :meth:`ConnectionPool.connection`:

- reused most-recently-used first, so spare connections go idle and expire;
- idle for more than ``check_after`` seconds → NOOP first; a dead one is closed and replaced
  by a fresh one before the caller sees it (a message is never sent on it, so never lost);
- idle for more than ``idle_timeout`` seconds → closed (lazily, at the next use of the pool,
  or by :meth:`ConnectionPool.prune`); closed at a check-out, their QUITs wait at most half
  a second in all and never past the caller's deadline;
- ``max_messages`` messages sent → closed after use;
- the caller's block raised and the connection is not ``reusable`` → closed; so is one
  whose block raised anything but a ``TransportError`` (the transport settles the session
  for those; anything else may have left a reply owed).

Fork: the child forgets every connection inherited from the parent without any I/O on it
(no QUIT, no TLS close), so the parent's sessions are untouched; the child opens its own.
Exit: idle connections are closed by an ``atexit`` hook, with a QUIT that waits at most
half a second for its reply and a one-second budget for all of them together, so a hung
provider cannot hold up the interpreter's exit.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast

from robust_mail.exceptions import RobustMailError, TransportError

__all__ = ["ConnectionPool", "PoolRegistry", "PoolTimeout", "PooledConnection", "pools"]

logger = logging.getLogger("robust_mail.pool")


class PooledConnection(Protocol):
    """What the pool needs of a connection (``robust_mail.transport.SMTPConnection``).

    ``open()`` raises on failure and leaves nothing open. ``noop()`` returns False (and
    closes) when the session is dead. Both take an absolute ``deadline``
    (``time.monotonic()``, or None) that bounds their network I/O. ``close()`` never
    raises, also on a dead socket; its ``timeout`` (seconds, or None for the connection's
    own) bounds the goodbye (QUIT), 0 meaning none. ``reusable`` is True only while the
    session is ready for the next message. An optional ``detach()`` closes this
    process's socket without sending anything (used after fork).
    """

    @property
    def is_open(self) -> bool: ...

    reusable: bool
    messages_sent: int

    def open(self, *, deadline: float | None = None) -> object: ...

    def noop(self, *, deadline: float | None = None) -> bool: ...

    def reset(self) -> None: ...

    def close(self, *, timeout: float | None = None) -> None: ...


class PoolTimeout(RobustMailError, TimeoutError):
    """Every connection of a pool stayed busy for longer than the pool's ``wait_timeout``."""

    def __init__(self, pool: str, size: int, waited: float, *, cut_short: bool = False) -> None:
        why = " (as long as the caller could wait)" if cut_short else ""
        super().__init__(
            f"connection pool {pool!r}: all {size} connections stayed busy for {waited:.1f} s{why}"
        )
        self.pool = pool
        self.size = size
        #: True when the caller's deadline or ``max_wait``, not ``wait_timeout``, ended the wait.
        self.cut_short = cut_short


C = TypeVar("C", bound=PooledConnection)


@dataclass
class _Idle(Generic[C]):
    conn: C
    since: float


class _Waiter(Generic[C]):
    """A thread queued for a busy pool; granted a slot (and maybe an idle connection)."""

    __slots__ = ("cond", "granted", "item")

    def __init__(self, lock: threading.Lock) -> None:
        self.cond = threading.Condition(lock)
        self.granted = False
        self.item: _Idle[C] | None = None


class ConnectionPool(Generic[C]):
    """At most ``size`` open connections made by ``factory``, each used by one thread at a time.

    ``wait_timeout`` bounds how long :meth:`connection` waits for a busy pool before raising
    :class:`PoolTimeout`. ``clock`` (monotonic) measures idle times. Thread-safe; the lock is
    never held during network I/O.

    Fairness: callers that find the pool busy queue up and are served first come, first
    served. A connection handed back goes straight to the longest waiter, so threads that
    keep sending can never starve one that is waiting.

    ``size`` counts every open socket: a connection being opened, in use, idle, or being
    closed (retired after ``max_messages``, expired, broken) holds its slot until its socket
    is closed, so the pool is never above ``size``, not even for a moment.
    """

    def __init__(
        self,
        name: str,
        factory: Callable[[], C],
        *,
        size: int = 5,
        idle_timeout: float = 60.0,
        max_messages: int | None = None,
        wait_timeout: float = 10.0,
        check_after: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.name = name
        self.factory = factory
        self.size = size
        self.idle_timeout = idle_timeout
        self.max_messages = max_messages
        self.wait_timeout = wait_timeout
        self.check_after = check_after
        self.clock = clock
        self._init_state()
        _all_pools.add(self)

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Idle[C]] = []  # most recently used last
        # Slots held by connections handed out, being opened, or being closed.
        self._busy = 0
        self._waiters: collections.deque[_Waiter[C]] = collections.deque()
        self._generation = 0
        self._pid = os.getpid()
        self._stats = dict.fromkeys(("opened", "reused", "replaced", "discarded", "expired"), 0)

    def __repr__(self) -> str:
        return f"<ConnectionPool {self.name!r} size={self.size} idle={len(self._idle)}>"

    @property
    def open_connections(self) -> int:
        """Connections currently open, being opened or being closed (idle + in use)."""
        with self._lock:
            return self._busy + len(self._idle)

    @property
    def waiting(self) -> int:
        """Callers queued for a connection right now."""
        with self._lock:
            return len(self._waiters)

    @property
    def stats(self) -> dict[str, int]:
        """Counts since the pool was made: connections ``opened``, ``reused``, ``replaced``
        (found dead before reuse), ``discarded`` (after an error), ``expired`` (idle)."""
        with self._lock:
            return dict(self._stats)

    def _count(self, name: str) -> None:
        with self._lock:
            self._stats[name] += 1

    @property
    def idle_connections(self) -> int:
        with self._lock:
            return len(self._idle)

    @contextlib.contextmanager
    def connection(
        self, deadline: float | None = None, *, max_wait: float | None = None
    ) -> Iterator[C]:
        """An open connection for the duration of the ``with`` block.

        Blocks while all ``size`` connections are in use, for at most ``wait_timeout``
        seconds, at most ``max_wait`` seconds and never past ``deadline`` (absolute
        ``time.monotonic()``), then raises :class:`PoolTimeout`. Waiters are served in
        arrival order. ``deadline`` also bounds the liveness check, the closing of expired
        idle connections and the opening of a fresh connection. Errors opening a fresh
        connection propagate (``TransportError`` from the transport) and free the slot.
        """
        conn, generation = self._checkout(deadline, max_wait)
        pid = os.getpid()
        try:
            yield conn
        except TransportError:
            # The transport settled the session: ``reusable`` says whether it can go on.
            self._checkin(conn, generation, pid, failed=True)
            raise
        except BaseException:
            # Anything else (a task's time limit raised by a signal handler, KeyboardInterrupt,
            # a bug) may have cut a transaction short, where ``reusable`` was not updated
            # and a reply may still be owed: never pool it again.
            conn.reusable = False
            self._checkin(conn, generation, pid, failed=True)
            raise
        self._checkin(conn, generation, pid, failed=False)

    def prune(self) -> int:
        """Close the connections idle for longer than ``idle_timeout``; return how many."""
        with self._lock:
            expired = self._take_expired()
        self._retire(expired)
        return len(expired)

    def close(self, *, until: float | None = None) -> None:
        """Close every idle connection. Connections in use are closed when handed back.

        ``until`` (absolute ``time.monotonic()``) bounds the goodbyes: each QUIT waits at
        most :data:`QUIT_TIMEOUT_AT_EXIT` for its reply and none starts after ``until``.
        """
        with self._lock:
            idle, self._idle = [item.conn for item in self._idle], []
            self._busy += len(idle)  # their slots stay taken until their sockets are closed
            self._generation += 1  # in-use connections are discarded on check-in
        self._retire(idle, until=until)

    def configure(self, *, size: int, idle_timeout: float, max_messages: int | None = None) -> None:
        """Change the limits; they apply from the next check-out."""
        with self._lock:
            self.size, self.idle_timeout, self.max_messages = size, idle_timeout, max_messages
            self._grant()

    # -- internals -------------------------------------------------------------------------

    def _take_expired(self) -> list[C]:
        # Caller holds the lock. The expired connections keep their slots (counted busy)
        # until _retire() has closed them.
        now = self.clock()
        keep = [item for item in self._idle if now - item.since < self.idle_timeout]
        expired = [item.conn for item in self._idle if now - item.since >= self.idle_timeout]
        self._idle = keep
        self._busy += len(expired)
        self._stats["expired"] += len(expired)
        return expired

    def _retire(self, conns: list[C], *, until: float | None = None) -> None:
        """Close connections whose slots are counted busy, then free the slots."""
        if not conns:
            return
        _close_all(conns, until=until)
        with self._lock:
            self._busy -= len(conns)
            self._grant()

    def _grant(self) -> None:
        """Hand free capacity to queued waiters, oldest first. Caller holds the lock."""
        while self._waiters and (self._idle or self._busy < self.size):
            waiter = self._waiters.popleft()
            waiter.item = self._idle.pop() if self._idle else None
            waiter.granted = True
            self._busy += 1
            waiter.cond.notify()

    def _checkout(self, limit: float | None, max_wait: float | None) -> tuple[C, int]:
        # Waiting uses the real monotonic clock: Condition.wait does, whatever self.clock is.
        started = time.monotonic()
        wait = self.wait_timeout if max_wait is None else min(self.wait_timeout, max_wait)
        deadline = started + wait
        cut_short = wait < self.wait_timeout
        if limit is not None and limit < deadline:
            deadline, cut_short = limit, True
        while True:
            with self._lock:
                # Expired ones are few; they are closed below, after the lock is released.
                expired = self._take_expired()
                if not expired:
                    item, granted = self._acquire(deadline)
                    generation = self._generation
                    break
            # On the caller's time: their QUITs share a short budget, within the caller's
            # deadline, so a provider that stopped answering cannot hold the caller for a
            # full timeout per expired connection before its message is even started.
            until = time.monotonic() + CLOSE_BUDGET_AT_CHECKOUT
            self._retire(expired, until=until if limit is None else min(until, limit))
        if not granted:
            waited = time.monotonic() - started
            raise PoolTimeout(self.name, self.size, waited, cut_short=cut_short)
        try:
            return self._ready(item, limit), generation
        except BaseException:
            with self._lock:
                self._busy -= 1
                self._grant()
            raise

    def _acquire(self, deadline: float) -> tuple[_Idle[C] | None, bool]:
        """A slot (and an idle connection if there is one), or (None, False) at ``deadline``.

        Caller holds the lock. Nobody jumps the queue: with waiters queued, a newcomer
        queues behind them even if capacity just became free (it is theirs).
        """
        if not self._waiters:
            if self._idle:
                self._busy += 1
                return self._idle.pop(), True
            if self._busy < self.size:
                self._busy += 1
                return None, True  # room to open a new one
        waiter: _Waiter[C] = _Waiter(self._lock)
        self._waiters.append(waiter)
        try:
            while not waiter.granted:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                waiter.cond.wait(remaining)
        except BaseException:
            # Interrupted while waiting (the lock is held again here): leave no trace.
            if waiter.granted:
                if waiter.item is not None:
                    self._idle.append(waiter.item)
                self._busy -= 1
                self._grant()
            else:
                self._waiters.remove(waiter)
            raise
        if waiter.granted:  # possibly at the last moment: a grant is never dropped
            return waiter.item, True
        self._waiters.remove(waiter)
        return None, False

    def _ready(self, item: _Idle[C] | None, deadline: float | None) -> C:
        """The idle connection if it is still alive, else a freshly opened one."""
        if item is not None:
            conn = item.conn
            alive = conn.is_open
            if alive and self.clock() - item.since > self.check_after:
                try:
                    alive = bool(conn.noop(deadline=deadline))
                except BaseException:
                    # noop() reports a dead session by returning False: this is something
                    # else (a task's time limit, KeyboardInterrupt) cutting the wait for its
                    # reply short. Close it (the reply may still come) and let it through;
                    # the caller frees the slot.
                    conn.reusable = False
                    self._count("discarded")
                    _close_all([conn])
                    raise
            if alive:
                self._count("reused")
                return conn
            logger.info("pool %s: idle connection was dead; opening a fresh one", self.name)
            self._count("replaced")
            _close_all([conn])
        conn = self.factory()
        try:
            conn.open(deadline=deadline)
        except BaseException:
            _close_all([conn])
            raise
        self._count("opened")
        return conn

    def _checkin(self, conn: C, generation: int, pid: int, *, failed: bool) -> None:
        if pid != os.getpid():
            # Checked out before a fork, handed back in the child: the parent owns it.
            _forget(conn)
            return
        keep = conn.is_open and conn.reusable
        if keep and self.max_messages is not None and conn.messages_sent >= self.max_messages:
            keep = False
        if keep:
            with self._lock:
                # A close() since check-out means this connection must not be pooled again.
                if generation == self._generation:
                    self._idle.append(_Idle(conn, self.clock()))
                    self._busy -= 1
                    self._grant()  # straight to the longest waiter, if any
                    return
        if failed:
            self._count("discarded")
        # Closed while still holding its slot: a waiter may open a new one only after.
        self._retire([conn])

    def _after_fork_in_child(self) -> None:
        # The parent's connections share sockets (and TLS state) with the parent: drop them
        # without any I/O. The lock may have been held by a parent thread: make a new one.
        inherited = [item.conn for item in self._idle]
        self._init_state()
        for conn in inherited:
            _forget(conn)


#: At interpreter exit, how long one idle connection may wait for the reply to its QUIT...
QUIT_TIMEOUT_AT_EXIT = 0.5
#: ...and how long all of them together may take; the rest are closed without a QUIT.
CLOSE_BUDGET_AT_EXIT = 1.0
#: How long the expired idle connections a check-out finds may take together to close
#: (never past the caller's deadline); each QUIT waits at most QUIT_TIMEOUT_AT_EXIT.
CLOSE_BUDGET_AT_CHECKOUT = 0.5


def _close_all(conns: Iterable[PooledConnection], *, until: float | None = None) -> None:
    for conn in conns:
        try:
            if until is None:
                conn.close()
            else:
                left = max(0.0, until - time.monotonic())
                conn.close(timeout=min(QUIT_TIMEOUT_AT_EXIT, left))
        except Exception:  # close() must not raise; never let a bad one stop the others
            logger.debug("closing a pooled connection raised", exc_info=True)


#: Connections inherited across fork that could not be detached: kept referenced so that
#: garbage collection never closes (or warns about) the parent's sockets from the child.
_orphans: list[PooledConnection] = []


def _forget(conn: PooledConnection) -> None:
    detach = getattr(conn, "detach", None)
    if callable(detach):
        try:
            detach()
            return
        except Exception:
            logger.debug("detaching an inherited connection raised", exc_info=True)
    _orphans.append(conn)


class PoolRegistry:
    """The process-wide pools, one per provider key (``pools`` is the instance)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: dict[Hashable, ConnectionPool[Any]] = {}

    def get(
        self,
        key: Hashable,
        factory: Callable[[], C],
        *,
        size: int,
        idle_timeout: float,
        max_messages: int | None = None,
        wait_timeout: float | None = None,
    ) -> ConnectionPool[C]:
        """The pool for ``key`` (a ``ProviderConfig``), made with ``factory`` on first use.

        Later calls with other limits reconfigure the existing pool; the first factory
        stays (the key must identify everything the factory depends on).
        """
        pool = cast("ConnectionPool[C] | None", self._pools.get(key))
        if pool is None:
            with self._lock:
                pool = cast("ConnectionPool[C] | None", self._pools.get(key))
                if pool is None:
                    name = str(getattr(key, "name", key))
                    pool = ConnectionPool(
                        name,
                        factory,
                        size=size,
                        idle_timeout=idle_timeout,
                        max_messages=max_messages,
                        wait_timeout=10.0 if wait_timeout is None else wait_timeout,
                    )
                    self._pools[key] = pool
                    return pool
        if (pool.size, pool.idle_timeout, pool.max_messages) != (
            size,
            idle_timeout,
            max_messages,
        ):
            pool.configure(size=size, idle_timeout=idle_timeout, max_messages=max_messages)
        return pool

    def all(self) -> list[ConnectionPool[Any]]:
        with self._lock:
            return list(self._pools.values())

    def close_all(self) -> None:
        """Close every idle connection of every pool (the pools stay usable)."""
        for pool in self.all():
            pool.close()

    def clear(self) -> None:
        """Close and forget every pool (for tests, after their servers stop)."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()


pools = PoolRegistry()

#: Every pool of this process, registry or not, for the fork and exit hooks.
_all_pools: weakref.WeakSet[ConnectionPool[Any]] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    pools._after_fork_in_child()
    for pool in list(_all_pools):
        pool._after_fork_in_child()


def _close_at_exit() -> None:
    # A provider that stopped answering must not hold up the interpreter's exit for a
    # full TIMEOUT per idle connection: QUIT politely, but briefly.
    pid = os.getpid()
    until = time.monotonic() + CLOSE_BUDGET_AT_EXIT
    for pool in list(_all_pools):
        if pool._pid == pid:
            pool.close(until=until)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_at_exit)
