"""An asyncio event loop running in a daemon thread, driven from other threads."""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")

log = logging.getLogger("robust_mail.testing")

# Upper bound for anything a caller waits on the loop for; a bug, not a slow test.
CALL_TIMEOUT = 10.0


class LoopThread:
    """Owns one event loop and the thread that runs it.

    ``call()`` runs a coroutine on the loop and returns its result to the
    calling thread; ``close()`` stops the loop, cancels what is left, closes it
    and joins the thread. Callers close their transports before ``close()``.
    Code running on the loop itself (a callback of the server) cannot wait for
    the loop: ``in_loop_thread()`` tells, and ``schedule()`` runs a coroutine
    there without waiting.
    """

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(_quiet_exception_handler)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        # Strong references: the loop keeps only weak ones to the tasks it runs.
        self._scheduled: set[asyncio.Task[Any]] = set()
        self._thread.start()

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(CALL_TIMEOUT)

    def schedule(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run ``coroutine`` on the loop after the current step; from the loop thread only.

        ``call()`` there would wait for a result the busy loop can never produce.
        """
        task = self.loop.create_task(coroutine)
        self._scheduled.add(task)
        task.add_done_callback(self._scheduled_done)

    def _scheduled_done(self, task: asyncio.Task[Any]) -> None:
        self._scheduled.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("test server task failed", exc_info=task.exception())

    def close(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            # Whatever is still pending (a TLS handshake in progress, say) is
            # cancelled so that its socket is closed before the loop is.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            for _ in range(3):  # close callbacks scheduled by those cancellations
                loop.run_until_complete(asyncio.sleep(0))
            loop.run_until_complete(loop.shutdown_asyncgens())
            asyncio.set_event_loop(None)
            loop.close()


def _quiet_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # Clients that reject our certificate or vanish mid-handshake are what the
    # tests provoke; only anything else deserves the default (error) report.
    exception = context.get("exception")
    if isinstance(exception, ssl.SSLError | ConnectionError | asyncio.CancelledError):
        log.debug("test SMTP server: %s: %r", context.get("message"), exception)
        return
    loop.default_exception_handler(context)
