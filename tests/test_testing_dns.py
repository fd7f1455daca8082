"""The DNS test server stays up whatever it is asked, and refuses bad records early."""

from __future__ import annotations

import dns.message
import dns.query
import dns.rcode
import dns.rdataclass
import pytest

from robust_mail.testing.dns import DNSTestServer

RECORDS = {"mail.test": {"A": ["127.0.0.1"]}}


def ask(server: DNSTestServer, query: dns.message.Message) -> dns.message.Message:
    return dns.query.udp(query, server.host, port=server.port, timeout=2)


def test_a_question_of_another_class_is_refused_and_the_server_keeps_answering() -> None:
    # A CH question used to kill the server thread: every later query timed out.
    with DNSTestServer(RECORDS) as server:
        chaos = dns.message.make_query("mail.test", "A", rdclass=dns.rdataclass.CH)
        assert ask(server, chaos).rcode() == dns.rcode.REFUSED
        answer = ask(server, dns.message.make_query("mail.test", "A"))
    assert [rrset.to_text() for rrset in answer.answer] == ["mail.test. 60 IN A 127.0.0.1"]


@pytest.mark.parametrize("records", [{"mail.test": {"A": ["::1"]}}, {"mail.test": {"NOPE": ["x"]}}])
def test_a_record_its_type_cannot_hold_is_refused_when_the_server_is_made(
    records: dict[str, dict[str, list[str]]],
) -> None:
    with pytest.raises(ValueError, match=r"bad DNS record mail\.test"):
        DNSTestServer(records)


def test_an_error_while_answering_is_a_servfail_and_the_server_keeps_answering(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with DNSTestServer(RECORDS) as server:
        server.records["broken.test"] = {"A": ["not an address"]}  # past the check
        failed = ask(server, dns.message.make_query("broken.test", "A"))
        assert failed.rcode() == dns.rcode.SERVFAIL
        assert ask(server, dns.message.make_query("mail.test", "A")).answer
    assert "DNS test server failed to answer" in caplog.text
