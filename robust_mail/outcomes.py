"""What a run of messages on one session ended with: one outcome per message.

Shared by the two ways of sending a run (:mod:`robust_mail.transactions` with DATA,
:mod:`robust_mail.chunking` with BDAT). Imports nothing from Django.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from robust_mail.exceptions import TransportError

__all__ = ["Held", "Ledger", "Outcome", "reply_text"]

# The transport's logger: one name for every step of a session (docs/operations.md).
logger = logging.getLogger("robust_mail.transport")

#: What sending one message ended with: the refused recipients, or the failure.
Outcome = dict[str, tuple[int, str]] | TransportError


@dataclass
class Held:
    """A message whose content has been sent: what judging its final reply needs."""

    index: int
    recipients: list[str]
    refused: dict[str, tuple[int, str]]
    size: int
    started: float
    deadline: float | None = None
    outcome: Outcome | None = None

    def result(self) -> Outcome:
        assert self.outcome is not None, "judged when the next envelope was exchanged"
        return self.outcome


class Ledger:
    """The outcomes of a run of messages, and the caller's ``on_outcome`` told of each.

    ``settle`` records an outcome as soon as it is known; ``report`` passes the recorded
    ones on, and is called where it costs no time on the wire (while a pipelined write
    is on its way).
    """

    def __init__(
        self,
        count: int,
        on_outcome: Callable[[int, Outcome, float], None] | None,
        provider: str,
    ) -> None:
        self.outcomes: list[Outcome | None] = [None] * count
        self._unreported: list[tuple[int, float]] = []
        self._on_outcome = on_outcome
        self._provider = provider

    def settle(
        self, index: int, outcome: Outcome, started: float, ended: float | None = None
    ) -> None:
        """Record ``outcome``: the message's time ran from ``started`` to ``ended`` (now)."""
        self.outcomes[index] = outcome
        self._unreported.append((index, (ended or time.monotonic()) - started))

    def report(self) -> None:
        while self._unreported and self._on_outcome is not None:
            index, seconds = self._unreported.pop(0)
            try:
                self._on_outcome(index, self.outcomes[index], seconds)  # type: ignore[arg-type]
            except Exception:
                # The caller's problem, not the session's: it must not break a run with
                # replies owed. The outcome stays in the returned list.
                logger.exception("%s: on_outcome raised; ignored", self._provider)


def reply_text(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
