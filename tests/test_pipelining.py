"""PIPELINING (RFC 2920): the envelope goes out in one write and the session stays in step.

The aiosmtpd scenarios of test_transport.py and test_failover.py run with and without
PIPELINING offered. Here a scripted server shows what aiosmtpd cannot: it answers nothing
of the envelope until MAIL, RCPT and DATA have all arrived, so a client waiting for each
reply would hang; and it can accept DATA after refusing every recipient.
"""

from __future__ import annotations

from typing import Any

import pytest

from robust_mail.exceptions import Step, TransportError
from tests.scripted_smtp import MESSAGE, scripted

__all__ = ["scripted"]  # the fixture, used by name


def test_the_envelope_is_answered_only_after_all_of_it_arrived(scripted: Any) -> None:
    conn, _ = scripted((["250 sender ok", "250 one", "250 two", "354 go"], "250 queued"))

    refused = conn.send("a@example.com", ["b@example.com", "c@example.com"], MESSAGE)

    assert refused == {}
    assert conn.is_open and conn.messages_sent == 1


def test_refused_sender_reads_every_reply_and_the_session_stays_usable(scripted: Any) -> None:
    conn, _ = scripted(
        (["550 5.7.1 sender refused", "503 no sender", "503 no sender"], ""),
        (["250 sender ok", "250 ok", "354 go"], "250 queued"),
    )

    with pytest.raises(TransportError) as refused:
        conn.send("bad@example.com", ["b@example.com"], MESSAGE)
    assert (refused.value.step, refused.value.code) == (Step.MAIL, 550)
    assert conn.reusable

    assert conn.send("a@example.com", ["b@example.com"], MESSAGE) == {}


def test_data_accepted_after_every_recipient_was_refused_is_ended_empty(scripted: Any) -> None:
    # A server answering 354 although no recipient is left: the client ends the data phase
    # with a lone dot (RFC 2920, 3.1), so the message is never sent there.
    conn, server = scripted(
        (["250 sender ok", "550 5.1.1 no such user", "354 go"], "554 no valid recipients"),
        (["250 sender ok", "250 ok", "354 go"], "250 queued"),
    )

    with pytest.raises(TransportError) as refused:
        conn.send("a@example.com", ["nobody@example.com"], MESSAGE)
    assert refused.value.step is Step.RCPT
    assert refused.value.refused == {"nobody@example.com": (550, "5.1.1 no such user")}

    assert conn.send("a@example.com", ["b@example.com"], MESSAGE) == {}
    assert server.log.count(b"Subject: hi\r\n") == 1  # only the second transaction's


def test_a_drop_while_ending_an_abandoned_data_phase_keeps_the_refusal(scripted: Any) -> None:
    # The refusal is the outcome, as without pipelining (message-fatal, per recipient), not
    # the disconnect that followed it (which would make it transient and retried).
    conn, _ = scripted((["250 sender ok", "550 5.1.1 no such user", "354 go"], "drop"))

    with pytest.raises(TransportError) as refused:
        conn.send("a@example.com", ["nobody@example.com"], MESSAGE)

    assert refused.value.step is Step.RCPT
    assert refused.value.refused == {"nobody@example.com": (550, "5.1.1 no such user")}
    assert not conn.is_open


class _Recording:
    """Just enough of smtplib.SMTP for exchange(): it records what it is asked to do."""

    command_encoding = "ascii"

    def __init__(self, replies: list[tuple[int, bytes]], log: list[str]) -> None:
        self.replies = replies
        self.log = log

    def send(self, data: str) -> None:
        self.log.append(f"write {data.count(chr(10))} commands")

    def getreply(self) -> tuple[int, bytes]:
        self.log.append("read")
        return self.replies.pop(0)


def test_work_between_runs_happens_after_the_write_and_the_next_deadline_after_the_owed_reply():
    # The order the transport relies on, which no server can observe: the envelope is
    # written first, then idle() (the caller's bookkeeping) runs while it travels, then
    # the reply owed for the previous message is read, then resume() switches to this
    # message's deadline, then this envelope's replies are read.
    from robust_mail import pipelining

    log: list[str] = []
    smtp = _Recording([(250, b"queued"), (250, b"ok"), (250, b"ok"), (354, b"go")], log)

    replies = pipelining.exchange(
        smtp,  # type: ignore[arg-type]
        "a@example.com",
        ["b@example.com"],
        [],
        before=1,
        idle=lambda: log.append("idle"),
        resume=lambda: log.append("resume"),
    )

    assert log == ["write 3 commands", "idle", "read", "resume", "read", "read", "read"]
    assert replies.before == [(250, b"queued")] and replies.data() == (354, b"go")
