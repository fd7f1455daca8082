"""Runs of messages sent with BDAT (RFC 3030 CHUNKING): each message in one write.

With DATA, the content waits for the server's ``354``: a round trip per message even with
the envelope pipelined. ``BDAT <size> LAST`` says how long the content is, so with a server
offering CHUNKING and PIPELINING (Gmail, Microsoft 365 and Postfix do) RSET, MAIL, RCPT…,
BDAT and the content of a message go out in one write, and a run keeps up to
:data:`WINDOW` messages on the wire before it reads the replies of the first: several
messages per round trip instead of one.

Each message starts with RSET, which RFC 2920 lets appear anywhere in a pipelined group:
whatever became of the message before it (refused, its chunk declined), the server takes
this one from a clean state, as RFC 3030 asks of a client after a failed chunk.

A reply means what it means on the DATA path: a refused MAIL or RCPT fails that message at
that step, a refused chunk at ``DATA_END`` (a clean refusal), a ``552`` at MAIL is a size
the provider cannot take. What is new is how much is on the wire when something breaks:

- the connection fails (or the deadline runs out) while replies are owed: every message
  in flight whose content went out is ambiguous (``DATA_END``), unless its replies
  already say it was refused;
- the server answers ``421``: that message failed; those written after it were not taken
  (the server was closing) and are reported not attempted, like the rest of the run;
- a write fails: that message's chunk is incomplete, so it was not taken (``DATA``).

Messages over :data:`MAX_SIZE` or with more than ``pipelining.MAX_RECIPIENTS`` recipients
go by DATA, one at a time, once the window is empty. Imports nothing from Django.
"""

from __future__ import annotations

import logging
import re
import select
import smtplib
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from robust_mail import pipelining
from robust_mail.exceptions import CapabilityMissing, Step, TransportError
from robust_mail.outcomes import Held, Ledger, Outcome, reply_text
from robust_mail.session import Session

if TYPE_CHECKING:
    from robust_mail.providers import ProviderConfig
    from robust_mail.transactions import Transactions

__all__ = ["MAX_SIZE", "WINDOW", "Run", "data_wire", "message_body", "offered"]

logger = logging.getLogger("robust_mail.transport")

#: Messages on the wire before the replies of the first are read. A connection failing
#: makes those in flight ambiguous, so this is also how many a drop can leave in doubt.
WINDOW = 8
#: ...and at most this many replies owed (RSET, MAIL, each RCPT, BDAT of each message in
#: flight): replies nobody reads yet must not fill the buffers both ways (RFC 2920, 3.1).
MAX_REPLIES_OWED = pipelining.MAX_RECIPIENTS + 3
#: Larger messages go by DATA, whose envelope is answered before the content is sent: a
#: refused envelope must not have cost the whole upload.
MAX_SIZE = 1024 * 1024

_LINE_END = re.compile(rb"\r\n|\r|\n")
_CLOSING = 421


def offered(smtp: Session, provider: ProviderConfig) -> bool:
    """Whether runs on this session go by BDAT: CHUNKING and PIPELINING both offered,
    and the provider's ``CHUNKING`` setting (default True) not turned off."""
    return bool(provider.chunking and smtp.has_extn("chunking") and smtp.has_extn("pipelining"))


def message_body(data: bytes) -> bytes:
    """The message with CRLF line endings, ending in CRLF (what BDAT sends as it is)."""
    body = bytes(data)
    crlf = body.count(b"\r\n")
    if body.count(b"\n") != crlf or body.count(b"\r") != crlf:
        body = _LINE_END.sub(b"\r\n", body)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body


def data_wire(data: bytes) -> bytes:
    """The message as sent after DATA: CRLF line endings, dot-stuffed, ending in CRLF.CRLF."""
    body = message_body(data)
    # RFC 5321 4.5.2: a line starting with "." gets another one, so no line is a lone ".".
    if body.startswith(b"."):
        body = b"." + body
    return body.replace(b"\r\n.", b"\r\n..") + b".\r\n"


@dataclass
class _InFlight:
    """A message written with BDAT whose replies are still to be read."""

    held: Held
    from_addr: str
    data: bytes
    options: list[str]
    #: Known without reading a reply: the write failed, or a 421 came before its turn.
    outcome: Outcome | None = None
    #: Accepted, with recipients put off by a 4xx: they need another transaction.
    put_off: bool = False
    #: When its replies were read: the end of its time, even if reported later.
    judged: float | None = None

    @property
    def replies_owed(self) -> int:  # RSET, MAIL, each RCPT, BDAT
        return 3 + len(self.held.recipients)


