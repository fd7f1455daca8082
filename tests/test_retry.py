"""RetryPolicy: attempts, exponential backoff, jitter bounds, deadline, retry predicate."""

from __future__ import annotations

import pytest
import tenacity

from robust_mail.retry import RetryPolicy


class FakeTime:
    """A clock that only moves when the policy sleeps."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Flaky:
    """Raises the given exceptions in turn, then returns "ok"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def always(exc: BaseException) -> bool:
    return True


def policy(fake: FakeTime, **kwargs: object) -> RetryPolicy:
    options: dict[str, object] = {"jitter": False, "sleep": fake.sleep, "clock": fake.clock}
    options.update(kwargs)
    return RetryPolicy(**options)  # type: ignore[arg-type]


def test_waits_double_from_backoff_between_attempts() -> None:
    fake = FakeTime()
    fn = Flaky(OSError("1"), OSError("2"), OSError("3"))

    assert policy(fake, attempts=4).call(fn, retry_if=always) == "ok"

    assert fn.calls == 4
    assert fake.sleeps == [1.0, 2.0, 4.0]


def test_waits_are_capped_at_max_backoff() -> None:
    fake = FakeTime()
    fn = Flaky(*[OSError(str(i)) for i in range(5)])

    policy(fake, attempts=6, backoff=1.0, max_backoff=3.0).call(fn, retry_if=always)

    assert fake.sleeps == [1.0, 2.0, 3.0, 3.0, 3.0]


def test_gives_up_after_attempts_and_reraises_the_last_exception() -> None:
    fake = FakeTime()
    last = OSError("third")
    fn = Flaky(OSError("first"), OSError("second"), last, OSError("never raised"))

    with pytest.raises(OSError) as info:
        policy(fake, attempts=3).call(fn, retry_if=always)

    assert info.value is last
    assert not isinstance(info.value, tenacity.RetryError)
    assert fn.calls == 3
    assert fake.sleeps == [1.0, 2.0]


def test_non_retryable_exception_is_raised_after_one_call_without_sleeping() -> None:
    fake = FakeTime()
    error = ValueError("message fatal")
    fn = Flaky(error)

    with pytest.raises(ValueError) as info:
        policy(fake).call(fn, retry_if=lambda exc: isinstance(exc, OSError))

    assert info.value is error
    assert fn.calls == 1
    assert fake.sleeps == []


def test_retry_predicate_is_asked_about_each_exception() -> None:
    fake = FakeTime()
    seen: list[BaseException] = []
    transient, fatal = OSError("transient"), ValueError("fatal")

    def retry_if(exc: BaseException) -> bool:
        seen.append(exc)
        return isinstance(exc, OSError)

    with pytest.raises(ValueError):
        policy(fake, attempts=5).call(Flaky(transient, fatal), retry_if=retry_if)

    assert seen == [transient, fatal]
    assert fake.sleeps == [1.0]


def test_stops_instead_of_sleeping_past_the_deadline() -> None:
    fake = FakeTime(start=100.0)
    fn = Flaky(*[OSError(str(i)) for i in range(10)])

    # Sleeps of 1 then 2 end at 103; the next (4 s) would end at 107 > 105.
    with pytest.raises(OSError, match="2"):
        policy(fake, attempts=10).call(fn, retry_if=always, deadline=105.0)

    assert fn.calls == 3
    assert fake.sleeps == [1.0, 2.0]
    assert fake.now <= 105.0


def test_a_sleep_ending_exactly_at_the_deadline_is_allowed() -> None:
    fake = FakeTime(start=0.0)
    fn = Flaky(OSError("a"), OSError("b"))

    assert policy(fake, attempts=3).call(fn, retry_if=always, deadline=3.0) == "ok"

    assert fake.sleeps == [1.0, 2.0]


def test_deadline_already_passed_means_a_single_call() -> None:
    fake = FakeTime(start=50.0)
    fn = Flaky(OSError("late"))

    with pytest.raises(OSError, match="late"):
        policy(fake, attempts=3).call(fn, retry_if=always, deadline=49.0)

    assert fn.calls == 1
    assert fake.sleeps == []


def test_on_retry_is_told_attempt_exception_and_delay_before_each_wait() -> None:
    fake = FakeTime()
    first, second = OSError("first"), OSError("second")
    calls: list[tuple[int, BaseException, float]] = []

    policy(fake, attempts=3).call(
        Flaky(first, second), retry_if=always, on_retry=lambda *args: calls.append(args)
    )

    assert calls == [(1, first, 1.0), (2, second, 2.0)]


def test_success_on_first_call_returns_without_sleeping() -> None:
    fake = FakeTime()

    assert policy(fake).call(lambda: 42, retry_if=always) == 42
    assert fake.sleeps == []


@pytest.mark.parametrize("u", [0.0, 0.25, 0.5, 0.999999])
def test_jitter_stays_between_half_the_base_and_the_base(u: float) -> None:
    retry = RetryPolicy(backoff=1.0, max_backoff=4.0, jitter=True, rng=lambda: u)

    for attempt, base in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 4.0), (10, 4.0)]:
        delay = retry.delay(attempt)
        assert base / 2 < delay <= base
        assert delay <= retry.max_backoff


def test_jitter_spreads_waits_of_concurrent_failures() -> None:
    values = iter([0.0, 0.5, 0.9])
    retry = RetryPolicy(jitter=True, rng=lambda: next(values))

    assert [retry.delay(2) for _ in range(3)] == [2.0, 1.5, 1.1]


def test_jittered_waits_are_what_the_policy_sleeps() -> None:
    fake = FakeTime()
    fn = Flaky(OSError("a"), OSError("b"))

    policy(fake, attempts=3, jitter=True, rng=lambda: 0.5).call(fn, retry_if=always)

    assert fake.sleeps == [0.75, 1.5]


@pytest.mark.parametrize(
    "kwargs", [{"attempts": 0}, {"backoff": -1.0}, {"max_backoff": -0.5}], ids=str
)
def test_rejects_nonsense_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
