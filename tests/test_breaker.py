"""CircuitBreaker transitions with a fake clock, and the MemoryStore contract."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from robust_mail.breaker import BreakerState, BreakerStore, CircuitBreaker, MemoryStore

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Harness:
    def __init__(self, **kwargs: object) -> None:
        self.clock = FakeClock()
        self.store = MemoryStore(clock=self.clock)
        self.changes: list[tuple[str, BreakerState, BreakerState]] = []
        self.kwargs: dict[str, object] = {"failure_threshold": 3, "reset_timeout": 60.0}
        self.kwargs.update(kwargs)
        self.breaker = self.new()

    def new(self) -> CircuitBreaker:
        """Another breaker for the same provider and store, as in another process."""
        return CircuitBreaker(
            "primary",
            store=self.store,
            clock=self.clock,
            on_change=lambda *args: self.changes.append(args),
            **self.kwargs,  # type: ignore[arg-type]
        )


@pytest.fixture
def h() -> Harness:
    return Harness()


def open_breaker(h: Harness) -> None:
    for _ in range(3):
        h.breaker.record_failure()
    assert h.breaker.state is OPEN


def test_new_breaker_is_closed_and_allows(h: Harness) -> None:
    assert h.breaker.state is CLOSED
    assert h.breaker.allow()
    assert h.breaker.retry_at is None


def test_opens_after_threshold_consecutive_failures(h: Harness) -> None:
    h.breaker.record_failure()
    h.breaker.record_failure()
    assert h.breaker.state is CLOSED
    assert h.breaker.allow()

    h.breaker.record_failure()

    assert h.breaker.state is OPEN
    assert not h.breaker.allow()
    assert h.breaker.retry_at == h.clock.now + 60.0
    assert h.changes == [("primary", CLOSED, OPEN)]


def test_success_resets_the_consecutive_failure_count(h: Harness) -> None:
    h.breaker.record_failure()
    h.breaker.record_failure()
    h.breaker.record_success()
    h.breaker.record_failure()
    h.breaker.record_failure()

    assert h.breaker.state is CLOSED
    assert h.breaker.failures == 2


def test_fatal_failure_opens_at_once(h: Harness) -> None:
    h.breaker.record_failure(fatal=True)

    assert h.breaker.state is OPEN
    assert not h.breaker.allow()
    assert h.changes == [("primary", CLOSED, OPEN)]


def test_open_breaker_half_opens_once_reset_timeout_passed(h: Harness) -> None:
    open_breaker(h)

    h.clock.advance(59.9)
    assert h.breaker.state is OPEN
    assert not h.breaker.allow()

    h.clock.advance(0.1)
    assert h.breaker.state is HALF_OPEN


def test_half_open_admits_exactly_one_trial(h: Harness) -> None:
    open_breaker(h)
    h.clock.advance(60)
    other_process = h.new()

    assert h.breaker.allow()
    assert not h.breaker.allow()
    assert not other_process.allow()
    assert h.changes[-1] == ("primary", OPEN, HALF_OPEN)


def test_trial_success_closes_the_breaker(h: Harness) -> None:
    open_breaker(h)
    h.clock.advance(60)
    assert h.breaker.allow()

    h.breaker.record_success()

    assert h.breaker.state is CLOSED
    assert h.breaker.allow()
    assert h.breaker.allow()
    assert h.breaker.failures == 0
    assert h.changes == [
        ("primary", CLOSED, OPEN),
        ("primary", OPEN, HALF_OPEN),
        ("primary", HALF_OPEN, CLOSED),
    ]


def test_trial_failure_reopens_with_a_fresh_timeout(h: Harness) -> None:
    open_breaker(h)
    h.clock.advance(60)
    assert h.breaker.allow()
    h.clock.advance(5)

    h.breaker.record_failure()

    assert h.breaker.state is OPEN
    assert h.breaker.retry_at == h.clock.now + 60.0
    assert not h.breaker.allow()
    assert h.changes[-1] == ("primary", HALF_OPEN, OPEN)

    h.clock.advance(60)
    assert h.breaker.allow()  # a new trial after the fresh timeout


def test_failures_while_open_do_not_extend_the_timeout(h: Harness) -> None:
    open_breaker(h)
    retry_at = h.breaker.retry_at
    h.clock.advance(30)

    h.breaker.record_failure()  # a send that started before the breaker opened

    assert h.breaker.retry_at == retry_at
    assert h.changes == [("primary", CLOSED, OPEN)]


def test_crashed_trial_holder_frees_the_trial_after_trial_timeout() -> None:
    h = Harness(trial_timeout=10.0)
    open_breaker(h)
    h.clock.advance(60)
    assert h.breaker.allow()  # ... and this caller never reports back

    h.clock.advance(9)
    assert not h.breaker.allow()
    h.clock.advance(1)
    assert h.breaker.allow()


def test_state_is_shared_through_the_store(h: Harness) -> None:
    other_process = h.new()

    open_breaker(h)

    assert other_process.state is OPEN
    assert not other_process.allow()


def test_failures_from_several_processes_add_up(h: Harness) -> None:
    a, b, c = h.new(), h.new(), h.new()

    a.record_failure()
    b.record_failure()
    c.record_failure()

    assert h.breaker.state is OPEN
    assert h.changes == [("primary", CLOSED, OPEN)]  # only one of them made the transition


def test_concurrent_threads_elect_one_trial(h: Harness) -> None:
    open_breaker(h)
    h.clock.advance(60)
    barrier = threading.Barrier(16)
    results: list[bool] = []

    def contender() -> None:
        barrier.wait()
        results.append(h.breaker.allow())

    threads = [threading.Thread(target=contender) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(results) == [False] * 15 + [True]


def test_reset_closes_and_forgets_failures(h: Harness) -> None:
    open_breaker(h)

    h.breaker.reset()

    assert h.breaker.state is CLOSED
    assert h.breaker.failures == 0
    assert h.changes[-1] == ("primary", OPEN, CLOSED)


def test_breakers_of_different_providers_are_independent(h: Harness) -> None:
    other = CircuitBreaker("backup provider", store=h.store, clock=h.clock, failure_threshold=1)
    open_breaker(h)

    assert other.state is CLOSED
    other.record_failure()
    assert other.state is OPEN
    h.breaker.reset()
    assert other.state is OPEN


def test_zero_reset_timeout_half_opens_immediately() -> None:
    h = Harness(reset_timeout=0.0)
    open_breaker_now = h.breaker
    for _ in range(3):
        open_breaker_now.record_failure()

    assert h.breaker.state is HALF_OPEN
    assert h.breaker.allow()
    assert not h.breaker.allow()


def test_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker("x", store=MemoryStore(), failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker("x", store=MemoryStore(), reset_timeout=-1)


# -- MemoryStore: the BreakerStore contract --------------------------------------------------


class TestMemoryStore:
    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock(0.0)

    @pytest.fixture
    def store(self, clock: FakeClock) -> MemoryStore:
        return MemoryStore(clock=clock)

    def test_is_a_breaker_store(self, store: MemoryStore) -> None:
        assert isinstance(store, BreakerStore)

    def test_get_set_delete(self, store: MemoryStore) -> None:
        assert store.get("k") is None
        store.set("k", {"a": 1}, None)
        assert store.get("k") == {"a": 1}
        store.delete("k")
        store.delete("k")
        assert store.get("k") is None

    def test_add_only_when_absent(self, store: MemoryStore) -> None:
        assert store.add("k", 1, None)
        assert not store.add("k", 2, None)
        assert store.get("k") == 1

    def test_values_expire_after_timeout(self, store: MemoryStore, clock: FakeClock) -> None:
        store.set("k", "v", 10)
        assert store.add("t", "v", 5)
        clock.advance(5)
        assert store.add("t", "again", 5)
        assert store.get("k") == "v"
        clock.advance(5)
        assert store.get("k") is None

    def test_incr_creates_and_counts(self, store: MemoryStore, clock: FakeClock) -> None:
        assert store.incr("n", 1, 10) == 1
        assert store.incr("n", 2, 10) == 3
        clock.advance(10)
        assert store.incr("n", 1, None) == 1

    def test_incr_is_atomic_across_threads(self, store: MemoryStore) -> None:
        def bump() -> None:
            for _ in range(1000):
                store.incr("n", 1, None)

        threads = [threading.Thread(target=bump) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert store.get("n") == 8000


def test_release_frees_a_half_open_trial_without_reporting_an_outcome():
    from robust_mail.breaker import BreakerState, CircuitBreaker, MemoryStore

    now = [1000.0]
    breaker = CircuitBreaker(
        "p",
        failure_threshold=1,
        reset_timeout=10,
        store=MemoryStore(lambda: now[0]),
        clock=lambda: now[0],
    )
    breaker.record_failure()
    now[0] += 11
    assert breaker.allow() is True  # this caller holds the trial
    assert breaker.allow() is False  # nobody else gets one

    breaker.release()

    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow() is True  # the trial is free again


class CountingStore(MemoryStore):
    """A MemoryStore that records which operations reached it."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.ops: list[str] = []

    def get(self, key: str) -> object:
        self.ops.append("get")
        return super().get(key)

    def get_many(self, keys: list[str]) -> dict[str, object]:
        self.ops.append("get_many")
        return super().get_many(keys)

    def delete(self, key: str) -> None:
        self.ops.append("delete")
        super().delete(key)

    def incr(self, key: str, delta: int, timeout: float | None) -> int:
        self.ops.append("incr")
        return super().incr(key, delta, timeout)


