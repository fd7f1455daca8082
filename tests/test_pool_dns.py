"""A provider's pooled connections follow the DNS and POOL settings in force, not the first.

The pool's factory captures a resolver; a pool keyed on the provider alone kept the first
DNS configuration's for the life of the process (another MAILERS alias with other ``dns``
options, or override_settings in a project's tests, was silently ignored).
"""

from __future__ import annotations

from typing import Any

from django.core import mail

from robust_mail.pool import pools
from robust_mail.testing.dns import DNSTestServer
from tests.conftest import provider


def test_a_new_dns_configuration_is_used_for_a_provider_already_pooled(
    smtp_server: Any, robust: Any
) -> None:
    server = smtp_server()
    entry = provider(server, "p", HOST="mail.test")
    records = {"mail.test": {"A": ["127.0.0.1"]}}
    with DNSTestServer(records) as first, DNSTestServer(records) as second:
        robust([entry], DNS={"NAMESERVERS": ["127.0.0.1"], "PORT": first.port, "TIMEOUT": 1.0})
        assert mail.send_mail("s", "b", "a@example.com", ["x@example.com"]) == 1
        pools.close_all()  # idle connections gone, as after IDLE_TIMEOUT

        robust([entry], DNS={"NAMESERVERS": ["127.0.0.1"], "PORT": second.port, "TIMEOUT": 1.0})
        assert mail.send_mail("s", "b", "a@example.com", ["x@example.com"]) == 1

        assert ("mail.test", "A") in second.queries
    assert len(server.messages) == 2


def test_a_provider_under_other_pool_settings_gets_a_pool_of_its_own(
    smtp_server: Any, robust: Any
) -> None:
    # Two MAILERS aliases (here, one after the other) with one provider and other POOL
    # settings: each keeps its own size instead of the last sender's.
    server = smtp_server()
    entry = provider(server, "p")
    robust([entry], POOL={"SIZE": 2})
    assert mail.send_mail("s", "b", "a@example.com", ["x@example.com"]) == 1
    robust([entry], POOL={"SIZE": 7, "MAX_MESSAGES": 50})
    assert mail.send_mail("s", "b", "a@example.com", ["x@example.com"]) == 1

    assert sorted(pool.size for pool in pools.all()) == [2, 7]
