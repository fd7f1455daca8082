"""Runs of messages sent with BDAT (RFC 3030) to a server offering CHUNKING.

Two servers: the scripted one (tests/scripted_bdat.py), which holds its replies back until
a window of messages has arrived and so shows that the client keeps writing; and the test
server on aiosmtpd with STARTTLS and AUTH, which takes BDAT for real. Each message's
outcome must be what ``send()`` would have said of it alone — except where the connection
fails with messages in flight, which are then in doubt (ambiguous) together.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from robust_mail import chunking
from robust_mail.exceptions import Classification, DeadlineReached, Step, TransportError, classify
from robust_mail.providers import ProviderConfig
from robust_mail.resolver import Resolver
from robust_mail.testing import Mode, SMTPTestServer, TestCertificates
from robust_mail.transport import SMTPConnection, incapable
from tests.scripted_bdat import DROP, bdat_scripted

__all__ = ["bdat_scripted"]  # the fixture, used by name

MESSAGE = b"Subject: hi\r\nMessage-ID: <1@test>\r\n\r\nHello\r\n"
WINDOW = chunking.WINDOW


def batch(count: int, data: bytes = MESSAGE) -> list[tuple[str, list[str], bytes]]:
    return [("a@example.com", [f"r{i}@example.com"], data) for i in range(count)]


def failure(outcome: object) -> TransportError:
    assert isinstance(outcome, TransportError), outcome
    return outcome


# --- the scripted server: what goes out before any reply is read ----------------------


def test_a_window_of_messages_goes_out_before_any_reply_is_read(bdat_scripted: Any) -> None:
    conn, server = bdat_scripted(hold=WINDOW)

    outcomes = conn.send_many(batch(2 * WINDOW + 3))

    assert outcomes == [{}] * (2 * WINDOW + 3)
    # A client waiting for an answer after a message would have been answered by the
    # server's idle flush one message at a time.
    assert server.batches[:2] == [WINDOW, WINDOW]
    assert server.messages == [MESSAGE] * (2 * WINDOW + 3)
    assert conn.messages_sent == 2 * WINDOW + 3 and conn.reusable and conn.is_open
    # Each message: RSET, MAIL, RCPT, BDAT with its size, LAST; no DATA.
    first = [line.split()[0].upper() for line in server.log[1:5]]
    assert first == [b"RSET", b"MAIL", b"RCPT", b"BDAT"]
    assert server.log[4] == f"BDAT {len(MESSAGE)} LAST\r\n".encode()
    assert not any(line.upper().startswith(b"DATA") for line in server.log)


def test_refusals_in_flight_are_each_message_s_own(bdat_scripted: Any) -> None:
    conn, server = bdat_scripted(
        None,
        {"mail": "550 5.7.1 sender refused", "rcpt": ["503 need MAIL"], "bdat": "503 need MAIL"},
        {"rcpt": ["550 5.1.1 no such user"], "bdat": "554 5.5.1 no valid recipients"},
        {"bdat": "451 4.3.0 try later"},
        {"mail": "552 5.3.4 too big", "rcpt": ["503 no"], "bdat": "503 no"},
        None,
        hold=6,
    )

    outcomes = conn.send_many(batch(6))

    assert outcomes[0] == {} and outcomes[5] == {}
    sender, recipient, later, size = (failure(o) for o in outcomes[1:5])
    assert (sender.step, sender.code) == (Step.MAIL, 550)
    assert (recipient.step, classify(recipient)) == (Step.RCPT, Classification.MESSAGE_FATAL)
    assert recipient.refused == {"r2@example.com": (550, "5.1.1 no such user")}
    assert (later.step, later.code, classify(later)) == (
        Step.DATA_END,
        451,
        Classification.TRANSIENT,
    )
    assert (size.step, size.code) == (Step.MAIL, 552)
    assert incapable(size)  # too big for this provider: the next one may take it
    assert server.batches == [6]
    assert conn.messages_sent == 2 and conn.reusable and conn.is_open


def test_a_refused_last_message_leaves_the_session_reset_for_its_next_user(
    bdat_scripted: Any,
) -> None:
    conn, server = bdat_scripted(None, {"bdat": "554 5.6.0 rejected"}, hold=2)

    outcomes = conn.send_many(batch(2))

    assert outcomes[0] == {} and failure(outcomes[1]).code == 554
    assert server.log[-1].upper() == b"RSET\r\n" and conn.reusable and conn.is_open


def test_a_drop_with_messages_in_flight_leaves_each_of_them_in_doubt(bdat_scripted: Any) -> None:
    conn, server = bdat_scripted(None, None, DROP, hold=WINDOW)

    outcomes = conn.send_many(batch(WINDOW))

    assert outcomes[:2] == [{}, {}]
    in_flight = [failure(o) for o in outcomes[2:]]
    # Their content went out with their envelopes: the server may have any of them.
    assert all(
        (e.step, classify(e)) == (Step.DATA_END, Classification.AMBIGUOUS) for e in in_flight
    )
    assert len(server.messages) == WINDOW and not conn.is_open


def test_a_drop_after_a_refusal_is_still_counted_once(bdat_scripted: Any) -> None:
    # The second message's recipient is refused, then the server hangs up before its BDAT
    # reply. That message's outcome is its refusal; the connection's loss is the next
    # message's to count (not collateral), and only the ones after that are collateral.
    conn, _ = bdat_scripted(None, {"rcpt": ["550 5.1.1 no such user"], "bdat": DROP}, hold=4)

    outcomes = conn.send_many(batch(4))

    assert outcomes[0] == {}
    refused, lost, later = (failure(o) for o in outcomes[1:])
    assert (refused.step, classify(refused)) == (Step.RCPT, Classification.MESSAGE_FATAL)
    assert [classify(lost), classify(later)] == [Classification.AMBIGUOUS] * 2
    assert [lost.collateral, later.collateral] == [False, True]


def test_a_421_refuses_that_message_and_those_after_it_were_not_taken(
    bdat_scripted: Any,
) -> None:
    conn, _ = bdat_scripted(None, {"mail": "421 4.3.2 shutting down"}, hold=4)

    outcomes = conn.send_many(batch(4))

    closing = failure(outcomes[1])
    assert outcomes[0] == {}
    assert (closing.step, closing.code, classify(closing)) == (
        Step.MAIL,
        421,
        Classification.TRANSIENT,
    )
    # A closing server took nothing after its 421: reported as not attempted.
    assert outcomes[2:] == [None, None] and not conn.is_open


def test_recipients_put_off_get_another_transaction_by_data(bdat_scripted: Any) -> None:
    two = [("a@example.com", ["x@example.com", "y@example.com"], MESSAGE), *batch(2)]
    conn, server = bdat_scripted({"rcpt": ["250 ok", "452 4.5.3 too many recipients"]}, hold=3)

    outcomes = conn.send_many(two)

    assert outcomes == [{}, {}, {}]
    # The third message's replies were read first; then y@ went in a DATA transaction.
    data_at = next(i for i, line in enumerate(server.log) if line.upper() == b"DATA\r\n")
    assert server.log[data_at - 1].upper() == b"RCPT TO:<Y@EXAMPLE.COM>\r\n"
    assert conn.messages_sent == 4


def test_a_reply_out_of_step_leaves_every_message_in_flight_in_doubt(bdat_scripted: Any) -> None:
    # Each message starts with RSET, which a server in step answers 250. Anything else
    # means the replies have slipped (a server that took a refused chunk's lines for
    # commands): none of what follows can be trusted.
    conn, _ = bdat_scripted(None, {"rset": "500 5.5.2 syntax error"}, hold=4)

    outcomes = conn.send_many(batch(4))

    assert outcomes[0] == {}
    in_doubt = [failure(o) for o in outcomes[1:]]
    assert all((e.step, classify(e)) == (Step.DATA_END, Classification.AMBIGUOUS) for e in in_doubt)
    assert not conn.is_open


def test_replies_owed_are_capped_as_well_as_messages(bdat_scripted: Any) -> None:
    # Two messages of 60 recipients owe 126 replies: the second waits for the first's.
    wide = [("a@example.com", [f"r{i}@example.com" for i in range(60)], MESSAGE)] * 2
    conn, server = bdat_scripted(hold=2)

    assert conn.send_many(wide) == [{}, {}]
    assert server.batches == [1, 1]  # answered one at a time (the server's idle flush)


# --- the test server on aiosmtpd: STARTTLS, AUTH, real BDAT ---------------------------


@pytest.fixture
def chunking_server(certificates: TestCertificates) -> Iterator[Callable[..., Any]]:
    started: list[SMTPTestServer] = []
    made: list[SMTPConnection] = []

    def start(mode: Mode | str = Mode.ACCEPT, **kwargs: Any) -> tuple[SMTPConnection, Any]:
        server = SMTPTestServer(
            mode,
            tls="starttls",
            certificates=certificates,
            auth={"user": "secret"},
            pipelining=True,
            chunking=True,
            **kwargs,
        ).start()
        started.append(server)
        provider = ProviderConfig(
            name="chunking",
            host="127.0.0.1",
            port=server.port,
            timeout=3,
            use_tls=True,
            ssl_cafile=certificates.ca_file,
            username="user",
            password="secret",
        )
        conn = SMTPConnection(provider, resolver=Resolver(), local_hostname="client.test")
        made.append(conn)
        conn.open()
        return conn, server

    yield start
    for conn in made:
        conn.close()
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def certificates() -> TestCertificates:
    return TestCertificates()


def test_a_run_over_starttls_and_auth_delivers_each_message_as_data_would(
    chunking_server: Any,
) -> None:
    # Lines starting with a dot and bare LF line ends: BDAT sends no dot-stuffing, and the
    # server must get the very bytes a DATA transaction would have delivered.
    data = b"Subject: dots\r\n\r\n.starts with a dot\nbare LF\r\n..two dots"
    conn, server = chunking_server()

    outcomes = conn.send_many(batch(20, data))

    assert outcomes == [{}] * 20
    received = server.messages
    expected = b"Subject: dots\r\n\r\n.starts with a dot\r\nbare LF\r\n..two dots\r\n"
    assert [m.data for m in received] == [expected] * 20
    assert [m.rcpt_tos for m in received] == [[f"r{i}@example.com"] for i in range(20)]
    assert all(m.tls and m.auth_user == "user" and m.chunked for m in received)
    assert conn.reusable and conn.messages_sent == 20


def test_large_or_widely_addressed_messages_go_by_data_in_their_turn(
    chunking_server: Any,
) -> None:
    conn, server = chunking_server()
    big = MESSAGE + (b"x" * 70 + b"\r\n") * (chunking.MAX_SIZE // 72 + 1)
    assert len(big) > chunking.MAX_SIZE
    many = [f"m{i}@example.com" for i in range(101)]
    messages = [
        *batch(2),
        ("a@example.com", ["big@example.com"], big),
        ("a@example.com", many, MESSAGE),
        *batch(2),
    ]

    outcomes = conn.send_many(messages)

    assert outcomes == [{}] * 6
    order = [m.rcpt_tos[0] for m in server.messages]
    first, second = "r0@example.com", "r1@example.com"
    assert order == [first, second, "big@example.com", "m0@example.com", first, second]
    assert len(server.messages[3].rcpt_tos) == 101
    assert [m.chunked for m in server.messages] == [True, True, False, False, True, True]


def test_refused_recipients_and_refused_chunks_on_the_real_server(chunking_server: Any) -> None:
    conn, server = chunking_server(refuse_recipients=["r1@example.com", "r3@example.com"])
    messages = batch(3)
    messages.append(("a@example.com", ["r3@example.com", "ok@example.com"], MESSAGE))

    outcomes = conn.send_many(messages)

    refused = failure(outcomes[1])
    assert (refused.step, classify(refused)) == (Step.RCPT, Classification.MESSAGE_FATAL)
    assert outcomes[0] == {} and outcomes[2] == {}
    code, _ = outcomes[3]["r3@example.com"]  # type: ignore[index]
    assert code == 550  # partial: delivered to the other one
    assert [m.rcpt_tos for m in server.messages] == [
        ["r0@example.com"],
        ["r2@example.com"],
        ["ok@example.com"],
    ]

    server.mode = Mode.DATA_451
    others = [("a@example.com", [f"z{i}@example.com"], MESSAGE) for i in range(3)]
    later = [failure(o) for o in conn.send_many(others)]
    assert [(e.step, e.code) for e in later] == [(Step.DATA_END, 451)] * 3
    server.mode = Mode.ACCEPT
    assert conn.send_many(others[:1]) == [{}]  # the session stayed in step
    assert len(server.messages) == 4


def test_a_server_that_drops_after_taking_a_message_leaves_it_in_doubt(
    chunking_server: Any,
) -> None:
    conn, server = chunking_server()
    server.mode = Mode.DISCONNECT_AFTER_DATA

    outcomes = conn.send_many(batch(3))

    # The first got there; the others were written behind it, so they are in doubt too —
    # unless the hang-up came first and a write failed: then that message plainly was not
    # taken (DATA, transient). On a loaded machine either can happen; none is "sent".
    first, *others = (failure(o) for o in outcomes)
    assert classify(first) is Classification.AMBIGUOUS
    assert all(
        classify(e) is Classification.AMBIGUOUS
        or (e.step, classify(e)) == (Step.DATA, Classification.TRANSIENT)
        for e in others
    )
    assert len(server.messages) == 1
    assert not conn.is_open


def test_a_non_ascii_address_goes_with_smtputf8(chunking_server: Any) -> None:
    conn, server = chunking_server()

    outcomes = conn.send_many([("a@example.com", ["jörg@example.com"], MESSAGE), *batch(1)])

    assert outcomes == [{}, {}]
    assert server.messages[0].rcpt_tos == ["jörg@example.com"]


def test_a_write_the_deadline_stops_fails_at_data_and_drops_the_connection(
    bdat_scripted: Any,
) -> None:
    # The message's budget is over before its write. Had part of it gone out, the server
    # would be waiting for the rest of the chunk: the session cannot go on either way.
    conn, server = bdat_scripted(hold=1)

    outcomes = conn.send_many(batch(2), budget=1e-9)

    cut = failure(outcomes[0])
    assert (cut.step, classify(cut)) == (Step.DATA, Classification.TRANSIENT)
    assert isinstance(cut.cause, DeadlineReached)
    assert outcomes[1] is None and not conn.is_open
    assert server.messages == []


def test_a_pooled_connection_closed_while_idle_is_not_written_to(chunking_server: Any) -> None:
    conn, server = chunking_server()
    assert conn.send_many(batch(1)) == [{}]
    server.drop_connections()  # the server hangs up on the idle connection
    time.sleep(0.2)  # for its FIN to arrive

    outcomes = conn.send_many(batch(3))

    # Written to, the dead connection would have left three messages in doubt. Not
    # written to, it fails the first plainly at MAIL, and the caller (the dispatcher)
    # sends the whole run again on a fresh connection.
    first = failure(outcomes[0])
    assert (first.step, classify(first)) == (Step.MAIL, Classification.TRANSIENT)
    assert outcomes[1:] == [None, None] and not conn.is_open


def test_a_provider_with_chunking_off_sends_runs_by_data() -> None:
    with SMTPTestServer(pipelining=True, chunking=True) as server:
        provider = ProviderConfig(
            name="no-bdat", host="127.0.0.1", port=server.port, timeout=3, chunking=False
        )
        conn = SMTPConnection(provider, resolver=Resolver(), local_hostname="client.test")
        conn.open()
        try:
            assert conn.send_many(batch(3)) == [{}, {}, {}]
        finally:
            conn.close()
        assert [m.chunked for m in server.messages] == [False, False, False]


def test_one_connection_lost_mid_run_is_one_failure_for_the_breaker(
    smtp_server: Any, robust: Any
) -> None:
    # The primary takes one message per connection and hangs up: the messages in flight
    # behind it are in doubt too and go to the backup flagged — but each lost connection
    # is one failure of the provider, however many messages were in flight. (How many
    # connections it takes depends on timing: a write may already fail, and that message
    # is retried on a connection of its own.)
    from django.core import mail
    from django.core.mail import EmailMessage

    from robust_mail.conf import get_config
    from robust_mail.state import get_breaker
    from tests.conftest import provider

    primary = smtp_server("disconnect_after_data", pipelining=True, chunking=True)
    backup = smtp_server(pipelining=True, chunking=True)
    robust(
        [provider(primary, "primary"), provider(backup, "backup")],
        CIRCUIT_BREAKER={"FAILURE_THRESHOLD": 100},
    )
    messages = [
        EmailMessage("Hi", "Body", "from@example.com", [f"to{i}@example.com"]) for i in range(6)
    ]

    assert mail.get_connection().send_messages(messages) == 6

    assert all(m.delivery_result.ambiguous for m in messages)
    assert all(m.delivery_result.provider == "backup" for m in messages)
    assert len(backup.messages) == 6
    lost = primary.connections_total
    assert len(primary.messages) == lost < 6  # one message taken per connection
    assert get_breaker("primary", get_config()).failures == lost
