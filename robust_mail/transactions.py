"""Mail transactions on an open session: the sending half of ``SMTPConnection``.

MAIL → RCPT… → DATA → content → final dot, with the envelope pipelined when the server
offers PIPELINING (:mod:`robust_mail.pipelining`), recipients put off with a ``4xx``
sent again in another transaction, and runs of messages (:meth:`Transactions.send_many`)
whose final replies are read while the next envelope is on its way. The DATA phase is
driven here rather than by ``smtplib.sendmail`` so that a failure while the content is
sent (``DATA``) is told apart from one while waiting for the reply to the final dot
(``DATA_END``), where the server may already have the message.

:class:`Transactions` is a mixin of :class:`~robust_mail.transport.SMTPConnection`,
which owns the session, its steps and their failure handling. Imports nothing from Django.
"""

from __future__ import annotations

import contextlib
import logging
import smtplib
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from robust_mail import chunking, pipelining
from robust_mail.exceptions import (
    CapabilityMissing,
    DeadlineReached,
    InvalidMessage,
    Step,
    TransportError,
)
from robust_mail.outcomes import Held, Ledger, Outcome, reply_text
from robust_mail.session import Session, check_deadline

if TYPE_CHECKING:
    from robust_mail.providers import ProviderConfig

__all__ = ["Held", "Ledger", "Outcome", "Transactions"]  # the first three from .outcomes

# The transport's logger: one name for every step of a session (docs/operations.md).
logger = logging.getLogger("robust_mail.transport")

_FORBIDDEN_IN_ADDRESS = ("\r", "\n", "\0", "<", ">")


