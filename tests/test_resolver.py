"""Resolver behaviour against a real DNS server on 127.0.0.1 (robust_mail.testing.dns)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from robust_mail.exceptions import Classification, DeadlineReached, ResolutionError, classify
from robust_mail.resolver import Resolver
from robust_mail.testing.dns import DNSTestServer

RECORDS = {
    "mail.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
    "v4only.test": {"A": ["127.0.0.2", "127.0.0.3"]},
    "v6only.test": {"AAAA": ["::1"]},
}

# Short enough to keep the "resolver down" tests quick, long enough for loopback UDP.
DOWN_TIMEOUT = 0.3


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dns_server() -> Iterator[DNSTestServer]:
    with DNSTestServer(RECORDS) as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def resolver(dns_server: DNSTestServer, clock: FakeClock) -> Resolver:
    return Resolver(
        nameservers=["127.0.0.1"],
        port=dns_server.port,
        timeout=DOWN_TIMEOUT,
        stale_ttl=600.0,
        clock=clock,
    )


# --- answers ------------------------------------------------------------------------------


def test_ipv4_only_asks_only_for_a_records_even_when_aaaa_exists(resolver, dns_server):
    assert resolver.resolve("mail.test", ipv4_only=True) == ["127.0.0.1"]
    assert dns_server.queries == [("mail.test", "A")]


def test_without_ipv4_only_asks_aaaa_then_a_and_returns_ipv6_first(resolver, dns_server):
    assert resolver.resolve("mail.test", ipv4_only=False) == ["::1", "127.0.0.1"]
    assert dns_server.queries == [("mail.test", "AAAA"), ("mail.test", "A")]


def test_every_a_record_is_returned(resolver):
    # DNS does not order the records of one set; only the family order is ours.
    assert sorted(resolver.resolve("v4only.test", ipv4_only=True)) == ["127.0.0.2", "127.0.0.3"]


def test_one_family_answering_is_enough_without_ipv4_only(resolver):
    assert sorted(resolver.resolve("v4only.test", ipv4_only=False)) == ["127.0.0.2", "127.0.0.3"]
    assert resolver.resolve("v6only.test", ipv4_only=False) == ["::1"]


def test_names_match_case_insensitively_with_optional_trailing_dot(resolver):
    assert resolver.resolve("MAIL.Test.", ipv4_only=True) == ["127.0.0.1"]


# --- no DNS needed ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "ipv4_only", "expected"),
    [
        ("192.0.2.10", True, ["192.0.2.10"]),
        ("192.0.2.10", False, ["192.0.2.10"]),
        ("::1", False, ["::1"]),
        ("[2001:db8::1]", False, ["2001:db8::1"]),
    ],
)
def test_ip_literals_are_returned_without_a_query(resolver, dns_server, host, ipv4_only, expected):
    assert resolver.resolve(host, ipv4_only=ipv4_only) == expected
    assert dns_server.queries == []


def test_ipv6_literal_with_ipv4_forced_is_a_permanent_error(resolver, dns_server):
    with pytest.raises(ResolutionError) as info:
        resolver.resolve("::1", ipv4_only=True)
    assert info.value.permanent
    assert dns_server.queries == []


def test_localhost_is_answered_without_a_query(resolver, dns_server):
    addresses = resolver.resolve("localhost", ipv4_only=True)
    assert "127.0.0.1" in addresses
    assert all(":" not in a for a in addresses)
    assert dns_server.queries == []


def test_localhost_works_when_the_hosts_file_lacks_it(dns_server, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# nothing about localhost here\n")
    resolver = Resolver(["127.0.0.1"], port=dns_server.port, hosts_file=str(hosts))
    assert resolver.resolve("localhost", ipv4_only=True) == ["127.0.0.1"]
    assert resolver.resolve("localhost", ipv4_only=False) == ["::1", "127.0.0.1"]
    assert dns_server.queries == []


def test_localhost_works_without_a_hosts_file(dns_server, tmp_path):
    resolver = Resolver(["127.0.0.1"], port=dns_server.port, hosts_file=str(tmp_path / "none"))
    assert resolver.resolve("localhost", ipv4_only=True) == ["127.0.0.1"]
    assert dns_server.queries == []


def test_hosts_file_names_win_over_dns_and_respect_ipv4_only(dns_server, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text(
        "127.0.0.1  localhost\n"
        "127.0.0.9  Mail.Test relay  # comment\n"
        "::9        mail.test\n"
        "not-an-ip  broken.test\n"
    )
    resolver = Resolver(["127.0.0.1"], port=dns_server.port, hosts_file=str(hosts))
    assert resolver.resolve("mail.test", ipv4_only=True) == ["127.0.0.9"]
    assert resolver.resolve("mail.test", ipv4_only=False) == ["::9", "127.0.0.9"]
    assert resolver.resolve("RELAY", ipv4_only=True) == ["127.0.0.9"]
    assert dns_server.queries == []


def test_hosts_file_is_reread_when_it_changes(dns_server, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.9 mail.test\n")
    resolver = Resolver(["127.0.0.1"], port=dns_server.port, hosts_file=str(hosts))
    assert resolver.resolve("mail.test", ipv4_only=True) == ["127.0.0.9"]

    hosts.write_text("127.0.0.10 other.test\n")
    stat = hosts.stat()
    os.utime(hosts, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    assert resolver.resolve("mail.test", ipv4_only=True) == ["127.0.0.1"]  # from DNS now
    assert resolver.resolve("other.test", ipv4_only=True) == ["127.0.0.10"]


def test_hosts_entry_of_the_wrong_family_falls_through_to_dns(dns_server, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("::9 mail.test\n")
    resolver = Resolver(["127.0.0.1"], port=dns_server.port, hosts_file=str(hosts))
    assert resolver.resolve("mail.test", ipv4_only=True) == ["127.0.0.1"]
    assert dns_server.queries == [("mail.test", "A")]


# --- permanent failures ---------------------------------------------------------------------


def test_nxdomain_is_a_permanent_error(resolver):
    with pytest.raises(ResolutionError) as info:
        resolver.resolve("nowhere.test", ipv4_only=True)
    assert info.value.permanent
    assert info.value.host == "nowhere.test"
    assert "NXDOMAIN" in str(info.value)


def test_missing_record_type_is_a_permanent_error(resolver):
    with pytest.raises(ResolutionError) as info:
        resolver.resolve("v6only.test", ipv4_only=True)
    assert info.value.permanent


@pytest.mark.parametrize(
    "host",
    [
        "smtp..example.com",
        ".example.com",
        "a" * 64 + ".example.com",
        ("a" * 63 + ".") * 4 + "com",  # over 255 octets in all
        "smtp\u3002\u3002example.com",  # ideographic full stops: an empty label too
        "sm\u200dtp.example.com",  # no IDNA encoding
    ],
    ids=["empty label", "leading dot", "label over 63", "name over 255", "U+3002", "IDNA"],
)
def test_a_malformed_name_is_a_permanent_error_without_a_query(resolver, dns_server, host):
    # A typo in HOST: no nameserver and no retry will ever make it resolve.
    with pytest.raises(ResolutionError) as info:
        resolver.resolve(host, ipv4_only=False)
    assert info.value.permanent
    assert classify(info.value) is Classification.PROVIDER_FATAL
    assert "not a valid host name" in str(info.value)
    assert dns_server.queries == []


def test_nxdomain_never_falls_back_to_a_stale_answer(resolver, dns_server, clock):
    assert resolver.resolve("mail.test", ipv4_only=True) == ["127.0.0.1"]
    del dns_server.records["mail.test"]
    clock.now += 1

    with pytest.raises(ResolutionError) as info:
        resolver.resolve("mail.test", ipv4_only=True)
    assert info.value.permanent

    # The old answer is gone for good: a later outage does not bring it back.
    dns_server.silent = True
    with pytest.raises(ResolutionError) as info:
        resolver.resolve("mail.test", ipv4_only=True)
    assert not info.value.permanent


# --- resolver down: stale answers -----------------------------------------------------------


def test_resolver_down_returns_the_last_good_answer_and_warns(resolver, dns_server, clock, caplog):
    assert resolver.resolve("mail.test", ipv4_only=True) == ["127.0.0.1"]
    dns_server.silent = True
    clock.now += 300

    with caplog.at_level(logging.WARNING, logger="robust_mail.resolver"):
        assert resolver.resolve("mail.test", ipv4_only=True) == ["127.0.0.1"]

    assert dns_server.queries == [("mail.test", "A"), ("mail.test", "A")]
    [record] = caplog.records
    assert record.name == "robust_mail.resolver"
    assert record.levelno == logging.WARNING
    assert "mail.test" in record.getMessage()


def test_stale_answer_older_than_stale_ttl_is_not_used(resolver, dns_server, clock):
    assert resolver.resolve("mail.test", ipv4_only=False) == ["::1", "127.0.0.1"]
    dns_server.silent = True

    clock.now += 599
    assert resolver.resolve("mail.test", ipv4_only=False) == ["::1", "127.0.0.1"]

    clock.now += 1
    with pytest.raises(ResolutionError) as info:
        resolver.resolve("mail.test", ipv4_only=False)
    assert not info.value.permanent


def test_servfail_returns_the_last_good_answer(resolver, dns_server, clock):
    assert resolver.resolve("mail.test", ipv4_only=True) == ["127.0.0.1"]
    dns_server.servfail = True
    clock.now += 10
    assert resolver.resolve("mail.test", ipv4_only=True) == ["127.0.0.1"]


def test_servfail_without_a_previous_answer_is_a_transient_error(resolver, dns_server):
    dns_server.servfail = True
    with pytest.raises(ResolutionError) as info:
        resolver.resolve("mail.test", ipv4_only=True)
    assert not info.value.permanent


def test_stale_answers_are_kept_per_ipv4_mode(resolver, dns_server):
    assert resolver.resolve("mail.test", ipv4_only=True) == ["127.0.0.1"]
    dns_server.silent = True
    # An IPv4-only answer must never stand in for a lookup that wants IPv6 too, or back.
    with pytest.raises(ResolutionError):
        resolver.resolve("mail.test", ipv4_only=False)


def test_name_never_resolved_with_resolver_down_is_a_transient_error(resolver, dns_server):
    dns_server.silent = True
    with pytest.raises(ResolutionError) as info:
        resolver.resolve("mail.test", ipv4_only=True)
    assert not info.value.permanent
    assert info.value.host == "mail.test"
    assert classify(info.value) is Classification.TRANSIENT


def test_unreachable_nameserver_is_a_transient_error(clock):
    # A port nobody listens on: the kernel refuses, or the query times out.
    with DNSTestServer({}) as server:
        port = server.port
    resolver = Resolver(["127.0.0.1"], port=port, timeout=DOWN_TIMEOUT, clock=clock)
    with pytest.raises(ResolutionError) as info:
        resolver.resolve("mail.test", ipv4_only=True)
    assert not info.value.permanent


def test_a_nameserver_dnspython_refuses_is_a_transient_error_not_a_value_error(clock):
    # Checks report it (E008); a configuration built around them must still fail as a
    # resolution failure, so the dispatcher fails over instead of failing the message.
    resolver = Resolver(["dns.google"], port=53, timeout=DOWN_TIMEOUT, clock=clock)
    with pytest.raises(ResolutionError) as info:
        resolver.resolve("mail.test", ipv4_only=True)
    assert not info.value.permanent
    assert "bad nameserver setting" in info.value.reason
    assert classify(info.value) is Classification.TRANSIENT


# --- threads ----------------------------------------------------------------------------------


def test_resolver_is_safe_to_share_between_threads(resolver):
    def work(i: int) -> list[str]:
        return resolver.resolve("mail.test", ipv4_only=bool(i % 2))

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(64)))
    assert results == [["::1", "127.0.0.1"], ["127.0.0.1"]] * 32


# --- the test server itself -------------------------------------------------------------------


def test_dns_test_server_stops_cleanly_and_can_stop_twice():
    server = DNSTestServer({"a.test": {"A": ["127.0.0.1"]}}).start()
    assert server.port != 0
    server.stop()
    server.stop()


def test_dns_test_server_can_listen_on_ipv6_loopback(clock):
    try:
        server = DNSTestServer(RECORDS, host="::1").start()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with server:
        resolver = Resolver(["::1"], port=server.port, timeout=DOWN_TIMEOUT, clock=clock)
        assert resolver.resolve("mail.test", ipv4_only=True) == ["127.0.0.1"]


def test_the_delivery_deadline_cuts_a_lookup_short_of_the_dns_timeout(dns_server, clock):
    import time

    # A DNS TIMEOUT far beyond the message's deadline: the deadline wins.
    resolver = Resolver(["127.0.0.1"], port=dns_server.port, timeout=60.0, clock=clock)
    dns_server.silent = True
    with pytest.raises(DeadlineReached):
        resolver.resolve("mail.test", ipv4_only=False, deadline=time.monotonic() + DOWN_TIMEOUT)


def test_a_lookup_cut_short_by_the_deadline_uses_the_last_good_answer(resolver, dns_server):
    import time

    assert resolver.resolve("mail.test", ipv4_only=True) == ["127.0.0.1"]
    dns_server.silent = True
    addresses = resolver.resolve(
        "mail.test", ipv4_only=True, deadline=time.monotonic() + DOWN_TIMEOUT / 2
    )
    assert addresses == ["127.0.0.1"]


def test_half_an_answer_is_used_but_never_replaces_a_whole_one(resolver, dns_server):
    assert resolver.resolve("mail.test", ipv4_only=False) == ["::1", "127.0.0.1"]
    dns_server.silent_types = {"A"}  # AAAA answers, A times out

    assert resolver.resolve("mail.test", ipv4_only=False) == ["::1"]

    dns_server.silent = True  # DNS down: the whole answer kept from before is used
    assert resolver.resolve("mail.test", ipv4_only=False) == ["::1", "127.0.0.1"]
