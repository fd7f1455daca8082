"""Synchronous sending: robust_mail against Django's stock SMTP backend, side by side.

Contenders (each sends the same message with ``django.core.mail.send_mail``):

- ``stock per call``: ``EMAIL_BACKEND = django.core.mail.backends.smtp.EmailBackend``, one
  ``send_mail`` per message, so one new connection (TCP, STARTTLS, AUTH, QUIT) per message;
- ``stock reused``: the same backend from ``get_connection()``, opened once by hand and
  passed as ``connection=`` to every ``send_mail`` (what a careful caller writes);
- ``robust_mail``: ``EMAIL_BACKEND = robust_mail.backends.RobustEmailBackend``, one
  ``send_mail`` per message, connections from robust_mail's process-wide pool.

Scenarios: aiosmtpd with STARTTLS + AUTH on loopback, Postfix's smtp-sink (plain text: it has
no TLS), and the same aiosmtpd behind the 20 ms-each-way proxy. Within a repeat the
contenders take turns, so a slow drift of the machine affects all of them alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from django.core import mail
from django.test import override_settings

from benchmarks.measure import Cell, timed_run
from benchmarks.servers import Endpoint, ServerFarm

STOCK = "django.core.mail.backends.smtp.EmailBackend"
ROBUST = "robust_mail.backends.RobustEmailBackend"

SUBJECT = "Your sign-in code"
BODY = (
    "Hello,\n\nyour sign-in code is 314159. It expires in 10 minutes.\n\n"
    "If you did not ask for it, you can ignore this message: nobody can sign in "
    "without the code.\n\n-- \nThe example.com team\n"
) * 3  # about 600 bytes, a typical transactional message
FROM = "noreply@example.com"
TO = ["user@example.net"]

Send = Callable[[int], object]


def send_one(connection: Any = None) -> int:
    sent = mail.send_mail(SUBJECT, BODY, FROM, TO, connection=connection)
    if sent != 1:
        raise RuntimeError(f"send_mail returned {sent}")
    return sent


def provider(endpoint: Endpoint, **overrides: object) -> dict[str, object]:
    """A ``ROBUST_MAIL["PROVIDERS"]`` entry for ``endpoint``."""
    entry: dict[str, object] = {
        "NAME": endpoint.name,
        "HOST": endpoint.host,
        "PORT": endpoint.port,
        "USERNAME": endpoint.username,
        "PASSWORD": endpoint.password,
        "USE_TLS": endpoint.use_tls,
        "TIMEOUT": endpoint.timeout,
    }
    entry.update(overrides)
    return entry


def stock_settings(endpoint: Endpoint) -> dict[str, object]:
    return {
        "EMAIL_BACKEND": STOCK,
        "EMAIL_HOST": endpoint.host,
        "EMAIL_PORT": endpoint.port,
        "EMAIL_HOST_USER": endpoint.username,
        "EMAIL_HOST_PASSWORD": endpoint.password,
        "EMAIL_USE_TLS": endpoint.use_tls,
        "EMAIL_USE_SSL": False,
        "EMAIL_TIMEOUT": endpoint.timeout,
    }


@contextlib.contextmanager
def stock_per_call(endpoint: Endpoint) -> Iterator[Send]:
    with override_settings(**stock_settings(endpoint)):
        yield lambda i: send_one()


@contextlib.contextmanager
def stock_reused(endpoint: Endpoint) -> Iterator[Send]:
    with override_settings(**stock_settings(endpoint)):
        connection = mail.get_connection(STOCK)
        connection.open()
        try:
            yield lambda i: send_one(connection)
        finally:
            connection.close()


def robust_settings(*providers: dict[str, object], **options: object) -> dict[str, object]:
    return {
        "EMAIL_BACKEND": ROBUST,
        "ROBUST_MAIL": {"PROVIDERS": list(providers), **options},
    }


@contextlib.contextmanager
def robust_pooled(endpoint: Endpoint) -> Iterator[Send]:
    with override_settings(**robust_settings(provider(endpoint))):
        yield lambda i: send_one()


CONTENDERS: dict[str, Callable[[Endpoint], contextlib.AbstractContextManager[Send]]] = {
    "Django stock, send_mail per call": stock_per_call,
    "Django stock, one reused connection": stock_reused,
    "robust_mail, send_mail per call (pooled)": robust_pooled,
}
STOCK_PER_CALL, STOCK_REUSED, ROBUST_POOLED = CONTENDERS


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    endpoint: str  # a ServerFarm.endpoint name
    counted_by: str | None  # the aiosmtpd server that counts its messages, if any
    n: int  # timed messages per repeat
    warmup: int
    n_per_call: int  # timed messages per repeat for "stock per call" (the slow one)


def scenarios(scale: float = 1.0) -> list[Scenario]:
    def k(value: int) -> int:
        return max(3, round(value * scale))

    return [
        Scenario(
            "loopback",
            "aiosmtpd, STARTTLS + AUTH, loopback",
            "primary",
            "primary",
            k(300),
            k(20),
            k(200),
        ),
        Scenario(
            "smtp-sink",
            "Postfix smtp-sink, plain SMTP, loopback",
            "sink",
            None,
            k(300),
            k(20),
            k(300),
        ),
        Scenario(
            "rtt40",
            "aiosmtpd, STARTTLS + AUTH, 40 ms round trip",
            "rtt",
            "primary",
            k(40),
            k(5),
            k(20),
        ),
    ]


def run_scenario(
    farm: ServerFarm, scenario: Scenario, *, repeats: int, log: Callable[[str], None]
) -> list[Cell]:
    cells = {name: Cell(scenario.key, name) for name in CONTENDERS}
    try:
        endpoint = farm.endpoint(scenario.endpoint)
    except RuntimeError as exc:
        for cell in cells.values():
            cell.error = str(exc)
        log(f"  {scenario.key}: skipped: {exc}")
        return list(cells.values())
    for repeat in range(repeats):
        for name, contender in CONTENDERS.items():
            cell = cells[name]
            if cell.error is not None:
                continue
            n = scenario.n_per_call if name == STOCK_PER_CALL else scenario.n
            warmup = min(scenario.warmup, n)
            before = farm.counts() if scenario.counted_by else None
            try:
                with contender(endpoint) as send:
                    run = timed_run(send, n, warmup)
            except Exception as exc:
                cell.error = f"{type(exc).__name__}: {exc}"
                log(f"  {scenario.key} / {name}: FAILED: {cell.error}")
                continue
            cell.runs.append(run)
            cell.expected += n + warmup
            if before is not None and scenario.counted_by is not None:
                after = farm.counts()
                key = scenario.counted_by
                cell.delivered = (cell.delivered or 0) + after[key] - before[key]
            log(
                f"  {scenario.key} #{repeat + 1} {name}: {run.rate:7.1f} msg/s, "
                f"CPU {run.cpu_per_message * 1000:6.2f} ms/msg"
            )
    return list(cells.values())
