"""ConnectionPool logic with an in-test connection class (no network).

The same behaviour against real SMTP servers is in test_pool_smtp.py.
"""

from __future__ import annotations

import itertools
import os
import smtplib
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import pytest

from robust_mail.exceptions import Step, TransportError
from robust_mail.pool import QUIT_TIMEOUT_AT_EXIT, ConnectionPool, PoolRegistry, PoolTimeout

_ids = itertools.count(1)


class FakeConnection:
    """Records what the pool does to it; ``alive=False`` makes NOOP fail."""

    def __init__(self, detachable: bool = False) -> None:
        self.id = next(_ids)
        self.is_open = False
        self.reusable = False
        self.messages_sent = 0
        self.alive = True
        self.events: list[str] = []
        self.deadlines: list[float | None] = []  # passed to open() and noop()
        self.in_use = False
        if detachable:
            self.detach = self._detach

    def open(self, *, deadline: float | None = None) -> bool:
        self.events.append("open")
        self.deadlines.append(deadline)
        self.is_open = self.reusable = True
        return True

    def noop(self, *, deadline: float | None = None) -> bool:
        self.events.append("noop")
        self.deadlines.append(deadline)
        if not self.alive:
            self.close()
        return self.alive

    def reset(self) -> None:
        self.events.append("reset")

    def close(self, *, timeout: float | None = None) -> None:
        self.events.append("close" if timeout is None else f"close within {timeout:g}")
        self.is_open = self.reusable = False

    def _detach(self) -> None:
        self.events.append("detach")
        self.is_open = self.reusable = False

    def send(self) -> None:
        assert self.is_open
        self.messages_sent += 1


class Factory:
    def __init__(self, fail: int = 0, detachable: bool = False) -> None:
        self.made: list[FakeConnection] = []
        self.fail = fail
        self.detachable = detachable

    def __call__(self) -> FakeConnection:
        conn = FakeConnection(self.detachable)
        if self.fail:
            self.fail -= 1

            def broken_open(*, deadline: float | None = None) -> bool:
                conn.events.append("open-failed")
                raise ConnectionRefusedError("refused")

            conn.open = broken_open  # type: ignore[method-assign]
        self.made.append(conn)
        return conn


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def factory() -> Factory:
    return Factory()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_pool(factory: Factory, clock: Clock) -> Iterator[object]:
    made: list[ConnectionPool[FakeConnection]] = []

    def make(**kwargs: object) -> ConnectionPool[FakeConnection]:
        options: dict[str, object] = {"size": 2, "idle_timeout": 60.0, "clock": clock}
        options.update(kwargs)
        pool = ConnectionPool("primary", factory, **options)  # type: ignore[arg-type]
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close()


def test_sequential_uses_share_one_connection(make_pool, factory: Factory) -> None:
    pool = make_pool()
    for _ in range(5):
        with pool.connection() as conn:
            conn.send()

    assert len(factory.made) == 1
    assert factory.made[0].messages_sent == 5
    assert factory.made[0].events == ["open"]
    assert pool.stats["reused"] == 4


def test_noop_before_reuse_only_after_being_idle(make_pool, factory: Factory, clock: Clock) -> None:
    pool = make_pool(check_after=1.0)
    with pool.connection():
        pass
    clock.now += 0.5
    with pool.connection():
        pass
    assert factory.made[0].events == ["open"]

    clock.now += 1.5
    with pool.connection():
        pass
    assert factory.made[0].events == ["open", "noop"]


def test_dead_idle_connection_is_replaced_before_the_caller_sees_it(
    make_pool, factory: Factory, clock: Clock
) -> None:
    pool = make_pool()
    with pool.connection() as first:
        pass
    first.alive = False  # the server closed it while idle
    clock.now += 5

    with pool.connection() as conn:
        conn.send()

    assert conn is not first
    assert conn.is_open
    assert first.events[:3] == ["open", "noop", "close"]
    assert pool.stats["replaced"] == 1
    assert pool.open_connections == 1


def test_connection_found_closed_is_replaced_without_noop(make_pool, factory: Factory) -> None:
    pool = make_pool()
    with pool.connection() as first:
        pass
    first.is_open = False

    with pool.connection() as conn:
        pass

    assert conn is not first
    assert "noop" not in first.events


def test_idle_timeout_closes_connections_at_next_use(
    make_pool, factory: Factory, clock: Clock
) -> None:
    pool = make_pool(idle_timeout=30.0)
    with pool.connection() as first:
        pass
    clock.now += 30

    with pool.connection() as conn:
        pass

    assert conn is not first
    assert first.events[-1].startswith("close")
    assert pool.stats["expired"] == 1


