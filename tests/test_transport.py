"""SMTPConnection against real SMTP (and DNS) servers on 127.0.0.1: steps, TLS, failures."""

from __future__ import annotations

import dataclasses
import email.policy
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from typing import Any

import pytest

from robust_mail.exceptions import (
    Classification,
    InvalidMessage,
    ResolutionError,
    StartTLSUnavailable,
    Step,
    TransportError,
    classify,
)
from robust_mail.providers import ProviderConfig
from robust_mail.resolver import Resolver
from robust_mail.testing import Mode, SMTPTestServer, TestCertificates
from robust_mail.testing.dns import DNSTestServer
from robust_mail.transport import SMTPConnection, clear_tls_contexts, tls_context
from tests.conftest import secret_forms
from tests.forking import in_child

SENDER = "sender@example.com"
GOOD = "good@example.com"
BAD = "bad@example.com"

StartServer = Callable[..., SMTPTestServer]
Connect = Callable[..., SMTPConnection]


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificates() -> Iterator[TestCertificates]:
    """A CA and server certificates for localhost, 127.0.0.1 and mail.test."""
    with TestCertificates() as certs:
        yield certs


@pytest.fixture(params=[False, True], ids=["sequential", "pipelined"])
def start_server(
    certificates: TestCertificates, request: pytest.FixtureRequest
) -> Iterator[StartServer]:
    started: list[SMTPTestServer] = []

    def start(mode: Mode | str = Mode.ACCEPT, **kwargs: Any) -> SMTPTestServer:
        if kwargs.get("tls"):
            kwargs.setdefault("certificates", certificates)
        # Every scenario twice: the envelope sent command by command, and pipelined.
        kwargs.setdefault("pipelining", request.param)
        server = SMTPTestServer(mode, **kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def connect() -> Iterator[Connect]:
    """Build SMTPConnections that are closed after the test, whatever happened."""
    made: list[SMTPConnection] = []

    def make(provider: ProviderConfig, resolver: Resolver | None = None) -> SMTPConnection:
        conn = SMTPConnection(
            provider, resolver=resolver or Resolver(), local_hostname="client.test"
        )
        made.append(conn)
        return conn

    yield make
    for conn in made:
        conn.close()


@pytest.fixture
def dns_server() -> Iterator[DNSTestServer]:
    records = {
        "mail.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
        "other.test": {"A": ["127.0.0.1"]},
    }
    with DNSTestServer(records) as server:
        yield server


def dns_resolver(server: DNSTestServer) -> Resolver:
    return Resolver(nameservers=["127.0.0.1"], port=server.port, timeout=1.0)


def provider_for(server: SMTPTestServer, **overrides: Any) -> ProviderConfig:
    fields: dict[str, Any] = {
        "name": "test",
        "host": "127.0.0.1",
        "port": server.port,
        "timeout": 2.0,
        "use_tls": server.tls == "starttls",
        "use_ssl": server.tls == "implicit",
        "ssl_cafile": server.certificates.ca_file if server.certificates else None,
    }
    fields.update(overrides)
    return ProviderConfig(**fields)


def message(body: str = "Hello from robust_mail.\n", **headers: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = GOOD
    msg["Subject"] = "transport test"
    msg["Message-ID"] = "<transport-test@example.com>"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(body)
    return msg.as_bytes(policy=email.policy.SMTP)


def failure(call: Callable[[], object]) -> TransportError:
    with pytest.raises(TransportError) as info:
        call()
    return info.value


# --- sending -----------------------------------------------------------------------------


def test_plain_send_delivers_the_message(start_server: StartServer, connect: Connect) -> None:
    server = start_server()
    conn = connect(provider_for(server))
    assert conn.open() is True
    assert conn.send(SENDER, [GOOD], message()) == {}
    (received,) = server.messages
    assert received.mail_from == SENDER
    assert received.rcpt_tos == [GOOD]
    assert received.message_id == "<transport-test@example.com>"
    assert received.tls is False
    assert conn.messages_sent == 1
    assert conn.reusable and conn.is_open


def test_open_twice_returns_false_and_keeps_one_connection(
    start_server: StartServer, connect: Connect
) -> None:
    server = start_server()
    conn = connect(provider_for(server))
    assert conn.open() is True
    assert conn.open() is False
    assert server.connections_total == 1


def test_many_messages_share_one_connection(start_server: StartServer, connect: Connect) -> None:
    server = start_server()
    with connect(provider_for(server)) as conn:
        for _ in range(3):
            conn.send(SENDER, [GOOD], message())
        assert conn.messages_sent == 3
    assert len(server.messages) == 3
    assert server.connections_total == 1


def test_lines_starting_with_a_dot_arrive_unchanged(
    start_server: StartServer, connect: Connect
) -> None:
    server = start_server()
    body = ".\r\n..two dots\r\n.one dot\r\nlast line without newline"
    raw = b"Subject: dots\r\n\r\n" + body.encode()
    with connect(provider_for(server)) as conn:
        conn.send(SENDER, [GOOD], raw)
    assert server.messages[0].data.rstrip(b"\r\n") == raw


def test_bare_newlines_are_sent_as_crlf(start_server: StartServer, connect: Connect) -> None:
    server = start_server()
    with connect(provider_for(server)) as conn:
        conn.send(SENDER, [GOOD], b"Subject: lf\n\nline one\nline two\n")
    assert server.messages[0].data == b"Subject: lf\r\n\r\nline one\r\nline two\r\n"


def test_a_20_mb_message_goes_through(start_server: StartServer, connect: Connect) -> None:
    server = start_server()
    line = b"0123456789" * 7 + b"abcdef\r\n"
    raw = b"Subject: big\r\n\r\n" + line * (20 * 1024 * 1024 // len(line) + 1)
    assert len(raw) > 20 * 1024 * 1024
    with connect(provider_for(server, timeout=10.0)) as conn:
        assert conn.send(SENDER, [GOOD], raw) == {}
    assert server.messages[0].data == raw


def test_non_ascii_addresses_use_smtputf8(start_server: StartServer, connect: Connect) -> None:
    server = start_server()
    with connect(provider_for(server)) as conn:
        conn.send("jürgen@example.com", ["zoë@example.com"], message())
        # SMTPUTF8 lasts one transaction: an ASCII message afterwards is plain again.
        conn.send(SENDER, [GOOD], message())
    first, second = server.messages
    assert first.mail_from == "jürgen@example.com"
    assert first.rcpt_tos == ["zoë@example.com"]
    assert second.rcpt_tos == [GOOD]


@pytest.mark.parametrize(
    ("from_addr", "recipients", "step"),
    [
        (SENDER, [], Step.RCPT),
        ("a@example.com\r\nRCPT TO:<x@evil.test>", [GOOD], Step.MAIL),
        (SENDER, ["x@example.com>\r\nDATA"], Step.RCPT),
    ],
    ids=["no recipients", "line break in sender", "line break in recipient"],
)
def test_unsendable_envelope_fails_before_any_traffic(
    start_server: StartServer,
    connect: Connect,
    from_addr: str,
    recipients: list[str],
    step: Step,
) -> None:
    server = start_server()
    conn = connect(provider_for(server))
    conn.open()
    error = failure(lambda: conn.send(from_addr, recipients, message()))
    assert error.step is step
    assert isinstance(error.cause, InvalidMessage)
    assert classify(error) is Classification.MESSAGE_FATAL
    assert conn.reusable and conn.is_open
    conn.send(SENDER, [GOOD], message())
    assert [m.rcpt_tos for m in server.messages] == [[GOOD]]


def test_send_on_a_closed_connection_is_a_transient_failure(
    start_server: StartServer, connect: Connect
) -> None:
    server = start_server()
    conn = connect(provider_for(server))
    error = failure(lambda: conn.send(SENDER, [GOOD], message()))
    assert classify(error) is Classification.TRANSIENT


# --- TLS ---------------------------------------------------------------------------------


def test_starttls_verifies_the_certificate_against_the_host_name(
    start_server: StartServer, connect: Connect
) -> None:
    server = start_server(tls="starttls")
    with connect(provider_for(server, host="localhost")) as conn:
        assert conn.tls is True
        conn.send(SENDER, [GOOD], message())
    assert server.messages[0].tls is True


def test_implicit_tls_delivers(start_server: StartServer, connect: Connect) -> None:
    server = start_server(tls="implicit")
    with connect(provider_for(server, host="localhost")) as conn:
        conn.send(SENDER, [GOOD], message())
    assert server.messages[0].tls is True


def test_missing_starttls_is_provider_fatal_and_nothing_is_sent_in_plain_text(
    start_server: StartServer, connect: Connect
) -> None:
    server = start_server(Mode.NO_STARTTLS, tls="starttls")
    conn = connect(provider_for(server, host="localhost"))
    error = failure(conn.open)
    assert error.step is Step.STARTTLS
    assert isinstance(error.cause, StartTLSUnavailable)
    assert classify(error) is Classification.PROVIDER_FATAL
    assert not conn.is_open
    assert server.messages == []


@pytest.mark.parametrize(("tls", "step"), [("starttls", Step.STARTTLS), ("implicit", Step.CONNECT)])
def test_untrusted_certificate_is_provider_fatal(
    start_server: StartServer, connect: Connect, tls: str, step: Step
) -> None:
    server = start_server(Mode.UNTRUSTED_CERT, tls=tls)
    conn = connect(provider_for(server, host="localhost"))
    error = failure(conn.open)
    assert error.step is step
    assert "certificate verify failed" in str(error.cause)
    assert classify(error) is Classification.PROVIDER_FATAL
    assert not conn.is_open
    assert server.messages == []


def test_system_cas_alone_do_not_trust_a_private_ca(
    start_server: StartServer, connect: Connect
) -> None:
    server = start_server(tls="starttls")
    conn = connect(provider_for(server, host="localhost", ssl_cafile=None))
    error = failure(conn.open)
    assert classify(error) is Classification.PROVIDER_FATAL


def test_missing_ca_file_is_provider_fatal(start_server: StartServer, connect: Connect) -> None:
    server = start_server(tls="starttls")
    conn = connect(provider_for(server, ssl_cafile="/nonexistent/ca.pem"))
    error = failure(conn.open)
    assert error.step is Step.STARTTLS
    assert classify(error) is Classification.PROVIDER_FATAL
    assert server.connections_total == 0


def test_tls_context_is_built_once_per_certificate_files(
    certificates: TestCertificates,
) -> None:
    first = ProviderConfig(name="a", ssl_cafile=certificates.ca_file)
    second = dataclasses.replace(first, name="b", host="elsewhere.test", port=465)
    assert tls_context(first) is tls_context(second)
    assert tls_context(first) is not tls_context(ProviderConfig(name="c"))
    context = tls_context(first)
    assert context.check_hostname is True
    assert context.minimum_version >= context.minimum_version.TLSv1_2


def test_threads_connecting_at_once_build_one_tls_context(
    certificates: TestCertificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker's threads open their first connections together; loading the CA bundle
    # costs tens of milliseconds of CPU each time, so it must happen once, not per thread.
    import robust_mail.tls as tls

    builds: list[object] = []
    real_build = tls._build

    def counting_build(*key: Any) -> Any:
        builds.append(key)
        time.sleep(0.05)  # widen the window in which the other threads arrive
        return real_build(*key)

    monkeypatch.setattr(tls, "_build", counting_build)
    clear_tls_contexts()
    provider = ProviderConfig(name="a", ssl_cafile=certificates.ca_file)
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(tls_context(provider))) for _ in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    finally:
        clear_tls_contexts()
    assert len(got) == 4 and all(context is got[0] for context in got)
    assert len(builds) == 1


@pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(os, "mkfifo"), reason="POSIX only")
def test_forked_child_makes_tls_contexts_while_the_parent_is_still_building_one(
    certificates: TestCertificates, tmp_path: Any
) -> None:
    # Another thread of the parent is in the middle of loading a CA file (a FIFO nobody
    # has written yet) when the process forks. The child must not wait for it.
    fifo = str(tmp_path / "ca.pem")
    os.mkfifo(fifo)
    clear_tls_contexts()
    building = threading.Thread(
        target=tls_context, args=(ProviderConfig(name="slow", ssl_cafile=fifo),)
    )
    building.start()
    writer = _open_when_read(fifo)  # the builder is now blocked reading the CA file
    try:
        status = in_child(
            lambda: tls_context(ProviderConfig(name="child", ssl_cafile=certificates.ca_file))
        )
    finally:
        with open(certificates.ca_file, "rb") as pem:
            os.write(writer, pem.read())
        os.close(writer)
        building.join(10)
        clear_tls_contexts()

    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only")
def test_forked_child_builds_the_tls_context_the_parent_is_still_building(
    certificates: TestCertificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same certificate files: at fork() a thread of the parent holds the lock for
    # them, building. The child's copy of that lock would stay held for ever; the child
    # must start with fresh locks and build its own context.
    import robust_mail.tls as tls

    parent, release = os.getpid(), threading.Event()
    real_build = tls._build

    def build(*key: Any) -> Any:
        if os.getpid() == parent:
            release.wait(10)
        return real_build(*key)

    monkeypatch.setattr(tls, "_build", build)
    clear_tls_contexts()
    provider = ProviderConfig(name="same", ssl_cafile=certificates.ca_file)
    building = threading.Thread(target=tls_context, args=(provider,))
    building.start()
    try:
        for _ in range(200):  # until the builder holds the lock
            if tls._building.get((certificates.ca_file, None, None), threading.Lock()).locked():
                break
            time.sleep(0.005)
        status = in_child(lambda: tls_context(provider))
    finally:
        release.set()
        building.join(10)
        clear_tls_contexts()

    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _open_when_read(fifo: str) -> int:
    """Open ``fifo`` for writing as soon as someone has it open for reading."""
    for _ in range(2000):
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            time.sleep(0.005)
    raise AssertionError("nobody opened the FIFO")


# --- authentication ----------------------------------------------------------------------


def test_auth_with_good_credentials(start_server: StartServer, connect: Connect) -> None:
    server = start_server(tls="starttls", auth={"alice": "s3cret"})
    provider = provider_for(server, host="localhost", username="alice", password="s3cret")
    with connect(provider) as conn:
        conn.send(SENDER, [GOOD], message())
    assert server.messages[0].auth_user == "alice"


def test_auth_535_fails_at_the_auth_step_and_is_provider_fatal(
    start_server: StartServer, connect: Connect
) -> None:
    server = start_server(Mode.AUTH_535)
    conn = connect(provider_for(server, username="alice", password="wrong"))
    error = failure(conn.open)
    assert error.step is Step.AUTH
    assert error.code == 535
    assert classify(error) is Classification.PROVIDER_FATAL
    assert not conn.is_open


def test_username_without_auth_offered_is_provider_fatal(
    start_server: StartServer, connect: Connect
) -> None:
    server = start_server()
    conn = connect(provider_for(server, username="alice", password="pw"))
    error = failure(conn.open)
    assert error.step is Step.AUTH
    assert classify(error) is Classification.PROVIDER_FATAL


# --- connection failures -----------------------------------------------------------------


def test_connection_refused_is_transient_at_connect(
    start_server: StartServer, connect: Connect
) -> None:
    server = start_server(Mode.REFUSE)
    error = failure(connect(provider_for(server)).open)
    assert error.step is Step.CONNECT
    assert isinstance(error.cause, ConnectionRefusedError)
    assert classify(error) is Classification.TRANSIENT


def test_blackhole_is_bounded_by_the_timeout_and_transient(
    start_server: StartServer, connect: Connect
) -> None:
    server = start_server(Mode.BLACKHOLE)
    conn = connect(provider_for(server, timeout=0.3))
    error = failure(conn.open)
    assert error.step is Step.GREETING
    assert classify(error) is Classification.TRANSIENT
    assert not conn.is_open


def test_greeting_421_is_transient(start_server: StartServer, connect: Connect) -> None:
    server = start_server(Mode.GREETING_421)
    error = failure(connect(provider_for(server)).open)
    assert error.step is Step.GREETING
    assert error.code == 421
    assert classify(error) is Classification.TRANSIENT


def test_unknown_host_fails_at_resolve(dns_server: DNSTestServer, connect: Connect) -> None:
    provider = ProviderConfig(name="dns", host="nowhere.test", port=1, timeout=1.0)
    error = failure(connect(provider, dns_resolver(dns_server)).open)
    assert error.step is Step.RESOLVE
    assert isinstance(error.cause, ResolutionError)


def test_every_address_is_tried_in_turn(
    start_server: StartServer, connect: Connect, dns_server: DNSTestServer
) -> None:
    # Without IPv4 forcing the AAAA answer (::1) comes first; nothing listens there.
    server = start_server()
    provider = provider_for(server, host="mail.test", force_ipv4=False)
    with connect(provider, dns_resolver(dns_server)) as conn:
        assert conn.address == "127.0.0.1"
        conn.send(SENDER, [GOOD], message())
    assert ("mail.test", "AAAA") in dns_server.queries


def test_when_every_address_fails_the_error_names_each(
    start_server: StartServer, connect: Connect, dns_server: DNSTestServer
) -> None:
    server = start_server(Mode.REFUSE)
    provider = provider_for(server, host="mail.test", force_ipv4=False)
    error = failure(connect(provider, dns_resolver(dns_server)).open)
    assert error.step is Step.CONNECT
    assert "::1" in str(error) and "127.0.0.1" in str(error)
    assert classify(error) is Classification.TRANSIENT


# --- IPv4 forcing and host name verification --------------------------------------------


def test_forced_ipv4_connects_over_ipv4_and_verifies_the_configured_name(
    start_server: StartServer, connect: Connect, dns_server: DNSTestServer
) -> None:
    server = start_server(tls="starttls")
    provider = provider_for(server, host="mail.test", force_ipv4=True)
    with connect(provider, dns_resolver(dns_server)) as conn:
        assert conn.address == "127.0.0.1"
        assert conn.tls is True
        conn.send(SENDER, [GOOD], message())
    assert server.messages[0].tls is True
    assert dns_server.queries == [("mail.test", "A")]


def test_certificate_for_another_name_fails_even_though_the_address_connects(
    start_server: StartServer, connect: Connect, dns_server: DNSTestServer
) -> None:
    # other.test resolves to the server's address, but its certificate does not name it.
    server = start_server(tls="starttls")
    provider = provider_for(server, host="other.test")
    conn = connect(provider, dns_resolver(dns_server))
    error = failure(conn.open)
    assert error.step is Step.STARTTLS
    assert "other.test" in str(error.cause)
    assert classify(error) is Classification.PROVIDER_FATAL
    assert server.messages == []


# --- failures during the transaction -------------------------------------------------------


def test_451_at_data_end_is_transient_and_the_connection_stays_reusable(
    start_server: StartServer, connect: Connect
) -> None:
    server = start_server(Mode.DATA_451)
    conn = connect(provider_for(server))
    conn.open()
    error = failure(lambda: conn.send(SENDER, [GOOD], message()))
    assert error.step is Step.DATA_END
    assert error.code == 451
    assert classify(error) is Classification.TRANSIENT
    assert conn.reusable and conn.is_open
    server.mode = Mode.ACCEPT
    conn.send(SENDER, [GOOD], message())
    assert len(server.messages) == 1
    assert server.connections_total == 1


def test_421_at_mail_is_transient_and_closes_the_connection(
    start_server: StartServer, connect: Connect
) -> None:
    server = start_server(Mode.MAIL_421)
    conn = connect(provider_for(server))
    conn.open()
    error = failure(lambda: conn.send(SENDER, [GOOD], message()))
    assert error.step is Step.MAIL
    assert classify(error) is Classification.TRANSIENT
    assert not conn.reusable and not conn.is_open


def test_drop_mid_data_fails_at_data_and_is_transient(
    start_server: StartServer, connect: Connect
) -> None:
    server = start_server(Mode.DROP_MID_DATA)
    conn = connect(provider_for(server))
    conn.open()
    error = failure(lambda: conn.send(SENDER, [GOOD], message()))
    assert error.step is Step.DATA
    assert classify(error) is Classification.TRANSIENT
    assert not conn.reusable and not conn.is_open


def test_disconnect_after_data_is_ambiguous(start_server: StartServer, connect: Connect) -> None:
    server = start_server(Mode.DISCONNECT_AFTER_DATA)
    conn = connect(provider_for(server))
    conn.open()
    error = failure(lambda: conn.send(SENDER, [GOOD], message()))
    assert error.step is Step.DATA_END
    assert classify(error) is Classification.AMBIGUOUS
    assert not conn.reusable and not conn.is_open
    assert len(server.messages) == 1  # the server did get it


def test_no_reply_after_the_final_dot_is_ambiguous_and_bounded(
    start_server: StartServer, connect: Connect
) -> None:
    server = start_server(Mode.STALL_AFTER_DATA)
    conn = connect(provider_for(server, timeout=0.3))
    conn.open()
    error = failure(lambda: conn.send(SENDER, [GOOD], message()))
    assert error.step is Step.DATA_END
    assert classify(error) is Classification.AMBIGUOUS
    assert not conn.is_open


def test_partial_refusal_returns_the_refused_and_delivers_to_the_rest(
    start_server: StartServer, connect: Connect
) -> None:
    server = start_server(refuse_recipients=[BAD])
    with connect(provider_for(server)) as conn:
        refused = conn.send(SENDER, [GOOD, BAD], message())
    assert list(refused) == [BAD]
    code, reply = refused[BAD]
    assert code == 550
    assert "5.1.1" in reply
    assert server.messages[0].rcpt_tos == [GOOD]


def test_all_recipients_refused_raises_with_each_refusal_and_rset_keeps_the_connection(
    start_server: StartServer, connect: Connect
) -> None:
    server = start_server(Mode.RCPT_550)
    conn = connect(provider_for(server))
    conn.open()
    error = failure(lambda: conn.send(SENDER, [GOOD, BAD], message()))
    assert error.step is Step.RCPT
    assert set(error.refused) == {GOOD, BAD}
    assert classify(error) is Classification.MESSAGE_FATAL
    assert conn.reusable and conn.is_open
    server.mode = Mode.ACCEPT
    assert conn.send(SENDER, [GOOD], message()) == {}
    assert server.messages[0].rcpt_tos == [GOOD]
    assert server.connections_total == 1


# --- session upkeep ----------------------------------------------------------------------


def test_noop_reports_a_live_connection(start_server: StartServer, connect: Connect) -> None:
    server = start_server()
    conn = connect(provider_for(server))
    conn.open()
    assert conn.noop() is True


def test_noop_on_a_dropped_connection_returns_false_and_closes(
    start_server: StartServer, connect: Connect
) -> None:
    server = start_server()
    conn = connect(provider_for(server))
    conn.open()
    server.drop_connections()
    assert conn.noop() is False
    assert not conn.is_open
    conn.close()  # closing again is harmless


def test_close_tolerates_a_dead_socket(start_server: StartServer, connect: Connect) -> None:
    server = start_server()
    conn = connect(provider_for(server))
    conn.open()
    server.drop_connections()
    conn.close()
    assert not conn.is_open
    assert not conn.reusable


def test_detach_closes_without_a_word_to_the_server(connect: Connect) -> None:
    heard: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            conn, _ = listener.accept()
            with conn, conn.makefile("rb") as lines:
                conn.sendall(b"220 test\r\n")
                for line in lines:  # until the client closes the connection
                    heard.append(line)
                    conn.sendall(b"250 test\r\n")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        conn = connect(ProviderConfig(name="t", host="127.0.0.1", port=listener.getsockname()[1]))
        conn.open()
        conn.detach()
        thread.join(5)

    assert not thread.is_alive()  # the server saw the connection end
    assert [line.split()[0].upper() for line in heard] == [b"EHLO"]  # no QUIT, no RSET
    assert not conn.is_open and not conn.reusable
    conn.detach()  # twice is harmless


def test_reset_keeps_the_session_usable(start_server: StartServer, connect: Connect) -> None:
    server = start_server()
    conn = connect(provider_for(server))
    conn.open()
    conn.reset()
    conn.send(SENDER, [GOOD], message())
    assert len(server.messages) == 1


def test_timestamps_are_monotonic(start_server: StartServer, connect: Connect) -> None:
    server = start_server()
    conn = connect(provider_for(server))
    conn.open()
    opened_at = conn.opened_at
    assert opened_at is not None
    conn.send(SENDER, [GOOD], message())
    # Later than the open (a send takes far longer than the monotonic clock's resolution).
    assert conn.last_used is not None and conn.last_used > opened_at


def test_logs_name_steps_but_never_the_password_or_the_body(
    start_server: StartServer, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_server(auth={"alice": "pa55-word-xyz"})
    provider = provider_for(server, username="alice", password="pa55-word-xyz")
    caplog.set_level(logging.DEBUG, logger="robust_mail.transport")
    with connect(provider) as conn:
        conn.send(SENDER, [GOOD], message(body="BODY-MARKER-123\n"))
    assert "auth ok" in caplog.text
    assert "data_end ok" in caplog.text
    for leaked in secret_forms("alice", "pa55-word-xyz"):
        assert leaked not in caplog.text
    assert "BODY-MARKER-123" not in caplog.text
    assert "pa55-word-xyz" not in repr(provider)
