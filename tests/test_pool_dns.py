"""A provider's pooled connections follow the DNS and POOL settings in force, not the first.

The pool's factory captures a resolver; a pool keyed on the provider alone kept the first
DNS configuration's for the life of the process (another MAILERS alias with other ``dns``
options, or override_settings in a project's tests, was silently ignored).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from django.core import mail

from robust_mail.pool import pools
from robust_mail.testing.dns import DNSTestServer
from tests.conftest import provider
from tests.forking import in_child


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


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_sends_through_a_pool_whose_resolver_was_busy_at_fork(
    smtp_server: Any, robust: Any
) -> None:
    # The parent's pool outlives fork(), and its factory keeps the resolver it captured.
    # Another thread of the parent is inside a lookup when the process forks: the child's
    # copy of that resolver's lock would stay held for ever.
    from robust_mail.conf import get_config
    from robust_mail.dispatch import resolver_for

    server = smtp_server()
    robust([provider(server, "p", HOST="localhost")], FORCE_IPV4=True)
    assert mail.send_mail("s", "parent", "a@example.com", ["x@example.com"]) == 1
    resolver = resolver_for(get_config().dns)  # the one the pool's factory captured

    with resolver._lock:
        status = in_child(lambda: mail.send_mail("s", "child", "a@example.com", ["x@example.com"]))

    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0  # finished before its alarm
    assert [m.message.get_content().strip() for m in server.messages] == ["parent", "child"]