def _goodbye_waits(conn: FakeConnection) -> list[float]:
    """The timeouts the pool gave ``conn``'s close() calls (None: the connection's own)."""
    return [
        float(event.removeprefix("close within "))
        for event in conn.events
        if event.startswith("close within ")
    ]


def test_expired_connections_closed_at_check_out_share_a_short_goodbye(
    make_pool, clock: Clock
) -> None:
    # Closed on the caller's time: QUIT must not wait the provider's TIMEOUT for each.
    pool = make_pool(idle_timeout=30.0)
    with pool.connection() as a, pool.connection() as b:
        pass
    clock.now += 30

    with pool.connection(deadline=time.monotonic() + 60):
        pass

    assert "close" not in a.events + b.events  # never a close with the provider's timeout
    waits = _goodbye_waits(a) + _goodbye_waits(b)
    assert len(waits) == 2
    assert all(0 <= wait <= QUIT_TIMEOUT_AT_EXIT for wait in waits)


def test_expired_connections_closed_at_check_out_never_outlast_the_callers_deadline(
    make_pool, clock: Clock
) -> None:
    pool = make_pool(idle_timeout=30.0)
    with pool.connection() as first:
        pass
    clock.now += 30

    with pool.connection(deadline=time.monotonic() - 1):  # already out of time
        pass

    assert _goodbye_waits(first) == [0]  # closed without waiting for a reply to QUIT


def test_prune_closes_expired_idle_connections(make_pool, clock: Clock) -> None:
    pool = make_pool(idle_timeout=30.0)
    with pool.connection() as a, pool.connection() as b:
        pass
    clock.now += 10
    assert pool.prune() == 0
    clock.now += 25

    assert pool.prune() == 2
    assert not a.is_open
    assert not b.is_open
    assert pool.open_connections == 0


def test_connection_is_recycled_after_max_messages(make_pool, factory: Factory) -> None:
    pool = make_pool(max_messages=3)
    for _ in range(7):
        with pool.connection() as conn:
            conn.send()

    assert [c.messages_sent for c in factory.made] == [3, 3, 1]
    assert factory.made[0].events[-1] == "close"


def test_unreusable_connection_is_discarded_after_an_error(make_pool, factory: Factory) -> None:
    pool = make_pool()
    with pytest.raises(OSError), pool.connection() as conn:
        conn.reusable = False  # the transport lost track of the session
        raise OSError("timed out after DATA")

    assert conn.events[-1] == "close"
    assert pool.open_connections == 0
    with pool.connection() as fresh:
        pass
    assert fresh is not conn


def test_reusable_connection_survives_a_transport_error(make_pool, factory: Factory) -> None:
    pool = make_pool()
    refused = smtplib.SMTPRecipientsRefused({"to@example.com": (550, b"no such user")})
    with pytest.raises(TransportError), pool.connection() as conn:
        raise TransportError(Step.RCPT, refused)  # RSET done, session fine

    with pool.connection() as again:
        pass
    assert again is conn
    assert "close" not in conn.events


class SoftTimeLimitExceeded(Exception):
    """As Celery's: an Exception a signal handler raises wherever the task is."""


def test_block_that_raised_anything_but_a_transport_error_never_returns_its_connection(
    make_pool,
) -> None:
    pool = make_pool()
    with pytest.raises(SoftTimeLimitExceeded), pool.connection() as conn:
        # Raised mid-transaction, before the transport could update ``reusable``.
        raise SoftTimeLimitExceeded

    assert conn.events[-1] == "close"
    assert pool.open_connections == 0
    with pool.connection() as fresh:
        pass
    assert fresh is not conn


@pytest.mark.parametrize("interruption", [SoftTimeLimitExceeded, KeyboardInterrupt])
def test_interrupted_liveness_check_closes_the_connection_and_frees_its_slot(
    make_pool, factory: Factory, clock: Clock, interruption: type[BaseException]
) -> None:
    pool = make_pool(size=1, check_after=1.0)
    with pool.connection() as idle:
        pass
    clock.now += 5

    def interrupted_noop(*, deadline: float | None = None) -> bool:
        raise interruption  # while waiting for the reply to NOOP

    idle.noop = interrupted_noop  # type: ignore[method-assign]
    with pytest.raises(interruption), pool.connection():
        pass

    assert idle.events[-1] == "close"  # its reply may still come: never used again
    assert pool.open_connections == 0
    with pool.connection() as fresh:
        pass
    assert fresh is not idle
    assert len(factory.made) == 2


def test_interrupted_block_never_returns_its_connection(make_pool) -> None:
    pool = make_pool()
    with pytest.raises(KeyboardInterrupt), pool.connection() as conn:
        raise KeyboardInterrupt

    assert conn.events[-1] == "close"
    assert pool.open_connections == 0