@pytest.fixture
def counted() -> tuple[CircuitBreaker, CountingStore]:
    clock = FakeClock()
    store = CountingStore(clock)
    breaker = CircuitBreaker("primary", failure_threshold=3, store=store, clock=clock)
    return breaker, store


def test_success_on_a_clean_closed_breaker_costs_one_read_and_no_write(counted) -> None:
    breaker, store = counted

    assert breaker.allow()
    breaker.record_success()

    assert store.ops == ["get_many"]


def test_late_success_of_a_clean_send_leaves_a_breaker_opened_meanwhile_open(counted) -> None:
    # The documented trade-off: no read after a clean send, so no close either.
    breaker, store = counted
    other = CircuitBreaker("primary", failure_threshold=3, store=store, clock=breaker.clock)
    assert breaker.allow()  # closed, no failures counted: the send starts
    other.trip()  # another process sees an auth failure meanwhile

    breaker.record_success()

    assert breaker.state is OPEN


def test_late_success_with_failures_to_reset_closes_a_breaker_opened_meanwhile(counted) -> None:
    breaker, store = counted
    other = CircuitBreaker("primary", failure_threshold=3, store=store, clock=breaker.clock)
    other.record_failure()
    assert breaker.allow()
    other.trip()

    breaker.record_success()

    assert breaker.state is CLOSED
    assert breaker.failures == 0


