"""The dead-primary case: what a dead first provider costs while a backup is up.

robust_mail is configured with two providers: a dead ``primary`` (``TIMEOUT = 1`` s) and a
healthy ``backup`` (aiosmtpd, STARTTLS + AUTH, loopback). Two ways of being dead:

- ``refused``: nothing listens on the port, ``connect()`` fails at once (ECONNREFUSED);
- ``blackhole``: TCP is accepted but the server never greets, so the greeting times out.

Two configurations: robust_mail's defaults (3 attempts per provider with backoff, breaker
opens after 5 failed messages) and a fail-fast one (1 attempt, breaker opens after 1).

For each, starting with a closed breaker, messages are sent one at a time until the
primary's breaker is open (the *transition*: each of those messages pays for the dead
primary), then ``n`` more while it is open. Those are compared with the same ``n`` messages
sent by robust_mail configured with the backup alone, repeats interleaved.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from django.core.cache import caches
from django.test import override_settings

from benchmarks.measure import Cell, timed_run
from benchmarks.sending import provider, robust_settings, send_one
from benchmarks.servers import ServerFarm

DEAD_TIMEOUT = 1.0
MAX_TRANSITION = 20  # messages; the breaker opens long before with any sane setting

VARIANTS: dict[str, dict[str, object]] = {
    "defaults": {},
    "fail fast": {"RETRY": {"ATTEMPTS": 1}, "CIRCUIT_BREAKER": {"FAILURE_THRESHOLD": 1}},
}
DEAD_MODES = {"refused": "refused", "blackhole": "dead"}  # mode -> ServerFarm endpoint


@dataclass
class DeadPrimaryResult:
    mode: str
    variant: str
    transition: list[float] = field(default_factory=list)  # seconds per message until open
    opened: bool = False
    while_open: Cell | None = None
    # The backup-alone run made right after each run of while_open: paired, so that a slow
    # spell of the machine hits both sides of a comparison alike.
    paired_backup: Cell | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "variant": self.variant,
            "transition": self.transition,
            "opened": self.opened,
            "while_open": self.while_open.as_dict() if self.while_open else None,
            "paired_backup": self.paired_backup.as_dict() if self.paired_backup else None,
            "error": self.error,
        }


def _reset_state() -> None:
    from robust_mail import state
    from robust_mail.pool import pools

    pools.clear()
    state.reset()
    caches["default"].clear()


def _breaker_open(name: str) -> bool:
    from robust_mail.breaker import BreakerState
    from robust_mail.conf import get_config
    from robust_mail.state import get_breaker

    return get_breaker(name, get_config()).state is BreakerState.OPEN


def run_dead_primary(
    farm: ServerFarm,
    *,
    n: int,
    warmup: int,
    repeats: int,
    log: Callable[[str], None],
) -> tuple[list[DeadPrimaryResult], Cell]:
    backup = provider(farm.endpoint("backup"))
    backup_alone = Cell("dead-primary", "backup alone")
    results: list[DeadPrimaryResult] = []
    for mode, endpoint_name in DEAD_MODES.items():
        for variant, options in VARIANTS.items():
            result = DeadPrimaryResult(mode, variant)
            results.append(result)
            dead = provider(farm.endpoint(endpoint_name, timeout=DEAD_TIMEOUT), NAME="primary")
            _reset_state()
            settings = robust_settings(dead, backup, **options)
            try:
                # The backup's pooled connection is opened first, so that the transition
                # measures the dead primary, not the backup's TLS handshake.
                with override_settings(**robust_settings(backup)):
                    send_one()
                with override_settings(**settings):
                    _transition(result)
                    result.while_open = Cell("dead-primary", f"{mode}, {variant}")
                    result.paired_backup = Cell("dead-primary", f"backup alone, paired ({mode})")
                    for _ in range(repeats):
                        if not _breaker_open("primary"):
                            raise RuntimeError("the primary's breaker closed during the run")
                        result.while_open.runs.append(timed_run(lambda i: send_one(), n, warmup))
                        with override_settings(**robust_settings(backup)):
                            run = timed_run(lambda i: send_one(), n, warmup)
                        backup_alone.runs.append(run)
                        result.paired_backup.runs.append(run)
            except Exception as exc:
                result.error = f"{type(exc).__name__}: {exc}"
            first = result.transition[0] if result.transition else float("nan")
            log(
                f"  dead primary {mode}, {variant}: first message {first:.3f} s, "
                f"{len(result.transition)} message(s) until the breaker opened"
                + (f"; ERROR {result.error}" if result.error else "")
            )
    _reset_state()
    return results, backup_alone


def _transition(result: DeadPrimaryResult) -> None:
    for _ in range(MAX_TRANSITION):
        began = time.perf_counter()
        send_one()
        result.transition.append(time.perf_counter() - began)
        if _breaker_open("primary"):
            result.opened = True
            return