class Run:
    """One run of messages on a session offering CHUNKING; see the module docstring."""

    def __init__(
        self,
        conn: Transactions,
        smtp: Session,
        ledger: Ledger,
        *,
        budget: float | None,
        proceed: Callable[[], bool] | None,
    ) -> None:
        self.conn = conn
        self.smtp = smtp
        self.ledger = ledger
        self.budget = budget
        self.proceed = proceed
        self.window: deque[_InFlight] = deque()
        #: When the server was last known to be done with a message: the next one's turn.
        self.turn = time.monotonic()
        #: No more messages go out: a write failed, the connection was lost or closed.
        self.ended = False
        #: The connection was lost with replies owed: nothing more can be read.
        self.lost = False
        #: The last message judged was not accepted: the server's state is not known clean.
        self.dirty = False
        #: A message was already reported lost with the connection: the messages after it
        #: in flight share that failure (``collateral``), which it counts for the breaker.
        self.counted = False
        #: A write failed part way: the server waits for octets that will never come, so
        #: the connection is dropped once the replies owed before it are read.
        self.torn = False

    def send(self, messages: Sequence[tuple[str, Sequence[str], bytes]]) -> None:
        conn = self.conn
        if messages and _closed_while_idle(self.smtp):
            # Its content would go out with the envelope, so a connection found dead only
            # when the replies are read would leave the first message in doubt. Nothing was
            # sent: the caller may open a fresh connection for the whole run.
            conn._abort()
            gone = smtplib.SMTPServerDisconnected("the server closed the connection while idle")
            self.ledger.settle(
                0, TransportError(Step.MAIL, gone, provider=conn.provider.name), self.turn
            )
            self.ledger.report()
            return
        try:
            for index, (from_addr, recipients, data) in enumerate(messages):
                if self.ended or not conn.is_open:
                    break
                if not self.window:
                    self.ledger.report()  # no write on its way to overlap with: report now
                if not self._may_go_on():
                    break
                started = time.monotonic()
                try:
                    recipients = list(recipients)
                    options = conn._mail_options(self.smtp, from_addr, recipients, data)
                except TransportError as exc:
                    self.ledger.settle(index, exc, started)
                    continue
                if len(recipients) > pipelining.MAX_RECIPIENTS or len(data) > MAX_SIZE:
                    if not self._by_data(index, from_addr, recipients, data):
                        break
                    continue
                entry = _InFlight(
                    Held(index, recipients, {}, len(data), started), from_addr, data, options
                )
                while self.window and not self._room_for(entry):
                    self._judge_oldest()
                # Making room took time (a round trip, maybe): ask again before it goes.
                if self.ended or not self._may_go_on():
                    break  # not sent
                self._write(entry)
            while self.window:
                self._judge_oldest()
            if self.torn:
                conn._abort()
            self._clean()  # a clean session for its next user
        except Exception:
            # Not a failure of the session (those are outcomes): whatever broke, replies
            # may be owed on it, so it must not be used again.
            conn._abort()
            raise
        finally:
            self.smtp.deadline = None
        self.ledger.report()

    # --- writing ---------------------------------------------------------------------

    def _write(self, entry: _InFlight) -> None:
        held = entry.held
        body = message_body(entry.data)
        params = "".join(f" {option}" for option in entry.options)
        commands = [
            "RSET",
            f"MAIL FROM:{smtplib.quoteaddr(entry.from_addr)}{params}",
            *(f"RCPT TO:{smtplib.quoteaddr(recipient)}" for recipient in held.recipients),
            f"BDAT {len(body)} LAST",
        ]
        # SMTPUTF8 lets the addresses be UTF-8 (RFC 6531); otherwise they were checked ASCII.
        encoding = "utf-8" if "SMTPUTF8" in entry.options else "ascii"
        payload = "".join(f"{command}\r\n" for command in commands).encode(encoding) + body
        held.started = time.monotonic()
        held.deadline = self._deadline(held.started)
        self.smtp.deadline = held.deadline
        try:
            self.smtp.write_all(payload)
        except OSError as exc:
            # Its chunk is incomplete, so the server cannot have taken it. Those before it
            # are still read: their replies may be there.
            cause = self.conn._blame(Step.DATA, exc)
            logger.info("%s: %s failed: %s", self.conn.provider.name, Step.DATA, cause)
            entry.outcome = TransportError(Step.DATA, cause, provider=self.conn.provider.name)
            self.ended = self.torn = True
        self.window.append(entry)
        if not self.ended:
            # The caller's work on earlier outcomes overlaps the round trip. Its time is not
            # the server's: the clocks of the messages in flight are moved on by it.
            began = time.monotonic()
            self.ledger.report()
            spent = time.monotonic() - began
            self.turn += spent
            for waiting in self.window:
                waiting.held.started += spent

    def _may_go_on(self) -> bool:
        return self.proceed is None or self.proceed()

    def _room_for(self, entry: _InFlight) -> bool:
        owed = sum(waiting.replies_owed for waiting in self.window) + entry.replies_owed
        return len(self.window) < WINDOW and owed <= MAX_REPLIES_OWED

    def _deadline(self, started: float) -> float | None:
        return None if self.budget is None else started + self.budget

    # --- reading -----------------------------------------------------------------------

    def _judge_oldest(self) -> None:
        entry = self.window.popleft()
        outcome = self._outcome_of(entry)
        if not entry.put_off:
            self._settle(entry, outcome)
            return
        # Another transaction needs the session in step: the messages in flight are read
        # first; outcomes are still reported in order.
        judged = [(entry, outcome)]
        while self.window:
            later = self.window.popleft()
            judged.append((later, self._outcome_of(later)))
        for each, result in judged:
            if each.put_off and isinstance(result, dict):
                result = self._send_the_rest(each, result)
            self._settle(each, result)

    def _outcome_of(self, entry: _InFlight) -> Outcome:
        held = entry.held
        # Its turn came when the server was done with the one before (or when it was
        # written, if later): its time counts from then, whatever became of the others.
        held.started = max(held.started, self.turn)
        if entry.outcome is not None:
            return entry.outcome
        if self.lost:
            return self._lost(entry, [], None)
        held.deadline = self._deadline(held.started)
        self.smtp.deadline = held.deadline
        replies: list[tuple[int, bytes]] = []
        try:
            while len(replies) < entry.replies_owed:
                replies.append(self.smtp.getreply())
                if replies[-1][0] == _CLOSING:
                    break
        except OSError as exc:  # smtplib's disconnects and timeouts are OSErrors too
            return self._lost(entry, replies, self.conn._blame(Step.DATA_END, exc))
        finally:
            self.turn = entry.judged = time.monotonic()
        if replies[-1][0] == _CLOSING:
            return self._closed(entry, replies)
        if replies[0][0] != 250:
            # Every message starts with RSET, answered 250 by any server in step. Anything
            # else means the replies are not where they should be — say, a server that did
            # not read a refused message's chunk and took its lines for commands — so no
            # reply from here on can be trusted: everything in flight is in doubt.
            code, text = replies[0]
            slipped = smtplib.SMTPServerDisconnected(
                f"replies out of step: RSET answered {code} {reply_text(text)}"
            )
            return self._lost(entry, [], slipped)
        return self._judge(entry, replies)

    def _judge(self, entry: _InFlight, replies: list[tuple[int, bytes]]) -> Outcome:
        """The outcome of a message whose replies all came (none of them a 421)."""
        held = entry.held
        name = self.conn.provider.name
        refused = _refused(held.recipients, replies[2:-1])
        code, reply = replies[-1]
        failure = self._refusal(entry, replies[:-1])
        if failure is None and code != 250:
            cause = smtplib.SMTPDataError(code, reply)
            failure = TransportError(Step.DATA_END, cause, provider=name)
        self.dirty = failure is not None
        if failure is not None:
            logger.info("%s: %s failed: %s", name, failure.step, failure.detail)
            return failure
        held.refused = refused
        self.conn._accepted(self.smtp, held)
        entry.put_off = any(400 <= code < 500 for code, _ in refused.values())
        return refused

    def _refusal(self, entry: _InFlight, replies: list[tuple[int, bytes]]) -> TransportError | None:
        """The failure the envelope's replies (RSET, MAIL, RCPT…) already say, if any."""
        name = self.conn.provider.name
        held = entry.held
        if len(replies) >= 2 and replies[1][0] != 250:
            code, reply = replies[1]
            cause: BaseException = smtplib.SMTPSenderRefused(code, reply, entry.from_addr)
            if code == 552:
                # "Exceeded storage allocation" at MAIL: too big for this provider's limit.
                cause = CapabilityMissing(
                    f"{self.conn.provider.host} refused a message of {held.size} bytes at MAIL"
                )
            return TransportError(
                Step.MAIL, cause, provider=name, code=code, reply=reply_text(reply)
            )
        rcpts = replies[2 : 2 + len(held.recipients)]
        if len(rcpts) == len(held.recipients) and all(c not in (250, 251) for c, _ in rcpts):
            refused = _refused(held.recipients, rcpts)
            cause = smtplib.SMTPRecipientsRefused(dict(refused))  # type: ignore[arg-type]
            return TransportError(Step.RCPT, cause, provider=name, refused=refused)
        return None

    def _closed(self, entry: _InFlight, replies: list[tuple[int, bytes]]) -> Outcome:
        """A 421: the server refused this message and is closing the session."""
        self.ended = self.lost = True
        self.conn._abort()
        held = entry.held
        code, reply = replies[-1]
        steps = (Step.MAIL, Step.MAIL, *([Step.RCPT] * len(held.recipients)), Step.DATA_END)
        step = steps[len(replies) - 1]
        cause = smtplib.SMTPResponseException(code, reply)
        logger.info("%s: %s failed: %s", self.conn.provider.name, step, cause)
        for later in self.window:  # never taken: not attempted, like the rest of the run
            later.outcome = later.outcome or _NOT_TAKEN
        return TransportError(step, cause, provider=self.conn.provider.name)

    def _lost(
        self, entry: _InFlight, replies: list[tuple[int, bytes]], error: BaseException | None
    ) -> Outcome:
        """The connection failed with replies owed: ambiguous, unless already refused.

        The first message it happens to counts the failure; those after it in flight are
        marked ``collateral``, so that one lost connection is one failure for the breaker.
        """
        if not self.lost:
            self.ended = self.lost = True
            self.conn._abort()
        refusal = self._refusal(entry, replies)
        if refusal is not None:
            return refusal  # its own outcome, which says nothing of the connection
        collateral, self.counted = self.counted, True
        cause = error or smtplib.SMTPServerDisconnected(
            "the connection was lost before this message's reply"
        )
        logger.info("%s: %s failed: %s", self.conn.provider.name, Step.DATA_END, cause)
        return TransportError(
            Step.DATA_END, cause, provider=self.conn.provider.name, collateral=collateral
        )

    def _settle(self, entry: _InFlight, outcome: Outcome) -> None:
        if outcome is not _NOT_TAKEN:  # else reported as not attempted (None)
            self.ledger.settle(entry.held.index, outcome, entry.held.started, entry.judged)

    # --- by DATA -------------------------------------------------------------------------

    def _by_data(self, index: int, from_addr: str, recipients: list[str], data: bytes) -> bool:
        """A message too large or too widely addressed for BDAT: alone, by DATA.

        False when the run stops here (the session ended, or ``proceed()`` said so while
        the messages in flight were read): this one was not sent.
        """
        while self.window:
            self._judge_oldest()
        if self.ended or not self._may_go_on() or not self._clean():
            return False
        started = time.monotonic()
        outcome: Outcome
        try:
            outcome = self.conn.send(from_addr, recipients, data, deadline=self._deadline(started))
        except TransportError as exc:
            outcome = exc  # send() left the session clean (RSET) or closed it
        self.ledger.settle(index, outcome, started)
        self.turn = time.monotonic()
        return True

    def _send_the_rest(self, entry: _InFlight, refused: dict[str, tuple[int, str]]) -> Outcome:
        """Recipients put off with a 4xx: another transaction by DATA (window empty)."""
        if self.ended or not self._clean():
            return refused
        held = entry.held
        self.smtp.deadline = self._deadline(time.monotonic())
        try:
            return self.conn._send_the_rest(
                self.smtp,
                entry.from_addr,
                held.recipients,
                dict(refused),
                entry.data,
                entry.options,
            )
        finally:
            self.smtp.deadline = None

    def _clean(self) -> bool:
        """RSET after a refused message (before a transaction by DATA, at the end of the
        run); False if the session is closed. The RSET is no message's: the timeout
        bounds it, not the last message's deadline."""
        if self.dirty and self.conn.is_open:
            self.dirty = False
            self.smtp.deadline = None
            self.conn._recover(Step.DATA_END)
        return self.conn.is_open


#: The outcome of a message written after the one a 421 refused: reported as not attempted.
_NOT_TAKEN = TransportError(Step.MAIL, smtplib.SMTPServerDisconnected("not taken"))


def _refused(recipients: list[str], replies: list[tuple[int, bytes]]) -> dict[str, tuple[int, str]]:
    return {
        recipient: (code, reply_text(reply))
        for recipient, (code, reply) in zip(recipients, replies, strict=False)
        if code not in (250, 251)
    }


def _closed_while_idle(smtp: Session) -> bool:
    """Whether an idle session has something to read: the server's FIN, a 421, a TLS alert."""
    sock = smtp.sock
    if sock is None:
        return True
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