def test_failed_open_frees_the_slot_and_closes(clock: Clock) -> None:
    factory = Factory(fail=2)
    pool = ConnectionPool("p", factory, size=1, idle_timeout=60, wait_timeout=0.1, clock=clock)
    for _ in range(2):
        with pytest.raises(ConnectionRefusedError), pool.connection():
            pass

    with pool.connection() as conn:
        assert conn.is_open
    assert [c.events[-1] for c in factory.made] == ["close", "close", "open"]
    pool.close()


def test_never_more_than_size_connections_and_one_thread_each(make_pool, factory) -> None:
    pool = make_pool(size=3)
    overlaps: list[int] = []
    peak = 0
    lock = threading.Lock()

    def worker() -> None:
        nonlocal peak
        for _ in range(200):
            with pool.connection() as conn:
                if conn.in_use:
                    overlaps.append(conn.id)
                conn.in_use = True
                with lock:
                    peak = max(peak, pool.open_connections)
                conn.send()
                conn.in_use = False

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert overlaps == []
    assert len(factory.made) <= 3
    assert peak <= 3
    assert sum(c.messages_sent for c in factory.made) == 1600


def _wait_until(condition: Callable[[], bool]) -> None:
    for _ in range(2000):
        if condition():
            return
        time.sleep(0.005)
    raise AssertionError("condition never became true")


def test_waiters_are_served_in_arrival_order_even_against_a_thread_retaking(
    make_pool,
) -> None:
    # The holder hands its connection back and asks again at once, while two threads are
    # queued: they are served first, in the order they came.
    pool = make_pool(size=1, wait_timeout=30.0)
    order: list[str] = []
    release = threading.Event()

    def use(name: str) -> None:
        with pool.connection():
            order.append(name)

    def holder() -> None:
        with pool.connection():
            order.append("holder")
            release.wait(30)
        use("holder again")

    first = threading.Thread(target=holder)
    first.start()
    _wait_until(lambda: order == ["holder"])
    waiters = [threading.Thread(target=use, args=(name,)) for name in ("a", "b")]
    waiters[0].start()
    _wait_until(lambda: pool.waiting == 1)
    waiters[1].start()
    _wait_until(lambda: pool.waiting == 2)
    release.set()
    for thread in (first, *waiters):
        thread.join()

    assert order == ["holder", "a", "b", "holder again"]


def test_a_waiter_that_times_out_leaves_the_queue(make_pool) -> None:
    pool = make_pool(size=1, wait_timeout=0.05)
    with pool.connection(), pytest.raises(PoolTimeout), pool.connection():
        pass

    assert pool.waiting == 0
    with pool.connection() as conn:  # its slot was not leaked either
        assert conn.is_open


class CountingFactory(Factory):
    """Counts sockets open at once; close() takes a moment, to widen any race."""

    def __init__(self, close_delay: float = 0.001) -> None:
        super().__init__()
        self.close_delay = close_delay
        self.lock = threading.Lock()
        self.live = self.peak = 0

    def __call__(self) -> FakeConnection:
        conn = super().__call__()
        opened, closed = conn.open, conn.close

        def counted_open(*, deadline: float | None = None) -> bool:
            with self.lock:
                self.live += 1
                self.peak = max(self.peak, self.live)
            return opened(deadline=deadline)

        def counted_close(*, timeout: float | None = None) -> None:
            was_open = conn.is_open
            time.sleep(self.close_delay)
            closed()
            if was_open:
                with self.lock:
                    self.live -= 1

        conn.open = counted_open  # type: ignore[method-assign]
        conn.close = counted_close  # type: ignore[method-assign]
        return conn


def test_a_retired_connection_is_closed_before_its_slot_is_reused(clock: Clock) -> None:
    factory = CountingFactory()
    pool = ConnectionPool("primary", factory, size=3, max_messages=1, clock=clock)

    def worker() -> None:
        for _ in range(40):
            with pool.connection() as conn:
                conn.send()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pool.close()

    assert len(factory.made) == 320  # one connection per message
    assert factory.peak <= 3
    assert factory.live == 0


