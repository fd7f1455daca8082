"""Signals sent while robust_mail delivers mail.

Every signal is sent with ``sender`` set to the class doing the work
(``Dispatcher``, ``CircuitBreaker``, the outbox) and keyword arguments:

- ``message_sent``: ``message``, ``result`` (:class:`~robust_mail.dispatch.DeliveryResult`).
- ``message_failed``: ``message``, ``result`` — no provider took it and no fallback did.
- ``provider_failed``: ``provider`` (name), ``error`` (a ``ProviderError``),
  ``message``.
- ``circuit_state_changed``: ``provider``, ``old_state``, ``new_state``.
- ``message_queued``: ``message``, ``outbox_id`` — stored in the outbox for later delivery.

Receivers must not raise: an exception in a receiver is logged and ignored
(signals are sent with ``send_robust``), so monitoring can never stop mail.
"""

from __future__ import annotations

import logging
from typing import Any

from django.dispatch import Signal

logger = logging.getLogger("robust_mail")

message_sent = Signal()
message_failed = Signal()
provider_failed = Signal()
circuit_state_changed = Signal()
message_queued = Signal()


def emit(signal: Signal, sender: Any, **kwargs: Any) -> None:
    """Send ``signal`` robustly: a failing receiver is logged, never raised into delivery."""
    for receiver, response in signal.send_robust(sender, **kwargs):
        if isinstance(response, Exception):
            logger.error(
                "signal receiver %r raised %s: %s",
                receiver,
                type(response).__name__,
                response,
                exc_info=(type(response), response, response.__traceback__),
            )
