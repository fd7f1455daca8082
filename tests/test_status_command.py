"""manage.py robust_mail_status: breakers and counters from the shared cache."""

from __future__ import annotations

import json
from io import StringIO
from typing import Any

import pytest
from django.core.mail import EmailMessage
from django.core.management import call_command

from robust_mail import metrics
from tests.conftest import needs_mailers, provider
from tests.test_example_project import site  # noqa: F401  (the example project's fixture)


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


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_status_json_is_valid_when_a_latency_lies_beyond_the_last_bucket(robust):
    robust([{"NAME": "slow", "HOST": "127.0.0.1", "PORT": 1, "TIMEOUT": 1}])
    metrics.observe("slow", metrics.BUCKETS[-1] + 15)  # one delivery took 75 s

    (entry,) = _strict_json(_status("--json"))["providers"]

    # null, with a count that says something was observed: beyond the last bucket.
    assert (entry["latency_p50"], entry["latency_p99"], entry["latency_count"]) == (None, None, 1)
    slow = next(line for line in _status().splitlines() if line.startswith("slow "))
    assert slow.split()[-2:] == [">60s", ">60s"]


def test_status_table_shows_every_counter_within_100_columns(robust):
    robust([{"NAME": "a-rather-long-name", "HOST": "127.0.0.1", "PORT": 1, "TIMEOUT": 1}])
    metrics.incr("a-rather-long-name", "fallback", 3)
    metrics.incr("a-rather-long-name", "breaker_opened", 2)

    table = _status()

    header_words = {word for line in table.splitlines() for word in line.split()}
    assert set(metrics.COUNTERS) <= header_words
    assert max(len(line) for line in table.splitlines()) <= 100
    rows = [line.split() for line in table.splitlines() if line.startswith("a-rather-long-name")]
    assert rows[0][3] == "2"  # breaker_opened, beside the breaker
    assert rows[1][5] == "3"  # fallback


@pytest.mark.django_db
def test_example_project_status_json_is_valid_when_a_latency_lies_beyond_the_last_bucket(
    client,
    site,  # noqa: F811  (the fixture imported above)
):
    metrics.observe("primary", metrics.BUCKETS[-1] + 15)

    response = client.get("/status.json")

    assert response.status_code == 200
    primary = _strict_json(response.content.decode())["providers"][0]
    assert (primary["name"], primary["latency_p99"], primary["latency_count"]) == (
        "primary",
        None,
        1,
    )


def test_status_on_a_per_process_cache_says_it_shows_only_its_own_process() -> None:
    # The suite's cache is LocMem: the status command's process sent nothing itself.
    out = _status()

    assert "cache 'default' is per process: this shows only this command's own process" in out
    assert "shared state read" not in out
