"""SMTP command pipelining (RFC 2920): the envelope of a transaction in one write.

Without pipelining, MAIL, each RCPT and DATA wait for their replies one after another:
two round trips plus one per recipient before the message can start. A server that
offers ``PIPELINING`` in its EHLO reply (Gmail, Microsoft 365, SES, Postfix, Exim... do)
accepts them in one write and answers them in order, so the envelope costs one round
trip. :func:`exchange` does that write and reads the replies; the transport then judges
each reply exactly as if its command had been sent alone, so a refusal means the same
thing on either path.

Sending several messages on one session (:meth:`SMTPConnection.send_many`), the reply
to one message's final dot is read *after* the next envelope is written: RFC 2920 3.1
lets message content open a group of commands, so the content of one message, then the
next message's MAIL, RCPT... and DATA cost one round trip together. ``before`` below is
that outstanding reply.
"""

from __future__ import annotations

import smtplib
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["MAX_RECIPIENTS", "Replies", "exchange"]

#: Larger envelopes go command by command: thousands of pipelined RCPTs could fill both
#: sides' buffers with replies nobody reads yet and stall the write (RFC 2920, 3.1).
MAX_RECIPIENTS = 100

Reply = tuple[int, bytes]

#: A reply the server closed the session with: nothing after it will be answered.
_CLOSING = 421


@dataclass
class Replies:
    """The server's replies to MAIL, to each RCPT (in order) and to DATA.

    When the connection failed while they were read, ``error`` is that failure and
    the replies not read raise it, so the transport reports it at the step whose reply
    was missing (a drop on DATA is a failure at DATA, as without pipelining).
    """

    replies: list[Reply]
    recipients: int
    error: BaseException | None = None
    #: Replies to commands written before this envelope (a previous message's final dot),
    #: read first; fewer than asked for when the connection failed (``error``).
    before: list[Reply] = field(default_factory=list)

    def mail(self) -> Reply:
        return self._get(0)

    def rcpt(self, index: int) -> Reply:
        return self._get(1 + index)

    def data(self) -> Reply:
        return self._get(1 + self.recipients)

    def _get(self, index: int) -> Reply:
        if index < len(self.replies):
            return self.replies[index]
        assert self.error is not None
        raise self.error


def exchange(
    smtp: smtplib.SMTP,
    from_addr: str,
    recipients: list[str],
    options: list[str],
    *,
    before: int = 0,
    idle: Callable[[], None] | None = None,
    resume: Callable[[], None] | None = None,
) -> Replies:
    """Send MAIL, every RCPT and DATA in one write; return their replies.

    ``before`` replies still owed for what was written earlier are read first (into
    :attr:`Replies.before`), then ``resume()`` is called (the transport moves on to this
    message's deadline there). ``idle()`` is called between the write and the first
    read: work done there costs no time on the wire.

    Once a reply is ``421`` (the server is closing the session) the rest are not
    awaited: each is reported as that same ``421``. When the server accepted DATA
    (``354``) for a transaction that is being abandoned — MAIL refused, or every
    recipient refused — the data phase is ended at once with a lone dot (RFC 2920,
    3.1), so the session stays in step; the server refuses that empty message.

    Raises ``OSError`` when the commands cannot be sent; a connection failing while
    the replies are read is kept in :attr:`Replies.error`. No message content has been
    sent either way.
    """
    # As smtplib's mail() does for SMTPUTF8, which lasts one transaction.
    smtputf8 = any(option.lower() == "smtputf8" for option in options)
    smtp.command_encoding = "utf-8" if smtputf8 else "ascii"
    params = "".join(f" {option}" for option in options)
    commands = [
        f"mail FROM:{smtplib.quoteaddr(from_addr)}{params}",
        *(f"rcpt TO:{smtplib.quoteaddr(recipient)}" for recipient in recipients),
        "data",
    ]
    smtp.send("".join(f"{command}\r\n" for command in commands))
    if idle is not None:
        idle()
    replies = Replies([], len(recipients))
    last: Reply | None = None
    try:
        for read, into in ((before, replies.before), (len(commands), replies.replies)):
            for _ in range(read):
                last = last if last and last[0] == _CLOSING else smtp.getreply()
                into.append(last)
            if into is replies.before and resume is not None:
                resume()
    except OSError as exc:  # smtplib's disconnects and timeouts are OSErrors too
        replies.error = exc
        return replies
    mail, data = replies.mail(), replies.data()
    rcpts = replies.replies[1:-1]
    abandoned = mail[0] != 250 or all(code not in (250, 251) for code, _ in rcpts)
    if data[0] == 354 and abandoned:
        try:
            smtp.send(".\r\n")
            smtp.getreply()
        except OSError:
            # The refusal stands as the outcome, as without pipelining; the RSET that
            # follows it finds the connection broken and closes it.
            pass
    return replies