def test_success_after_failures_still_resets_them(counted) -> None:
    breaker, store = counted
    other = CircuitBreaker("primary", failure_threshold=3, store=store, clock=breaker.clock)
    other.record_failure()  # another process
    other.record_failure()

    assert breaker.allow()
    breaker.record_success()
    other.record_failure()

    assert breaker.failures == 1
    assert breaker.state is CLOSED


def test_success_without_a_preceding_allow_always_resets(counted) -> None:
    breaker, _ = counted
    assert breaker.allow()
    breaker.record_success()  # consumes what allow() saw
    breaker.record_failure()

    breaker.record_success()

    assert breaker.failures == 0


def test_what_allow_saw_in_one_thread_does_not_skip_the_reset_in_another(counted) -> None:
    breaker, _ = counted
    assert breaker.allow()  # this thread saw a clean breaker...
    breaker.record_failure()
    breaker.record_failure()

    worker = threading.Thread(target=breaker.record_success)  # ...that thread saw nothing
    worker.start()
    worker.join()

    assert breaker.failures == 0


def test_failures_reported_during_a_send_stay_counted_after_its_success(counted) -> None:
    # The success may be placed when allow() read the store: a failure reported by another
    # process while this send was in flight is concurrent with it, and stays counted.
    breaker, store = counted
    other = CircuitBreaker("primary", failure_threshold=3, store=store, clock=breaker.clock)
    assert breaker.allow()
    other.record_failure()

    breaker.record_success()

    assert breaker.failures == 1
    other.record_failure()
    other.record_failure()
    assert breaker.state is OPEN  # the threshold still means consecutive failures


