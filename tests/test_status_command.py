"""manage.py robust_mail_status: breakers and counters from the shared cache."""

from __future__ import annotations

import json
from io import StringIO

from django.core.mail import EmailMessage
from django.core.management import call_command

from tests.conftest import needs_mailers, provider


def _status(*args: str) -> str:
    out = StringIO()
    call_command("robust_mail_status", *args, stdout=out)
    return out.getvalue()


def test_status_shows_an_open_breaker_and_the_counters(smtp_server, robust):
    primary = smtp_server("auth_535", auth={"u": "right"})
    backup = smtp_server()
    robust(
        [provider(primary, "primary", USERNAME="u", PASSWORD="wrong"), provider(backup, "backup")]
    )
    for _ in range(2):
        EmailMessage("s", "b", "f@example.com", ["t@example.com"]).send()

    data = json.loads(_status("--json"))

    by_name = {p["name"]: p for p in data["providers"]}
    assert by_name["primary"]["breaker"] == "open"
    assert 0 < by_name["primary"]["half_open_in"] <= 60
    assert by_name["primary"]["counters"]["failed"] == 1
    assert by_name["backup"]["breaker"] == "closed"
    assert by_name["backup"]["counters"]["sent"] == 2
    assert by_name["backup"]["latency_p50"] is not None

    table = _status()
    assert "primary" in table and "open" in table
    assert table.splitlines()[0].split()[:3] == ["provider", "breaker", "half-open"]


def test_status_with_nothing_sent_lists_the_configured_providers(smtp_server, robust):
    server = smtp_server()
    robust([provider(server, "only")])

    data = json.loads(_status("--json"))

    assert [p["name"] for p in data["providers"]] == ["only"]
    assert data["providers"][0]["breaker"] == "closed"
    assert data["providers"][0]["latency_p50"] is None


@needs_mailers
def test_status_lists_the_providers_of_every_mailers_alias(settings):
    from robust_mail.outbox_delivery import delivery_config
    from robust_mail.state import get_breaker
    from tests.test_metrics import MAILERS

    settings.MAILERS = MAILERS
    get_breaker("b", delivery_config("bulk")).trip()

    data = json.loads(_status("--json"))

    by_name = {p["name"]: p for p in data["providers"]}
    assert by_name["a"]["breaker"] == "closed" and by_name["a"]["configured"]
    assert by_name["b"]["breaker"] == "open" and by_name["b"]["configured"]
