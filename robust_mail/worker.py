"""The outbox worker loop behind ``manage.py robust_mail_worker``.

One loop claims a batch of due messages, hands them to ``concurrency`` threads
(each with its own database connection and, through the pool, its own SMTP
connection), waits for the batch, reports one line, and claims the next. Any
number of workers, on any number of machines, may run at once: claims are
exclusive (see :mod:`robust_mail.outbox`).

With several threads, outcomes are written by one recorder thread that commits
whatever has finished since its last commit in one transaction (a group commit):
under load, one commit serves many messages instead of the sending threads queueing
for the database's write lock one message at a time; when idle, each outcome is
written as soon as it is known. At most ``4 x concurrency`` outcomes wait in the
recorder's queue; when it is full (the database slow or down), a thread keeps the
outcomes of its run until the run ends, then waits for room (it never waits in the
middle of a run, with a reply owed on its SMTP session). A crash loses those and the
messages in flight: they are sent again after their lease, flagged ambiguous.

Stopping (:meth:`Worker.stop`, wired to SIGTERM/SIGINT by the command): messages
being sent are finished and recorded; claimed messages not yet started are
released at once, so another worker need not wait for their lease.

A lost database connection is survived: claiming is retried with a growing
pause (with ``once``, only a few times, then the error is raised), and an
outcome that cannot be written is retried until the lease runs out (after
which another worker owns the row and the write is fenced off).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import DatabaseError, connections, router
from django.utils import timezone

from robust_mail import outbox, outbox_delivery, outbox_record
from robust_mail.conf import RobustMailConfig
from robust_mail.db import drop_connections
from robust_mail.dispatch import Dispatcher
from robust_mail.models.outbox import OutboxMessage, OutboxStatus

__all__ = ["Worker", "WorkerStats"]

logger = logging.getLogger("robust_mail.worker")

#: With ``once``, claiming gives up (raises) after this many database errors in a row.
ONCE_DB_ATTEMPTS = 3


@dataclass
class WorkerStats:
    """Counts since the worker started: outcomes by kind, and batches claimed."""

    sent: int = 0
    retried: int = 0
    failed: int = 0
    dead: int = 0
    released: int = 0
    lost: int = 0
    batches: int = 0

    def add(self, counts: Counter[str]) -> None:
        for name in ("sent", "retried", "failed", "dead", "released", "lost"):
            setattr(self, name, getattr(self, name) + counts[name])


class Worker:
    """Claims and delivers outbox messages until stopped (or, with ``once``, until none is due)."""

    def __init__(
        self,
        *,
        concurrency: int = 1,
        batch: int | None = None,
        sleep: float = 5.0,
        once: bool = False,
        using: str | None = None,
        mailer: str | None = None,
        config: RobustMailConfig | None = None,
        dispatcher: Dispatcher | None = None,
        clock: Callable[[], datetime] = timezone.now,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config or outbox_delivery.delivery_config(mailer)
        self.concurrency = max(1, concurrency)
        self.batch = batch or self.config.outbox.batch
        self.sleep = sleep
        self.once = once
        self.using = using
        self.dispatcher = dispatcher or Dispatcher(self.config)
        self.clock = clock
        self.report = report or (lambda line: logger.info("%s", line))
        self.stats = WorkerStats()
        # Rows queued by a MAILERS alias go with its configuration: (config, dispatcher).
        self._deliveries: dict[str, tuple[RobustMailConfig, Dispatcher]] = {}
        self._give_up = outbox_delivery.give_up_any(self.config)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._recorder: _Recorder | None = None

    # -- control ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish in-flight messages, release the rest and return."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> WorkerStats:
        """Run until :meth:`stop` (or until nothing is due, with ``once``)."""
        threads = _Threads(self.concurrency, self._handle) if self.concurrency > 1 else None
        if threads is not None:
            self._recorder = _Recorder(self._record_group, backlog=4 * self.concurrency)
        pause = outbox_record.DB_RETRY_FIRST  # the same pauses as for writing outcomes
        failures = 0
        try:
            while not self._stop.is_set():
                _refresh_connections()
                try:
                    held = outbox.claim(
                        limit=self.batch,
                        lease=self.config.outbox.lease,
                        using=self.using,
                        now=self.clock(),
                        give_up=self._give_up,
                    )
                except DatabaseError as exc:
                    failures += 1
                    if self.once and failures >= ONCE_DB_ATTEMPTS:
                        raise  # a one-shot run (cron, deploy step) reports the outage
                    logger.warning("cannot claim messages (%s); retrying in %.0fs", exc, pause)
                    drop_connections()
                    self._stop.wait(pause)
                    pause = min(pause * 2, outbox_record.DB_RETRY_MAX)
                    continue
                pause, failures = outbox_record.DB_RETRY_FIRST, 0
                if not held.rows:
                    if self.once:
                        break
                    self._stop.wait(self.sleep)
                    continue
                counts: Counter[str] = Counter()
                jobs = [(held, rows, counts) for rows in _runs(held.rows, self.concurrency)]
                if threads is not None:
                    threads.run(jobs)
                    # The line below and the next claim come after every outcome is written.
                    self._recorder.wait()  # type: ignore[union-attr]
                else:
                    for job in jobs:
                        _guarded(self._handle, job)
                self.stats.add(counts)
                self.stats.batches += 1
                self.report(self._line(len(held.rows), counts))
        finally:
            if threads is not None:
                threads.close()
            if self._recorder is not None:
                self._recorder.close()
                self._recorder = None
        return self.stats

    # -- one message --------------------------------------------------------------------------

    def _handle(self, job: Any) -> None:
        held, rows, counts = job
        if self._stop.is_set():
            self._release(held, rows, counts)
            return

        late: list[Any] = []

        def record(index: int, outcome: outbox_record.Outcome) -> None:
            # As soon as it is decided, while the rest of the run is still being sent: a
            # crash then loses (and sends again) as few outcomes as without runs. A full
            # recorder or a database outage must not stall a run mid-session, with a reply
            # owed (the server would time out): those outcomes wait for the end of the run.
            item = (held, rows[index], outcome, counts)
            if late:
                late.append(item)
            elif self._recorder is not None:
                if not self._recorder.offer(item):
                    late.append(item)
            else:
                try:
                    self._record_group([item], patient=False)
                except outbox_record.OUTAGES:
                    late.append(item)

        config, dispatcher = self._delivery(rows[0])  # a run's rows share their mailer
        outcomes = outbox_delivery.attempt_many(
            rows,
            dispatcher=dispatcher,
            config=config.outbox,
            clock=self.clock,
            proceed=lambda: not self._stop.is_set() and self._lease_allows(rows, config),
            on_outcome=record,
        )
        if self._recorder is None:
            if late:
                self._record_group(late)
        else:
            for item in late:
                self._recorder.put(item)
        untried = [row for row, outcome in zip(rows, outcomes, strict=True) if outcome is None]
        if untried:
            self._release(held, untried, counts)

    def _delivery(self, row: OutboxMessage) -> tuple[RobustMailConfig, Dispatcher]:
        if not row.mailer:
            return self.config, self.dispatcher
        with self._lock:
            found = self._deliveries.get(row.mailer)
            if found is None:
                config = outbox_delivery.row_config(row, self.config)
                dispatcher = self.dispatcher if config is self.config else Dispatcher(config)
                found = self._deliveries[row.mailer] = (config, dispatcher)
        return found

    def _lease_allows(self, rows: list[OutboxMessage], config: RobustMailConfig) -> bool:
        # One lease covers the whole batch, sent one message after another: a message
        # started too close to its end could still be sending when another worker takes
        # it over. The rest of the run is released instead, and claimed again.
        lease_until = rows[0].lease_until
        if lease_until is None:
            return True
        left = (lease_until - self.clock()).total_seconds()
        return left > outbox_delivery.lease_margin(config, self.config.outbox.lease)

    def _record_group(self, group: list[Any], *, patient: bool = True) -> None:
        """Write the outcomes of ``group`` (one claim's); count each as written or lost.

        Outages are waited out while the lease lasts, and a row the database refuses is
        written bare (:func:`outbox_record.record_through_outages`). Not ``patient``: an
        outage is raised at once instead of waited out.
        """
        held = group[0][0]
        outcomes = [(row, outcome) for _, row, outcome, _ in group]
        try:
            written = outbox_record.record_through_outages(
                held, outcomes, clock=self.clock, patient=patient
            )
        except Exception as exc:
            if isinstance(exc, outbox_record.OUTAGES) and not patient:
                drop_connections()
                raise
            # Left "sending": its lease expires and it is tried again, flagged ambiguous.
            logger.exception("%d outbox outcome(s) not recorded", len(group))
            written = [False] * len(group)
        with self._lock:
            for (_, _, outcome, counts), ok in zip(group, written, strict=True):
                counts[_KINDS[outcome.status] if ok else "lost"] += 1

    def _release(self, held: outbox.Claim, rows: list[OutboxMessage], counts: Counter[str]) -> None:
        try:
            released = outbox.release(held, rows)
        except DatabaseError:
            # A connection the database closed (a restart) fails every query on it until
            # it is dropped: reconnect and try once more, so that a stop does not leave the
            # rows "sending" for a lease, then flagged ambiguous.
            drop_connections()
            try:
                released = outbox.release(held, rows)
            except DatabaseError as exc:
                pks = [row.pk for row in rows]
                logger.warning(
                    "cannot release outbox messages %s (%s): their leases expire", pks, exc
                )
                released = 0
        with self._lock:
            counts["released"] += released

    def _line(self, claimed: int, counts: Counter[str]) -> str:
        try:
            alias = self.using or router.db_for_read(OutboxMessage)
            left = (
                OutboxMessage.objects.using(alias)
                .filter(status__in=(OutboxStatus.QUEUED, OutboxStatus.SENDING))
                .count()
            )
            left_text = str(left)
        except DatabaseError:
            left_text = "?"
        line = (
            f"batch of {claimed}: sent {counts['sent']}, retried {counts['retried']}, "
            f"failed {counts['failed'] + counts['dead']}; queue left {left_text}"
        )
        if counts["released"] or counts["lost"]:
            line += f" (released {counts['released']}, lease lost {counts['lost']})"
        return line


_KINDS = {
    OutboxStatus.SENT: "sent",
    OutboxStatus.QUEUED: "retried",
    OutboxStatus.FAILED: "failed",
    OutboxStatus.DEAD: "dead",
}


#: Most messages one thread sends on its connection in one go (see ``_chunks``).
CHAIN = 25


def _runs(rows: list[OutboxMessage], threads: int) -> list[list[OutboxMessage]]:
    """The runs a batch is sent in: :func:`_chunks`, but each message taken over from a
    worker that died sending it in a run of its own.

    Had it killed that worker (out of memory, say), it would otherwise take the messages
    after it in its run down with it again, and again, until all of them were given up.
    """
    alone = [[row] for row in rows if outbox.taken_over(row)]
    by_mailer: dict[str, list[OutboxMessage]] = {}
    for row in rows:
        if not outbox.taken_over(row):
            by_mailer.setdefault(row.mailer, []).append(row)
    # A run goes through one Dispatcher: the rows of one MAILERS alias (or none) together.
    return alone + [run for group in by_mailer.values() for run in _chunks(group, threads)]


def _chunks(rows: list[OutboxMessage], threads: int) -> list[list[OutboxMessage]]:
    """``rows`` cut into runs a thread sends one after another on one connection.

    Where the server pipelines, a run of n messages costs n + 1 round trips instead of
    2n (see ``SMTPConnection.send_many``). Runs are at most :data:`CHAIN` long and come
    in a multiple of ``threads``, so the threads finish the batch together.
    """
    count = min(len(rows), threads * -(-len(rows) // (threads * CHAIN)))  # -(-a // b): ceil
    if count == 0:
        return []
    size, extra = divmod(len(rows), count)
    bounds = [i * size + min(i, extra) for i in range(count + 1)]
    return [rows[start:end] for start, end in itertools.pairwise(bounds)]


def _guarded(handle: Callable[[Any], None], job: Any) -> None:
    # One message's unexpected error must never stop the worker or stall the queue: its
    # lease expires and it is tried again.
    try:
        handle(job)
    except Exception:
        logger.exception("worker failed on a message")


def _refresh_connections() -> None:
    """Close connections past CONN_MAX_AGE or broken, as Django does between requests.

    Never one inside an atomic block: closing it would break the caller's transaction
    (in tests, the test's own).
    """
    for conn in connections.all(initialized_only=True):
        if not conn.in_atomic_block:
            conn.close_if_unusable_or_obsolete()


class _Threads:
    """A fixed set of threads working through one batch at a time."""

    def __init__(self, size: int, handle: Callable[[Any], None]) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        self._handle = handle
        self._threads = [
            threading.Thread(target=self._loop, name=f"robust_mail_worker-{i}", daemon=True)
            for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def run(self, jobs: list[Any]) -> None:
        for job in jobs:
            self._queue.put(job)
        self._queue.join()

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()

    def _loop(self) -> None:
        try:
            while True:
                job = self._queue.get()
                try:
                    if job is None:
                        return
                    # As the claiming loop and the recorder do: honour CONN_MAX_AGE and drop
                    # a connection the database closed (a restart), before this job's queries
                    # (message_sent receivers, releasing) run on it.
                    _refresh_connections()
                    _guarded(self._handle, job)
                finally:
                    self._queue.task_done()
        finally:
            connections.close_all()


class _Recorder:
    """One thread writing finished outcomes, as many per commit as have piled up.

    Groups never mix claims (a worker has one claim at a time) and hold at most
    ``limit`` outcomes, so a commit stays short.
    """

    def __init__(
        self, write: Callable[[list[Any]], None], *, backlog: int, limit: int = 100
    ) -> None:
        # Bounded: while the database is down (the recorder retrying), the sending threads
        # stop at the next put instead of sending a whole batch whose outcomes pile up.
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=backlog)
        self._write = write
        self._limit = limit
        self._thread = threading.Thread(
            target=self._loop, name="robust_mail_worker-recorder", daemon=True
        )
        self._thread.start()

    def put(self, item: Any) -> None:
        self._queue.put(item)

    def offer(self, item: Any) -> bool:
        """Put ``item`` if there is room now; False (and nothing put) otherwise."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            return False
        return True

    def wait(self) -> None:
        """Return once everything put so far is written (or given up)."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        try:
            closing = False
            while not closing:
                group = [self._queue.get()]
                while len(group) < self._limit:
                    try:
                        group.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                closing = group[-1] is None
                items = [item for item in group if item is not None]
                try:
                    if items:
                        # As the claiming loop does between batches: honour CONN_MAX_AGE and
                        # drop a connection the database closed, before writing on it.
                        _refresh_connections()
                        _guarded(self._write, items)
                finally:
                    for _ in group:
                        self._queue.task_done()
        finally:
            connections.close_all()