def test_expired_connections_are_closed_before_new_ones_open(clock: Clock) -> None:
    factory = CountingFactory(close_delay=0.05)
    pool = ConnectionPool("primary", factory, size=2, idle_timeout=10.0, clock=clock)
    with pool.connection(), pool.connection():
        pass
    clock.now += 20  # both idle ones expire; whoever comes next closes them
    start = threading.Barrier(2)

    def use() -> None:
        start.wait(5)
        with pool.connection():
            pass

    threads = [threading.Thread(target=use) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pool.close()

    assert factory.peak == 2
    assert pool.stats["expired"] == 2
    assert factory.live == 0


def test_waiting_caller_gets_the_connection_when_it_is_handed_back(make_pool) -> None:
    pool = make_pool(size=1, wait_timeout=10.0)
    holding, release = threading.Event(), threading.Event()
    got: list[object] = []

    def holder() -> None:
        with pool.connection() as conn:
            got.append(conn)
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    holding.wait(10)
    waiter = threading.Thread(target=lambda: got.append(pool.connection().__enter__()))
    waiter.start()
    release.set()
    thread.join()
    waiter.join()

    assert got[0] is got[1]


def test_waiting_is_bounded_and_the_error_names_the_pool(make_pool) -> None:
    pool = make_pool(size=1, wait_timeout=0.05)
    with pool.connection(), pytest.raises(PoolTimeout) as info, pool.connection():
        pass

    assert isinstance(info.value, TimeoutError)
    assert "'primary'" in str(info.value)
    assert pool.open_connections == 1


def test_wait_ends_at_the_callers_deadline_not_the_pools_wait_timeout(make_pool) -> None:
    # A wait_timeout this long would make the test time out if the deadline were ignored.
    pool = make_pool(size=1, wait_timeout=600.0)
    soon = time.monotonic() + 0.05
    with pool.connection(), pytest.raises(PoolTimeout) as info, pool.connection(soon):
        pass

    assert info.value.cut_short
    assert "as long as the caller could wait" in str(info.value)


def test_max_wait_caps_one_callers_wait(make_pool) -> None:
    pool = make_pool(size=1, wait_timeout=600.0)
    with pool.connection(), pytest.raises(PoolTimeout) as info, pool.connection(max_wait=0.05):
        pass

    assert info.value.cut_short


def test_deadline_is_passed_to_open_and_to_the_liveness_check(
    make_pool, factory: Factory, clock: Clock
) -> None:
    pool = make_pool(check_after=1.0)
    deadline = time.monotonic() + 30
    with pool.connection(deadline):
        pass
    clock.now += 5
    with pool.connection(deadline):
        pass

    assert factory.made[0].events == ["open", "noop"]
    assert factory.made[0].deadlines == [deadline, deadline]


def test_close_closes_idle_now_and_in_use_when_handed_back(make_pool) -> None:
    pool = make_pool()
    with pool.connection() as busy:
        with pool.connection() as idle:
            pass
        pool.close()
        assert idle.events[-1] == "close"
        assert busy.is_open
    assert busy.events[-1] == "close"
    assert pool.open_connections == 0


def test_registry_returns_one_pool_per_key_and_reconfigures_it() -> None:
    registry = PoolRegistry()
    factory = Factory()
    first = registry.get(("primary", 25), factory, size=2, idle_timeout=60)
    same = registry.get(("primary", 25), Factory(), size=2, idle_timeout=60)
    other = registry.get(("backup", 25), factory, size=2, idle_timeout=60)
    resized = registry.get(("primary", 25), factory, size=7, idle_timeout=5, max_messages=10)

    assert first is same is resized
    assert other is not first
    assert (first.size, first.idle_timeout, first.max_messages) == (7, 5, 10)
    with first.connection() as conn:
        pass
    registry.clear()
    assert conn.events[-1] == "close"
    assert registry.all() == []


def test_registry_names_pools_after_the_provider() -> None:
    class Provider:
        name = "mailgun"

    registry = PoolRegistry()
    pool = registry.get(Provider(), Factory(), size=1, idle_timeout=1)
    assert pool.name == "mailgun"
    registry.clear()


def _fork() -> int:
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a process with threads; forking is the point.
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("detachable", [True, False], ids=["detach", "no-detach"])
def test_forked_child_forgets_the_parents_connections(clock: Clock, detachable: bool) -> None:
    factory = Factory(detachable=detachable)
    pool = ConnectionPool("primary", factory, size=2, idle_timeout=60, clock=clock)
    with pool.connection() as parents:
        pass
    read_fd, write_fd = os.pipe()

    pid = _fork()
    if pid == 0:  # child: report, then leave without running pytest's teardown
        try:
            before = pool.idle_connections
            with pool.connection() as conn:
                fresh = conn is not parents and factory.made[-1] is conn
            report = f"{before} {fresh} {','.join(parents.events)}"
        except BaseException as exc:
            report = f"error {exc!r}"
        os.write(write_fd, report.encode())
        os._exit(0)

    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reader:
        report = reader.read().decode()
    os.waitpid(pid, 0)

    expected_events = "open,detach" if detachable else "open"
    assert report == f"0 True {expected_events}"  # no close (QUIT) from the child
    assert parents.events == ["open"]
    with pool.connection() as conn:
        assert conn is parents  # the parent's connection is still the parent's
    pool.close()


def test_rejects_a_pool_of_no_connections() -> None:
    with pytest.raises(ValueError):
        ConnectionPool("p", Factory(), size=0)
