"""Several messages on one session: each final reply is read after the next envelope is out.

The scripted server (tests/scripted_smtp.py) withholds the reply to each final dot until
the client's next command arrives: a client that waited for it before sending on would
hang until its timeout. Each message's outcome must still be exactly what ``send()``
would have said of it alone.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from robust_mail.exceptions import Classification, Step, TransportError, classify
from tests.scripted_smtp import MESSAGE, scripted

__all__ = ["scripted"]  # the fixture, used by name

OK = (["250 sender ok", "250 ok", "354 go"], "250 queued")


@pytest.fixture(params=[False, True], ids=["data", "bdat"])
def chunking(request: pytest.FixtureRequest) -> bool:
    """Whether ``smtp_server`` servers offer CHUNKING: the runs then go by BDAT."""
    return bool(request.param)


#: Run on both paths: DATA (pipelined envelopes) and BDAT (tests/test_chunking.py).
both_paths = pytest.mark.usefixtures("chunking")


def batch(count: int) -> list[tuple[str, list[str], bytes]]:
    return [("a@example.com", [f"r{i}@example.com"], MESSAGE) for i in range(count)]


def test_the_next_envelope_goes_out_before_the_final_reply_is_read(scripted: Any) -> None:
    conn, server = scripted(OK, OK, OK, withhold=True)

    outcomes = conn.send_many(batch(3))

    assert outcomes == [{}, {}, {}]
    assert conn.messages_sent == 3 and conn.reusable
    # Content, then the next MAIL, with no command in between (no RSET, no NOOP).
    dots = [i for i, line in enumerate(server.log) if line == b".\r\n"]
    assert [server.log[i + 1][:4].upper() for i in dots[:2]] == [b"MAIL", b"MAIL"]


def test_a_refused_final_dot_is_that_message_s_outcome_and_the_chain_goes_on(
    scripted: Any,
) -> None:
    conn, server = scripted(
        OK, (OK[0], "451 4.3.0 try later"), (OK[0], "554 5.6.0 rejected"), OK, withhold=True
    )

    outcomes = conn.send_many(batch(4))

    assert outcomes[0] == {} and outcomes[3] == {}
    later, rejected = outcomes[1], outcomes[2]
    assert isinstance(later, TransportError) and isinstance(rejected, TransportError)
    assert (later.step, later.code, classify(later)) == (
        Step.DATA_END,
        451,
        Classification.TRANSIENT,
    )
    assert (rejected.step, rejected.code, classify(rejected)) == (
        Step.DATA_END,
        554,
        Classification.MESSAGE_FATAL,
    )
    assert conn.messages_sent == 2 and conn.reusable
    assert not any(line.upper().startswith(b"RSET") for line in server.log)


def test_a_drop_before_a_final_reply_is_ambiguous_for_that_message_only(scripted: Any) -> None:
    conn, _ = scripted(OK, (OK[0], "drop"), OK, OK, withhold=True)

    outcomes = conn.send_many(batch(4))

    assert outcomes[0] == {}
    dropped, next_one = outcomes[1], outcomes[2]
    assert isinstance(dropped, TransportError) and isinstance(next_one, TransportError)
    # The server may have the second message: ambiguous. The third's envelope was out but
    # none of its content: a plain transient failure at MAIL. The fourth never started.
    assert (dropped.step, classify(dropped)) == (Step.DATA_END, Classification.AMBIGUOUS)
    assert (next_one.step, classify(next_one)) == (Step.MAIL, Classification.TRANSIENT)
    assert outcomes[3] is None
    assert not conn.is_open


def test_a_421_final_reply_ends_the_chain(scripted: Any) -> None:
    conn, _ = scripted((OK[0], "421 4.3.2 shutting down"), OK, OK, withhold=True)

    outcomes = conn.send_many(batch(3))

    closing, next_one = outcomes[0], outcomes[1]
    assert isinstance(closing, TransportError) and isinstance(next_one, TransportError)
    assert (closing.step, closing.code) == (Step.DATA_END, 421)
    assert (next_one.step, next_one.code, classify(next_one)) == (
        Step.MAIL,
        421,
        Classification.TRANSIENT,
    )
    assert outcomes[2] is None and not conn.is_open


def test_refused_recipients_in_the_chain_are_judged_as_alone(scripted: Any) -> None:
    conn, server = scripted(
        OK,
        (["250 sender ok", "550 5.1.1 no such user", "554 no valid recipients"], ""),
        OK,
        withhold=True,
    )

    outcomes = conn.send_many(batch(3))

    refused = outcomes[1]
    assert outcomes[0] == {} and outcomes[2] == {}
    assert isinstance(refused, TransportError) and refused.step is Step.RCPT
    assert refused.refused == {"r1@example.com": (550, "5.1.1 no such user")}
    assert classify(refused) is Classification.MESSAGE_FATAL
    # The RSET abandoning the second transaction comes after its whole envelope (never
    # inside a pipelined group), and the session stays in step for the third message.
    verbs = {b"MAIL", b"RCPT", b"DATA", b"RSET", b"QUIT"}
    commands = [line[:4].upper() for line in server.log if line[:4].upper() in verbs]
    assert commands == [b"MAIL", b"RCPT", b"DATA"] * 2 + [b"RSET", b"MAIL", b"RCPT", b"DATA"]
    assert server.log.count(b"Subject: hi\r\n") == 2


def test_a_message_that_cannot_go_out_is_refused_before_any_traffic(scripted: Any) -> None:
    conn, server = scripted(OK, OK, withhold=True)
    messages = batch(3)
    messages[1] = ("a@example.com", ["bad\r\nRCPT TO:<x@example.com>"], MESSAGE)

    outcomes = conn.send_many(messages)

    bad = outcomes[1]
    assert outcomes[0] == {} and outcomes[2] == {}
    assert isinstance(bad, TransportError) and bad.step is Step.RCPT
    assert classify(bad) is Classification.MESSAGE_FATAL
    assert not any(b"x@example.com" in line for line in server.log)


def test_each_message_of_a_run_has_its_own_time_budget(scripted: Any) -> None:
    # Each final reply takes 0.3 s: four messages take longer than the 0.5 s budget,
    # none of them alone does. A deadline shared by the run would cut the later ones.
    conn, _ = scripted(OK, OK, OK, OK, pause=0.3)

    outcomes = conn.send_many(batch(4), budget=0.5)

    assert outcomes == [{}, {}, {}, {}]


def test_the_caller_s_slow_bookkeeping_is_not_charged_to_the_server(scripted: Any) -> None:
    # Recording message 0 takes longer than the whole budget of one message. It happens
    # while message 1's reply is owed: that reply's clock is moved on by it, so message 1
    # is not cut short (ambiguous, then sent again) for time the server never had.
    conn, _ = scripted(OK, OK, OK, withhold=True)

    def slow(index: int, outcome: Any, seconds: float) -> None:
        if index == 0:
            time.sleep(0.4)

    outcomes = conn.send_many(batch(3), budget=0.3, on_outcome=slow)

    assert outcomes == [{}, {}, {}]


def test_a_failing_on_outcome_does_not_break_the_run(scripted: Any) -> None:
    conn, _ = scripted(OK, OK, OK, withhold=True)

    def broken(index: int, outcome: Any, seconds: float) -> None:
        raise ValueError("the caller's bug")

    assert conn.send_many(batch(3), on_outcome=broken) == [{}, {}, {}]
    assert conn.reusable and conn.messages_sent == 3


def test_each_outcome_is_reported_while_the_run_goes_on(scripted: Any) -> None:
    conn, _ = scripted(OK, OK, OK, OK, withhold=True)
    seen: list[tuple[int, int]] = []  # (message, messages accepted so far on the session)

    outcomes = conn.send_many(
        batch(4), on_outcome=lambda index, outcome, _: seen.append((index, conn.messages_sent))
    )

    assert outcomes == [{}, {}, {}, {}]
    # Message 0's reply is read with message 1's envelope; it is reported while message
    # 2's envelope is on its way (before message 1's reply is read), and so on.
    assert seen == [(0, 1), (1, 2), (2, 4), (3, 4)]


def test_proceed_stops_before_the_next_message(scripted: Any) -> None:
    conn, server = scripted(OK, OK, OK)
    asked: list[int] = []

    def proceed() -> bool:
        asked.append(1)
        return len(asked) == 1

    outcomes = conn.send_many(batch(3), proceed=proceed)

    assert outcomes == [{}, None, None]
    assert sum(line.upper().startswith(b"MAIL") for line in server.log) == 1
    assert conn.reusable


@pytest.mark.parametrize("pipelining", [True, False])
@both_paths
def test_aiosmtpd_receives_every_message_once_in_order(smtp_server: Any, pipelining: bool) -> None:
    from robust_mail.providers import ProviderConfig
    from robust_mail.resolver import Resolver
    from robust_mail.transport import SMTPConnection

    server = smtp_server(pipelining=pipelining, refuse_recipients=["r2@example.com"])
    provider = ProviderConfig(name="local", host="127.0.0.1", port=server.port, timeout=5)
    messages = [
        (
            "a@example.com",
            [f"r{i}@example.com", "cc@example.com"],
            f"Subject: {i}\r\nMessage-ID: <{i}@test>\r\n\r\n.leading dot\r\n".encode(),
        )
        for i in range(5)
    ]

    with SMTPConnection(provider, resolver=Resolver()) as conn:
        outcomes = conn.send_many(messages)

    assert outcomes[2] == {
        "r2@example.com": (550, "5.1.1 <r2@example.com>: Recipient address rejected: User unknown")
    }
    assert [o for i, o in enumerate(outcomes) if i != 2] == [{}, {}, {}, {}]
    assert [m.message_id for m in server.messages] == [f"<{i}@test>" for i in range(5)]
    assert all(m.data.endswith(b"\r\n.leading dot\r\n") for m in server.messages)
    assert server.connections_total == 1


# --- through the backend: send_messages() with several messages --------------------------


def _messages(count: int) -> list[Any]:
    from django.core.mail import EmailMessage

    return [
        EmailMessage(f"n{i}", "body", "from@example.com", [f"r{i}@example.com"])
        for i in range(count)
    ]


def _send_all(messages: list[Any]) -> int:
    from django.core import mail

    return mail.get_connection().send_messages(messages)


def _primary_and_backup(
    smtp_server: Any, robust: Any, mode: str, *, pipelining: bool = True, threshold: int = 100
) -> tuple[Any, Any]:
    """A primary in ``mode`` and a healthy backup; the primary's breaker opens only after
    ``threshold`` failures (by default: never in these tests)."""
    from tests.conftest import provider

    primary = smtp_server(mode, pipelining=pipelining)
    backup = smtp_server(pipelining=pipelining)
    robust(
        [provider(primary, "primary"), provider(backup, "backup")],
        CIRCUIT_BREAKER={"FAILURE_THRESHOLD": threshold},
    )
    return primary, backup


@both_paths
def test_a_batch_goes_over_one_verified_tls_session(smtp_server: Any, robust: Any, certs: Any):
    from tests.conftest import provider

    server = smtp_server(tls="starttls", auth={"user": "secret"}, pipelining=True)
    common = {"SSL_CAFILE": certs.ca_file, "HOST": "localhost"}
    robust([provider(server, "tls", USE_TLS=True, USERNAME="user", PASSWORD="secret", **common)])
    messages = _messages(6)

    assert _send_all(messages) == 6

    assert server.connections_total == 1
    assert [m.message_id for m in server.messages] == [
        m.delivery_result.message_id for m in messages
    ]
    assert all(m.tls and m.auth_user == "user" for m in server.messages)
    assert all(m.delivery_result.attempts == 1 for m in messages)


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "sequential"])
@both_paths
def test_each_message_of_a_batch_fails_over_on_its_own(
    smtp_server: Any, robust: Any, pipelining: bool
) -> None:
    from robust_mail.results import DeliveryStatus

    _, backup = _primary_and_backup(smtp_server, robust, "data_451", pipelining=pipelining)
    messages = _messages(4)

    assert _send_all(messages) == 4

    assert sorted(m.message_id for m in backup.messages) == sorted(
        m.delivery_result.message_id for m in messages
    )
    for message in messages:
        result = message.delivery_result
        assert (result.status, result.provider) == (DeliveryStatus.SENT, "backup")
        (error,) = result.errors
        # The chain's attempt counts as the first of the two ATTEMPTS (conftest).
        assert (error.provider, error.step, error.code, error.attempts) == (
            "primary",
            "data_end",
            451,
            2,
        )


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "sequential"])
@both_paths
def test_a_drop_after_the_dot_flags_only_the_messages_the_primary_may_have(
    smtp_server: Any, robust: Any, pipelining: bool, chunking: bool
) -> None:
    primary, backup = _primary_and_backup(
        smtp_server, robust, "disconnect_after_data", pipelining=pipelining
    )
    messages = _messages(3)

    assert _send_all(messages) == 3

    # Each message reached the primary once (it records, then hangs up without a reply),
    # was not sent there again, and went to the backup flagged ambiguous. None is lost.
    # With BDAT the three went out together: the primary took the first and hung up, and
    # the others in flight are in doubt as well (one whose write already failed is retried
    # there on a connection of its own, and so reaches it once).
    ids = sorted(m.delivery_result.message_id for m in messages)
    reached = sorted(m.message_id for m in primary.messages)
    if pipelining and chunking:
        assert messages[0].delivery_result.message_id in reached
        assert len(set(reached)) == len(reached) and set(reached) <= set(ids)
    else:
        assert reached == ids
    assert sorted(m.message_id for m in backup.messages) == ids
    assert all(m.delivery_result.ambiguous for m in messages)
    assert all(m.delivery_result.provider == "backup" for m in messages)


@both_paths
def test_a_stale_pooled_connection_under_a_batch_is_replaced(smtp_server: Any, robust: Any):
    from tests.conftest import provider

    server = smtp_server(pipelining=True)
    robust([provider(server, "only")])
    assert _send_all(_messages(1)) == 1
    server.drop_connections()  # the server hangs up on the idle pooled connection

    messages = _messages(3)
    assert _send_all(messages) == 3

    assert all(m.delivery_result.attempts == 1 for m in messages)
    assert all(m.delivery_result.errors == () for m in messages)
    assert server.connections_total == 2 and len(server.messages) == 4


@both_paths
def test_a_batch_respects_pool_max_messages(smtp_server: Any, robust: Any) -> None:
    from tests.conftest import provider

    server = smtp_server(pipelining=True)
    robust([provider(server, "only")], POOL={"MAX_MESSAGES": 2})
    messages = _messages(5)

    assert _send_all(messages) == 5

    # Two per session at most: the run stops at two, the pool retires that connection,
    # and the other three go on alone, two on the next connection and one on a third.
    assert len(server.messages) == 5
    assert server.connections_total == 3
    assert all(m.delivery_result.attempts == 1 for m in messages)


@both_paths
def test_once_the_breaker_opens_mid_run_the_rest_fail_over_without_retrying(
    smtp_server: Any, robust: Any
) -> None:
    _, backup = _primary_and_backup(smtp_server, robust, "data_451", threshold=1)
    messages = _messages(4)

    assert _send_all(messages) == 4

    # Every first attempt went out in the run while the breaker was closed. The first
    # message's retry (ATTEMPTS=2) failed too and opened the breaker: the others, as lone
    # messages would, then skip the primary instead of retrying it.
    attempts = [m.delivery_result.errors[0].attempts for m in messages]
    assert attempts == [2, 1, 1, 1]
    assert all(m.delivery_result.provider == "backup" for m in messages)
    assert len(backup.messages) == 4


def test_recipients_put_off_with_452_get_their_own_transaction_in_a_run(scripted: Any) -> None:
    conn, server = scripted(
        (["250 sender ok", "250 ok", "452 4.5.3 too many recipients", "354 go"], "250 queued"),
        (["250 sender ok", "250 ok", "354 go"], "250 queued"),  # the one put off, again
        OK,
    )
    messages = [
        ("a@example.com", ["r0@example.com", "late@example.com"], MESSAGE),
        ("a@example.com", ["r1@example.com"], MESSAGE),
    ]

    outcomes = conn.send_many(messages)

    assert outcomes == [{}, {}]
    rcpts = [line for line in server.log if line[:4].upper() == b"RCPT"]
    assert rcpts[2].lower() == b"rcpt to:<late@example.com>\r\n"
    assert conn.messages_sent == 3


def test_a_drop_while_the_owed_reply_is_read_is_not_the_next_message_s_deadline(
    scripted: Any,
) -> None:
    # Each final reply takes 0.8 s, over the 0.5 s budget: message 0 is cut by its own
    # deadline (ambiguous). Message 1's budget never started: its failure is a plain
    # transient one at MAIL, retried like any other, not "out of time".
    from robust_mail.transport import cut_by_deadline

    conn, _ = scripted(OK, OK, OK, pause=0.8)

    outcomes = conn.send_many(batch(3), budget=0.5)

    cut, next_one = outcomes[0], outcomes[1]
    assert isinstance(cut, TransportError) and isinstance(next_one, TransportError)
    assert (cut.step, classify(cut)) == (Step.DATA_END, Classification.AMBIGUOUS)
    assert cut_by_deadline(cut)
    assert (next_one.step, classify(next_one)) == (Step.MAIL, Classification.TRANSIENT)
    assert not cut_by_deadline(next_one)
    assert outcomes[2] is None


@both_paths
def test_a_failed_message_of_a_slow_run_keeps_its_own_time_to_fail_over(
    smtp_server: Any, robust: Any
) -> None:
    # The primary answers each final dot after 0.4 s and refuses the first message's with
    # a 451; the run of four takes longer than the 1 s DEADLINE. The refused message is
    # charged only its own attempt, so it still fails over to the backup in time.
    from tests.conftest import provider
    from tests.scripted_smtp import ScriptedServer

    primary = ScriptedServer([(OK[0], "451 4.3.0 try later"), OK, OK, OK], pause=0.4)
    backup = smtp_server()
    try:
        robust(
            [
                {"NAME": "primary", "HOST": "127.0.0.1", "PORT": primary.port, "TIMEOUT": 2},
                provider(backup, "backup"),
            ],
            RETRY={"ATTEMPTS": 1, "BACKOFF": 0.0, "MAX_BACKOFF": 0.0, "DEADLINE": 1.0},
        )
        messages = _messages(4)

        assert _send_all(messages) == 4
    finally:
        from robust_mail.pool import pools

        pools.close_all()
        primary.close()

    assert [m.delivery_result.provider for m in messages] == [
        "backup",
        "primary",
        "primary",
        "primary",
    ]
    assert [m.message["Subject"] for m in backup.messages] == ["n0"]


@both_paths
def test_a_stale_connection_is_replaced_also_after_a_message_refused_before_traffic(
    smtp_server: Any, robust: Any
) -> None:
    # The server announces a 5,000-byte SIZE limit. The first message of the run is too
    # big (refused by us, nothing sent); the second finds that the server closed the
    # pooled connection while idle. The run goes again on a fresh connection, as a lone
    # message would, instead of counting that as the second message's failed attempt.
    from django.core import mail
    from django.core.mail import EmailMessage

    from tests.conftest import provider

    server = smtp_server(pipelining=True, size_limit=5000)
    robust(
        [provider(server, "only")],
        RETRY={"ATTEMPTS": 1, "BACKOFF": 0.0, "MAX_BACKOFF": 0.0, "DEADLINE": 20.0},
    )
    assert _send_all(_messages(1)) == 1
    server.drop_connections()  # the server hangs up on the idle pooled connection
    big = EmailMessage("big", "x" * 8000, "from@example.com", ["big@example.com"])
    small = _messages(2)

    sent = mail.get_connection(fail_silently=True).send_messages([big, *small])

    assert sent == 2
    assert big.delivery_result.status.value == "failed"
    assert all(m.delivery_result.attempts == 1 for m in small)
    assert all(m.delivery_result.errors == () for m in small)
    assert len(server.messages) == 3


@both_paths
def test_once_proceed_says_stop_a_message_tried_in_the_run_is_neither_retried_nor_failed_over(
    smtp_server: Any, robust: Any
) -> None:
    # The outbox worker asks proceed() for its lease: a retry or a failover after the lease
    # ran low could still be sending when another worker has taken the message over.
    from robust_mail.conf import get_config
    from robust_mail.dispatch import Dispatcher
    from robust_mail.results import DeliveryStatus

    _, backup = _primary_and_backup(smtp_server, robust, "data_451")
    messages = _messages(3)
    asked: list[bool] = []

    def proceed() -> bool:
        # Yes for the first three questions: the run's first attempts (with BDAT it also
        # asks after making room, so fewer go out; those are reported not attempted).
        asked.append(True)
        return len(asked) <= 3

    results = Dispatcher(get_config()).deliver_many([(m, None) for m in messages], proceed=proceed)

    assert backup.messages == []
    tried = [result for result in results if result is not None]
    assert tried
    for result in tried:
        assert not isinstance(result, Exception)
        assert result.status is DeliveryStatus.DEFERRED
        assert [(e.provider, e.code, e.attempts) for e in result.errors][:1] == [
            ("primary", 451, 1)
        ]
        (skipped,) = result.errors[1:]
        assert skipped.provider == "backup" and "the sender stopped" in skipped.message