class Transactions:
    """Sending on an open session; mixed into ``SMTPConnection``, which provides the rest."""

    provider: ProviderConfig
    reusable: bool
    messages_sent: int
    last_used: float | None
    _smtp: Session | None

    @property
    def is_open(self) -> bool:
        raise NotImplementedError

    def _step(self, step: Step) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def _recover(self, step: Step) -> None:
        raise NotImplementedError

    def _blame(self, step: Step, exc: BaseException) -> BaseException:
        raise NotImplementedError

    def _abort(self) -> None:
        raise NotImplementedError

    def _open_session(self, step: Step) -> Session:
        """The session, or a :class:`TransportError` at ``step`` when it is not open."""
        smtp = self._smtp
        if smtp is None or smtp.sock is None:
            raise TransportError(
                step,
                smtplib.SMTPServerDisconnected("the connection is not open"),
                provider=self.provider.name,
            )
        return smtp

    def send(
        self,
        from_addr: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        deadline: float | None = None,
    ) -> dict[str, tuple[int, str]]:
        """Send one message; return the refused recipients as ``{address: (code, reply)}``.

        ``data`` is the message as bytes; line endings are normalised to CRLF and lines
        starting with a dot are escaped here. An empty result means every recipient was
        accepted. Raises :class:`TransportError` when no recipient was accepted
        (``step=RCPT``, ``refused`` filled in) or any step failed. Addresses that cannot
        be sent (line breaks, non-ASCII without SMTPUTF8) fail before any traffic.
        ``deadline`` (absolute ``time.monotonic()``) bounds every network operation; a
        send called after it fails at MAIL before any traffic and keeps the connection.
        """
        smtp = self._open_session(Step.MAIL)
        recipients = list(recipients)
        options = self._mail_options(smtp, from_addr, recipients, data)
        try:
            check_deadline(deadline)
        except DeadlineReached as exc:
            raise TransportError(Step.MAIL, exc, provider=self.provider.name) from exc
        smtp.deadline = deadline
        try:
            refused = self._transaction(smtp, from_addr, recipients, data, options)
            return self._send_the_rest(smtp, from_addr, recipients, refused, data, options)
        except TransportError:
            raise  # the step that failed settled the session
        except Exception:
            # Not a failure of the session: something else (a task's time limit raised by
            # a signal handler, say) cut a step short, possibly with a reply still owed,
            # which would answer the next command. The session must not be used again.
            self._abort()
            raise
        finally:
            smtp.deadline = None

    def send_many(
        self,
        messages: Sequence[tuple[str, Sequence[str], bytes]],
        *,
        budget: float | None = None,
        proceed: Callable[[], bool] | None = None,
        on_outcome: Callable[[int, Outcome, float], None] | None = None,
    ) -> list[Outcome | None]:
        """Send ``(from_addr, recipients, data)`` messages in turn; one outcome for each.

        Each outcome is what :meth:`send` would have returned (the refused recipients) or
        raised (a :class:`TransportError`), or None for a message not attempted because
        the session closed (after an earlier failure) or ``proceed()`` returned False
        before its turn: nothing of it was sent. ``budget``: seconds each message may
        take from its turn on, as ``deadline`` bounds :meth:`send`. ``on_outcome(index,
        outcome, seconds)`` is called soon after each outcome is known, with the time that
        message took from its turn (when the server was done with the one before).

        With PIPELINING, the reply to each message's final dot is read after the next
        message's envelope is written: one round trip per message instead of two (see
        :mod:`robust_mail.pipelining`).
        """
        ledger = Ledger(len(messages), on_outcome, self.provider.name)
        settle, report = ledger.settle, ledger.report
        smtp = self._smtp
        if smtp is not None and smtp.sock is not None and chunking.offered(smtp, self.provider):
            chunking.Run(self, smtp, ledger, budget=budget, proceed=proceed).send(messages)
            return ledger.outcomes

        def idle() -> None:
            # Called while a pipelined write is on its way: the caller's work on earlier
            # outcomes (recording them) overlaps the round trip instead of delaying it.
            # That time is the caller's, not the server's: the held message's clock,
            # which bounds reading its reply, is moved on by it.
            began = time.monotonic()
            report()
            if held is not None and held.deadline is not None and smtp is not None:
                held.deadline += time.monotonic() - began
                smtp.deadline = held.deadline

        held: Held | None = None
        try:
            for index, (from_addr, recipients, data) in enumerate(messages):
                if smtp is None or smtp.sock is None or self._smtp is None:
                    break
                if held is None:
                    report()  # no pipelined write to overlap with: report now
                if proceed is not None and not proceed():
                    break
                turn = time.monotonic()
                try:
                    recipients = list(recipients)
                    options = self._mail_options(smtp, from_addr, recipients, data)
                except TransportError as exc:
                    settle(index, exc, turn)
                    continue
                chained = (
                    smtp.has_extn("pipelining") and len(recipients) <= pipelining.MAX_RECIPIENTS
                )
                if held is not None and not chained:
                    settle(held.index, self._end_held(smtp, held), held.started)
                    held = None
                    if not self.is_open:
                        break
                started = time.monotonic()
                deadline = None if budget is None else started + budget
                sent = Held(index, recipients, {}, len(data), started, deadline)
                # The previous message's final reply is read under its own deadline.
                smtp.deadline = held.deadline if held is not None else deadline
                try:
                    sent.refused = self._start_transaction(
                        smtp,
                        from_addr,
                        recipients,
                        data,
                        options,
                        held=held,
                        sent=sent,
                        budget=budget,
                        idle=idle,
                    )
                except TransportError as exc:
                    if held is not None:
                        settle(held.index, held.result(), held.started)
                        held = None
                    settle(index, exc, sent.started)
                    continue
                if held is not None:
                    settle(held.index, held.result(), held.started)
                    held = None
                if chained and not any(400 <= code < 500 for code, _ in sent.refused.values()):
                    held = sent
                    continue
                # Recipients put off with a 4xx get another transaction after this one ends.
                try:
                    self._end_transaction(smtp, sent)
                    rest = self._send_the_rest(
                        smtp, from_addr, recipients, sent.refused, data, options
                    )
                except TransportError as exc:
                    settle(index, exc, sent.started)
                else:
                    settle(index, rest, sent.started)
            if held is not None and smtp is not None:
                smtp.deadline = held.deadline
                settle(held.index, self._end_held(smtp, held), held.started)
        except Exception:
            # Not a failure of the session (those are outcomes): whatever broke, replies
            # may be owed on it, so it must not be used again.
            self._abort()
            raise
        finally:
            if smtp is not None:
                smtp.deadline = None
        report()
        return ledger.outcomes

    def _end_held(self, smtp: Session, held: Held) -> Outcome:
        try:
            return self._end_transaction(smtp, held)
        except TransportError as exc:
            return exc

    def _send_the_rest(
        self,
        smtp: Session,
        from_addr: str,
        recipients: list[str],
        refused: dict[str, tuple[int, str]],
        data: bytes,
        options: list[str],
    ) -> dict[str, tuple[int, str]]:
        """Recipients put off with a 4xx while others were accepted: another transaction.

        RFC 5321 4.5.3.1.10: a server that limits the recipients of one transaction answers
        ``452`` to those over the limit, and the client sends them in a new transaction.
        Repeated while each transaction gets at least one more recipient accepted; the
        message has been delivered to some already, so nothing here raises — whoever is
        still put off (or lost with a failed transaction) is reported refused.
        """
        while self.is_open and self.reusable:
            later = [r for r in recipients if r in refused and 400 <= refused[r][0] < 500]
            if not later:
                break
            logger.info(
                "%s: %d recipients put off (%s); sending them in another transaction",
                self.provider.name,
                len(later),
                refused[later[0]][0],
            )
            try:
                again = self._transaction(smtp, from_addr, later, data, options)
            except TransportError as exc:
                if exc.step is Step.RCPT and exc.refused:
                    refused.update(exc.refused)  # no progress: they stay refused
                else:
                    for recipient in later:
                        refused[recipient] = (
                            exc.code or 451,
                            f"another transaction for this recipient failed: {exc.detail}",
                        )
                break
            for recipient in later:
                if recipient in again:
                    refused[recipient] = again[recipient]
                else:
                    del refused[recipient]
            recipients = later
        return refused

    def _transaction(
        self,
        smtp: Session,
        from_addr: str,
        recipients: list[str],
        data: bytes,
        options: list[str],
    ) -> dict[str, tuple[int, str]]:
        """MAIL → RCPT… → DATA → content → final dot, on an open session."""
        started = time.monotonic()
        refused = self._start_transaction(smtp, from_addr, recipients, data, options)
        return self._end_transaction(smtp, Held(-1, recipients, refused, len(data), started))

    def _start_transaction(
        self,
        smtp: Session,
        from_addr: str,
        recipients: list[str],
        data: bytes,
        options: list[str],
        *,
        held: Held | None = None,
        sent: Held | None = None,
        budget: float | None = None,
        idle: Callable[[], None] | None = None,
    ) -> dict[str, tuple[int, str]]:
        """MAIL → RCPT… → DATA → content; the refused recipients. The final reply is left.

        With a server offering PIPELINING the envelope goes out in one write
        (:mod:`robust_mail.pipelining`); its replies are then judged below one by one,
        as on the sequential path. A broken connection during that exchange is a
        failure at MAIL: no content has been sent. ``held``: a message whose final reply
        is still owed (pipelining only); it is read after this envelope is written, and
        its outcome put in ``held.outcome`` whatever happens here. Only then does the
        ``budget`` of this message (``sent``) start, and its replies are read under it:
        until that reply came, the server was busy with the previous message.
        """
        early: pipelining.Replies | None = None

        def resume() -> None:  # the previous message's reply is in: this one's turn
            if sent is not None:
                sent.started = time.monotonic()
                if budget is not None:
                    sent.deadline = sent.started + budget
            smtp.deadline = sent.deadline if sent is not None else None
            smtp.cut_short = False

        if held is not None or (
            smtp.has_extn("pipelining") and len(recipients) <= pipelining.MAX_RECIPIENTS
        ):
            try:
                with self._step(Step.MAIL):
                    early = pipelining.exchange(
                        smtp,
                        from_addr,
                        recipients,
                        options,
                        before=int(held is not None),
                        idle=idle,
                        resume=resume if held is not None else None,
                    )
            except TransportError as exc:
                if held is None:
                    raise
                # The envelope could not be written, so nor could the owed reply be read:
                # the held message's outcome is that failure (under its own deadline). This
                # message was not under way yet: a plain, transient failure at MAIL.
                held.outcome = self._held_outcome(smtp, held, None, exc.cause)
                lost = smtplib.SMTPServerDisconnected(
                    "the session failed before this message's envelope was sent"
                )
                raise TransportError(Step.MAIL, lost, provider=self.provider.name) from exc
            if held is not None:
                final = early.before[0] if early.before else None
                held.outcome = self._held_outcome(smtp, held, final, early.error)
                if not early.before:
                    resume()  # a failure reading it is not this message's deadline either

        try:
            with self._step(Step.MAIL):
                code, reply = early.mail() if early else smtp.mail(from_addr, options)
                if code != 250:
                    raise smtplib.SMTPSenderRefused(code, reply, from_addr)
        except TransportError as exc:
            if exc.code != 552:
                raise
            # "Exceeded storage allocation" at MAIL: too big for this provider's limit
            # (the session was reset by RSET and stays usable); another may take it.
            too_big = CapabilityMissing(
                f"{self.provider.host} refused a message of {len(data)} bytes at MAIL"
            )
            raise TransportError(
                Step.MAIL, too_big, provider=self.provider.name, code=exc.code, reply=exc.reply
            ) from exc

        refused: dict[str, tuple[int, str]] = {}
        with self._step(Step.RCPT):
            for index, recipient in enumerate(recipients):
                code, reply = early.rcpt(index) if early else smtp.rcpt(recipient)
                if code == 421:
                    # The server is closing the session: no point asking about the rest.
                    raise smtplib.SMTPResponseException(code, reply)
                if code not in (250, 251):
                    refused[recipient] = (code, reply_text(reply))
        if len(refused) == len(recipients):
            self._recover(Step.RCPT)
            logger.info("%s: every recipient refused", self.provider.name)
            cause = smtplib.SMTPRecipientsRefused(dict(refused))  # type: ignore[arg-type]
            raise TransportError(Step.RCPT, cause, provider=self.provider.name, refused=refused)

        with self._step(Step.DATA):
            if early:
                code, reply = early.data()
            else:
                smtp.putcmd("data")
                code, reply = smtp.getreply()
            if code != 354:
                raise smtplib.SMTPDataError(code, reply)
            smtp.write_all(chunking.data_wire(data))
        return refused

    def _end_transaction(self, smtp: Session, sent: Held) -> dict[str, tuple[int, str]]:
        """Read the reply to the final dot of ``sent``; its refused recipients if 250."""
        with self._step(Step.DATA_END):
            code, reply = smtp.getreply()
            if code != 250:
                raise smtplib.SMTPDataError(code, reply)
        self._accepted(smtp, sent)
        return sent.refused

    def _held_outcome(
        self,
        smtp: Session,
        held: Held,
        reply: tuple[int, bytes] | None,
        error: BaseException | None,
    ) -> Outcome:
        """Judge the final reply of ``held``, read while the next envelope was in flight.

        As :meth:`_end_transaction` would, except that nothing is sent afterwards (no RSET:
        the transaction is over either way and the next one is already under way).
        """
        if reply is not None and reply[0] == 250:
            self._accepted(smtp, held)
            return held.refused
        cause: BaseException
        if reply is not None:
            cause = smtplib.SMTPDataError(*reply)
        else:
            assert error is not None
            cause = self._blame(Step.DATA_END, error)
        logger.info("%s: %s failed: %s", self.provider.name, Step.DATA_END, cause)
        return TransportError(Step.DATA_END, cause, provider=self.provider.name)

    def _accepted(self, smtp: Session, sent: Held) -> None:
        smtp.command_encoding = "ascii"  # SMTPUTF8 lasts one transaction
        self.messages_sent += 1
        self.last_used = time.monotonic()
        logger.debug(
            "%s: message of %d bytes accepted for %d of %d recipients in %.1f ms",
            self.provider.name,
            sent.size,
            len(sent.recipients) - len(sent.refused),
            len(sent.recipients),
            (self.last_used - sent.started) * 1000,
        )

    def _mail_options(
        self, smtp: Session, from_addr: str, recipients: list[str], data: bytes
    ) -> list[str]:
        """Check the envelope before any traffic and return the MAIL FROM parameters."""
        if not isinstance(data, bytes | bytearray):
            raise TransportError(
                Step.DATA,
                InvalidMessage(f"message data must be bytes, not {type(data).__name__}"),
                provider=self.provider.name,
            )
        if not recipients:
            raise TransportError(
                Step.RCPT, InvalidMessage("no recipients"), provider=self.provider.name
            )
        _check_address(from_addr, Step.MAIL, self.provider.name, allow_empty=True)
        for recipient in recipients:
            _check_address(recipient, Step.RCPT, self.provider.name)
        options: list[str] = []
        if smtp.has_extn("size"):
            limit = _size_limit(smtp.esmtp_features.get("size", ""))
            if limit and len(data) > limit:
                raise TransportError(
                    Step.MAIL,
                    CapabilityMissing(
                        f"the message of {len(data)} bytes is larger than the "
                        f"{limit}-byte limit of {self.provider.host}"
                    ),
                    provider=self.provider.name,
                )
            options.append(f"SIZE={len(data)}")
        if smtp.has_extn("8bitmime") and not data.isascii():
            options.append("BODY=8BITMIME")
        if not all(a.isascii() for a in (from_addr, *recipients)):
            if not smtp.has_extn("smtputf8"):
                raise TransportError(
                    Step.MAIL,
                    CapabilityMissing(
                        f"{self.provider.host} does not support SMTPUTF8, "
                        "needed for a non-ASCII address"
                    ),
                    provider=self.provider.name,
                )
            options.append("SMTPUTF8")
        return options


def _size_limit(value: str) -> int:
    """The byte limit an EHLO ``SIZE`` keyword announces; 0 when none (RFC 1870)."""
    try:
        return max(0, int(value.split()[0])) if value.strip() else 0
    except ValueError:
        return 0


def _check_address(address: str, step: Step, provider: str, *, allow_empty: bool = False) -> None:
    if not isinstance(address, str) or (not address and not allow_empty):
        raise TransportError(
            step, InvalidMessage(f"invalid address {address!r}"), provider=provider
        )
    if any(c in address for c in _FORBIDDEN_IN_ADDRESS):
        raise TransportError(
            step,
            InvalidMessage(f"invalid address {address!r}: line breaks and <> are not allowed"),
            provider=provider,
        )