def test_success_of_a_half_open_trial_still_closes(counted) -> None:
    breaker, _ = counted
    breaker.trip()
    breaker.clock.advance(61)
    assert breaker.allow()

    breaker.record_success()

    assert breaker.state is CLOSED


# --- half-open trial hygiene: only the trial's holder changes it ------------------------------


def _half_open_with_a_trial(h: Harness) -> tuple[CircuitBreaker, CircuitBreaker]:
    """A caller whose send started while closed, and the caller now holding the trial."""
    early = h.new()
    assert early.allow()  # closed: its send starts...
    open_breaker(h)  # ...others' failures open the breaker meanwhile
    h.clock.advance(61)
    trial = h.new()
    assert trial.allow()
    return early, trial


def test_late_failure_of_an_earlier_send_leaves_the_trial_alone(h: Harness) -> None:
    early, trial = _half_open_with_a_trial(h)

    early.record_failure()  # arrives while the trial is in flight

    assert not h.new().allow()  # no second trial
    assert h.breaker.state is HALF_OPEN  # not re-opened by stale news
    trial.record_success()
    assert h.breaker.state is CLOSED


def test_release_by_a_caller_without_the_trial_leaves_it_alone(h: Harness) -> None:
    early, trial = _half_open_with_a_trial(h)

    early.release()

    assert not h.new().allow()
    trial.record_failure()
    assert h.breaker.state is OPEN


def test_trial_holder_failure_reopens_and_frees_its_trial(h: Harness) -> None:
    _, trial = _half_open_with_a_trial(h)

    trial.record_failure()

    assert h.breaker.state is OPEN
    h.clock.advance(61)
    assert h.new().allow()  # a fresh trial after the fresh timeout


def test_a_trial_that_expired_does_not_free_its_successor() -> None:
    h = Harness(trial_timeout=30.0)
    open_breaker(h)
    h.clock.advance(61)
    stuck = h.new()
    assert stuck.allow()
    h.clock.advance(31)  # its reservation expired: another caller takes over
    successor = h.new()
    assert successor.allow()

    stuck.release()  # the stuck one finally gives up

    assert not h.new().allow()  # the successor's trial is still the only one
    successor.record_success()
    assert h.breaker.state is CLOSED


class InterleavingStore(MemoryStore):
    """A MemoryStore that runs ``before_add`` once, just before the next ``add``: another
    process acting between a breaker's read and its election of the trial."""

    before_add: Callable[[], None] | None = None

    def add(self, key: str, value: object, timeout: float | None) -> bool:
        hook, self.before_add = self.before_add, None
        if hook is not None:
            hook()
        return super().add(key, value, timeout)


def test_trial_won_on_a_breaker_closed_meanwhile_is_freed_by_its_failure() -> None:
    clock = FakeClock()
    store = InterleavingStore(clock=clock)

    def new() -> CircuitBreaker:
        return CircuitBreaker(
            "primary", failure_threshold=1, reset_timeout=5, store=store, clock=clock,
            trial_timeout=600.0,
        )  # fmt: skip

    new().trip()
    clock.advance(6)
    trial = new()
    # Between this caller's read (half-open) and its add of the trial key, another
    # process's late success closes the breaker: the trial is won on a closed breaker.
    store.before_add = new().record_success
    assert trial.allow()
    assert trial.state is CLOSED

    trial.record_failure()  # counted on the closed breaker: threshold 1 opens it again

    assert trial.state is OPEN
    clock.advance(6)
    assert new().allow()  # the next half-open admits a trial, not only after trial_timeout
