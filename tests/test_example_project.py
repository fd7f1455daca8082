"""The example site's views, through Django's test client, against real local SMTP servers.

The browser tests (tests/browser/) drive the same pages end to end in Chromium; these
check each view's behaviour quickly and without a browser.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client

from robust_mail.models import OutboxMessage
from tests.test_otp_support import notices_only

pytestmark = pytest.mark.django_db

EXAMPLE_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "robust_mail",
    "example_project.demo_site",
]
EXAMPLE_MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
DEMO = "demo@example.com"
CODE = re.compile(r"Your code is: (\w+)")


@pytest.fixture
def site(settings: Any, smtp_server: Callable[..., Any]) -> Iterator[SimpleNamespace]:
    """The example project's apps, URLs and auth on two local servers, like `make demo`."""
    from example_project.demo_site import deliveries, embedded

    primary = smtp_server(name="primary")
    backup = smtp_server(name="backup")
    settings.INSTALLED_APPS = EXAMPLE_APPS
    settings.TEMPLATES = [{**settings.TEMPLATES[0]}]  # a fresh engine sees the new app
    settings.MIDDLEWARE = EXAMPLE_MIDDLEWARE
    settings.ROOT_URLCONF = "example_project.urls"
    settings.EXAMPLE_OPEN_PAGES = True  # as on the local demo
    settings.AUTHENTICATION_BACKENDS = [
        "django.contrib.auth.backends.ModelBackend",
        "robust_mail.auth_backends.EmailCodeBackend",
    ]
    settings.LOGIN_URL = "demo_site:sign_in"
    # pytest-django swaps in the locmem backend: the example sends through robust_mail.
    settings.EMAIL_BACKEND = "robust_mail.backends.RobustEmailBackend"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.AUTH_PASSWORD_VALIDATORS = [
        {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
        {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    ]
    settings.ROBUST_MAIL = {
        "PROVIDERS": [primary.provider_settings(TIMEOUT=2), backup.provider_settings(TIMEOUT=2)],
        "RETRY": {"ATTEMPTS": 2, "BACKOFF": 0.0, "MAX_BACKOFF": 0.0, "DEADLINE": 20.0},
        "CIRCUIT_BREAKER": {"FAILURE_THRESHOLD": 2, "RESET_TIMEOUT": 30},
        "FALLBACK": "outbox",
    }
    embedded.register(primary)
    embedded.register(backup)
    try:
        yield SimpleNamespace(primary=primary, backup=backup)
    finally:
        embedded.unregister("primary")
        embedded.unregister("backup")
        deliveries.clear()
        # Installing the app connected its signal receivers; other tests must not see them.
        deliveries.disconnect()


@pytest.fixture
def demo_user(site: SimpleNamespace) -> Any:
    from example_project.demo_site.accounts import ensure_demo_user

    user, _ = ensure_demo_user()
    return user


def run_worker() -> None:
    """Deliver the outbox once, as the demo's worker process does continuously."""
    call_command("robust_mail_worker", "--once", stdout=io.StringIO())


def latest_code(server: Any, subject: str) -> str:
    for received in reversed(server.messages):
        if received.subject == subject:
            match = CODE.search(received.message.get_body(("plain",)).get_content())
            assert match is not None
            return match.group(1)
    raise AssertionError(f"no {subject!r} message in {server!r}")


def signed_in_client(client: Client, site: SimpleNamespace, demo_user: Any) -> Client:
    client.force_login(demo_user, backend="django.contrib.auth.backends.ModelBackend")
    return client


# -- dashboard ----------------------------------------------------------------------------


def test_dashboard_shows_each_provider_with_its_breaker_and_local_server(
    client: Client, site: SimpleNamespace
) -> None:
    response = client.get("/")
    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="provider-primary" data-breaker="closed"' in html
    assert 'id="provider-backup" data-breaker="closed"' in html
    assert f"127.0.0.1:{site.primary.port}" in html
    assert "Take primary down" in html
    assert 'data-live="/status/live/"' in html


def test_live_panels_and_json_report_the_same_state(client: Client, site: SimpleNamespace) -> None:
    panels = client.get("/status/live/")
    assert panels.status_code == 200
    assert b"<html" not in panels.content
    assert b'id="outbox"' in panels.content
    data = client.get("/status.json").json()
    assert [p["name"] for p in data["providers"]] == ["primary", "backup"]
    assert data["providers"][0]["server"]["mode"] == "accept"
    for provider in data["providers"]:  # the panels show the providers the JSON reports
        shown = f'id="provider-{provider["name"]}" data-breaker="{provider["breaker"]}"'
        assert shown.encode() in panels.content
    assert [s["status"] for s in data["outbox"]["statuses"]] == [
        "queued",
        "sending",
        "sent",
        "failed",
        "dead",
    ]
    assert data["deliveries"] == []


# -- switches -----------------------------------------------------------------------------


def test_switch_takes_a_local_server_down_and_brings_it_back(
    client: Client, site: SimpleNamespace
) -> None:
    response = client.post("/servers/primary/mode/", {"mode": "refuse", "next": "/mailbox/"})
    assert response.status_code == 302
    assert response["Location"] == "/mailbox/"
    assert site.primary.mode == "refuse"
    assert client.get("/status.json").json()["providers"][0]["server"]["up"] is False

    client.post("/servers/primary/mode/", {"mode": "accept"})
    assert site.primary.mode == "accept"


def test_switch_refuses_unknown_modes_servers_and_foreign_redirects(
    client: Client, site: SimpleNamespace
) -> None:
    assert client.post("/servers/primary/mode/", {"mode": "explode"}).status_code == 400
    assert client.post("/servers/nowhere/mode/", {"mode": "refuse"}).status_code == 404
    assert client.get("/servers/primary/mode/").status_code == 405
    response = client.post(
        "/servers/backup/mode/", {"mode": "greeting_421", "next": "https://evil.example/"}
    )
    assert response["Location"] == "/"
    assert site.backup.mode == "greeting_421"


def test_switch_needs_the_csrf_token(site: SimpleNamespace) -> None:
    client = Client(enforce_csrf_checks=True)
    assert client.post("/servers/primary/mode/", {"mode": "refuse"}).status_code == 403
    assert site.primary.mode == "accept"


# -- sending ------------------------------------------------------------------------------


def test_send_page_needs_a_signed_in_user(client: Client, site: SimpleNamespace) -> None:
    response = client.get("/send/")
    assert response.status_code == 302
    assert response["Location"].startswith("/signin/?next=/send/")


def send(client: Client, delivery: str = "now", subject: str = "Hello") -> Any:
    return client.post(
        "/send/",
        {
            "to": "someone@example.com",
            "subject": subject,
            "body": "Body text",
            "delivery": delivery,
        },
        follow=True,
    )


def test_send_now_is_delivered_by_the_primary_and_reported(
    client: Client, site: SimpleNamespace, demo_user: Any
) -> None:
    signed_in_client(client, site, demo_user)
    response = send(client, subject="First")
    assert "sent via primary after 1 attempt(s)" in response.content.decode()
    assert [m.subject for m in site.primary.messages] == ["First"]
    entry = client.get("/status.json").json()["deliveries"][0]
    assert (entry["subject"], entry["status"], entry["provider"], entry["attempts"]) == (
        "First",
        "sent",
        "primary",
        1,
    )


def test_primary_down_fails_over_to_backup_and_opens_the_breaker(
    client: Client, site: SimpleNamespace, demo_user: Any
) -> None:
    signed_in_client(client, site, demo_user)
    client.post("/servers/primary/mode/", {"mode": "refuse"})
    first = send(client, subject="Failover 1").content.decode()
    # Unreachable with a backup there: no retry, the breaker opens at once.
    assert "sent via backup after 2 attempt(s)" in first
    send(client, subject="Failover 2")
    assert [m.subject for m in site.backup.messages] == ["Failover 1", "Failover 2"]
    html = client.get("/").content.decode()
    assert 'id="provider-primary" data-breaker="open"' in html
    assert "a trial in" in html


def test_busy_switch_reaches_the_connection_the_last_send_left_open(
    client: Client, site: SimpleNamespace, demo_user: Any
) -> None:
    signed_in_client(client, site, demo_user)
    send(client, subject="Pooled")  # leaves a pooled connection to the primary open
    client.post("/servers/primary/mode/", {"mode": "greeting_421"})

    page = send(client, subject="Busy").content.decode()

    assert "sent via backup" in page
    assert [m.subject for m in site.primary.messages] == ["Pooled"]
    assert [m.subject for m in site.backup.messages] == ["Busy"]


def test_send_in_background_waits_in_the_outbox_until_the_worker_runs(
    client: Client, site: SimpleNamespace, demo_user: Any
) -> None:
    signed_in_client(client, site, demo_user)
    response = send(client, delivery="background", subject="Later")
    assert "the worker delivers it" in response.content.decode()
    assert site.primary.messages == []
    assert client.get("/status.json").json()["outbox"]["pending"] == 1

    run_worker()

    assert [m.subject for m in site.primary.messages] == ["Later"]
    outbox = client.get("/status.json").json()["outbox"]
    assert outbox["pending"] == 0
    assert outbox["newest"][0]["status"] == "sent"
    assert outbox["newest"][0]["provider"] == "primary"


def test_send_form_rejects_a_bad_address(
    client: Client, site: SimpleNamespace, demo_user: Any
) -> None:
    signed_in_client(client, site, demo_user)
    response = client.post(
        "/send/", {"to": "not an address", "subject": "x", "body": "y", "delivery": "now"}
    )
    assert response.status_code == 200
    assert "Enter a valid email address." in response.content.decode()
    assert OutboxMessage.objects.count() == 0


# -- mailbox ------------------------------------------------------------------------------


def test_mailbox_shows_each_servers_messages_decoded(
    client: Client, site: SimpleNamespace, demo_user: Any
) -> None:
    signed_in_client(client, site, demo_user)
    client.post(
        "/send/",
        {"to": "z@example.com", "subject": "Grüße", "body": "Ünïcode body", "delivery": "now"},
    )
    html = client.get("/mailbox/").content.decode()
    assert 'id="mailbox-primary" data-count="1"' in html
    assert 'id="mailbox-backup" data-count="0"' in html
    assert "Grüße" in html
    assert "Ünïcode body" in html
    live = client.get("/mailbox/live/").content.decode()
    assert "Grüße" in live
    assert "<html" not in live


def test_mailbox_can_be_cleared(client: Client, site: SimpleNamespace, demo_user: Any) -> None:
    signed_in_client(client, site, demo_user)
    send(client)
    assert client.post("/mailbox/primary/clear/").status_code == 302
    assert site.primary.messages == []


def test_mailbox_without_local_servers_says_how_to_start_them(
    client: Client, site: SimpleNamespace
) -> None:
    from example_project.demo_site import embedded

    embedded.unregister("primary")
    embedded.unregister("backup")
    html = client.get("/mailbox/").content.decode()
    assert "make demo" in html


# -- sign-in by code ----------------------------------------------------------------------


def test_sign_in_with_an_emailed_code(
    client: Client, site: SimpleNamespace, demo_user: Any
) -> None:
    response = client.post("/signin/", {"action": "code", "code-email": DEMO, "next": "/send/"})
    assert response.status_code == 302
    assert response["Location"] == "/signin/code/?email=demo%40example.com&next=%2Fsend%2F"
    # The code goes through the outbox: nothing is sent until the worker runs.
    assert site.primary.messages == []
    run_worker()
    code = latest_code(site.primary, "Your sign-in code")

    response = client.post("/signin/code/", {"email": DEMO, "code": code, "next": "/send/"})
    assert response.status_code == 302
    assert response["Location"] == "/send/"
    assert client.get("/send/").status_code == 200


def test_a_wrong_code_does_not_sign_in(
    client: Client, site: SimpleNamespace, demo_user: Any
) -> None:
    client.post("/signin/", {"action": "code", "code-email": DEMO})
    run_worker()
    code = latest_code(site.primary, "Your sign-in code")
    wrong = "000000" if code != "000000" else "111111"
    response = client.post("/signin/code/", {"email": DEMO, "code": wrong})
    assert response.status_code == 200
    assert "That code is not valid" in response.content.decode()
    assert client.get("/send/").status_code == 302


def test_an_unknown_address_gets_the_same_answer_and_no_code(
    client: Client, site: SimpleNamespace, demo_user: Any
) -> None:
    response = client.post("/signin/", {"action": "code", "code-email": "nobody@example.com"})
    assert response.status_code == 302
    assert response["Location"].startswith("/signin/code/?email=nobody%40example.com")
    run_worker()
    assert notices_only(site.primary) == ["nobody@example.com"]


def test_sign_in_page_offers_both_ways_and_sign_out_needs_post(
    client: Client, site: SimpleNamespace, demo_user: Any
) -> None:
    html = client.get("/signin/").content.decode()
    assert "Email me a code" in html
    assert 'name="password"' in html
    signed_in_client(client, site, demo_user)
    assert client.get("/signout/").status_code == 405
    assert client.post("/signout/").status_code == 302
    assert client.get("/send/").status_code == 302


# -- password reset by code ---------------------------------------------------------------


def test_reset_password_by_code_then_sign_in_with_it(
    client: Client, site: SimpleNamespace, demo_user: Any
) -> None:
    response = client.post("/reset/", {"email": DEMO})
    assert response["Location"] == "/reset/code/?email=demo%40example.com"
    run_worker()
    code = latest_code(site.primary, "Your password reset code")

    response = client.post("/reset/code/", {"email": DEMO, "code": code})
    assert response["Location"] == "/reset/new/"
    response = client.post(
        "/reset/new/", {"password1": "a long new passphrase", "password2": "a long new passphrase"}
    )
    assert response["Location"] == "/signin/"

    response = client.post(
        "/signin/",
        {"action": "password", "username": DEMO, "password": "a long new passphrase"},
    )
    assert response.status_code == 302
    assert client.get("/send/").status_code == 200


def test_reset_checks_the_code_and_the_new_password(
    client: Client, site: SimpleNamespace, demo_user: Any
) -> None:
    assert client.get("/reset/new/")["Location"] == "/reset/"
    client.post("/reset/", {"email": DEMO})
    run_worker()
    code = latest_code(site.primary, "Your password reset code")
    wrong = "000000" if code != "000000" else "111111"
    assert (
        "That code is not valid"
        in client.post("/reset/code/", {"email": DEMO, "code": wrong}).content.decode()
    )
    client.post("/reset/code/", {"email": DEMO, "code": code})
    mismatch = client.post("/reset/new/", {"password1": "one long phrase", "password2": "other"})
    assert "The two passwords differ." in mismatch.content.decode()
    common = client.post("/reset/new/", {"password1": "password", "password2": "password"})
    assert common.status_code == 200
    assert "too common" in common.content.decode()


# -- admin with a code --------------------------------------------------------------------


def test_staff_sign_in_to_the_admin_with_a_code(
    client: Client, site: SimpleNamespace, demo_user: Any
) -> None:
    login_page = client.get("/admin/login/").content.decode()
    assert "ask for a code" in login_page
    assert "Code" in login_page

    response = client.post("/admin/login/code/", {"email": DEMO})
    assert response["Location"] == "/admin/login/"
    run_worker()
    code = latest_code(site.primary, "Your sign-in code")
    response = client.post("/admin/login/", {"username": DEMO, "password": code, "next": "/admin/"})
    assert response.status_code == 302
    assert response["Location"] == "/admin/"
    outbox = client.get("/admin/robust_mail/outboxmessage/")
    assert outbox.status_code == 200
    assert "Your sign-in code" in outbox.content.decode()
    assert client.get("/admin/robust_mail/onetimepassword/").status_code == 200


# -- demo user ----------------------------------------------------------------------------


def test_demo_user_command_is_idempotent(site: SimpleNamespace) -> None:
    first, second = io.StringIO(), io.StringIO()
    call_command("demo_user", stdout=first)
    call_command("demo_user", stdout=second)
    assert "created" in first.getvalue()
    assert "exists" in second.getvalue()
    user = get_user_model().objects.get(email=DEMO)
    assert user.is_staff
    assert user.has_usable_password()  # random and unknown: reset by code works


# -- production settings ------------------------------------------------------------------


def test_production_settings_take_every_credential_from_the_environment(tmp_path: Any) -> None:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DJANGO_SETTINGS_MODULE": "example_project.settings_production",
        "EXAMPLE_DATA_DIR": str(tmp_path),
        "DJANGO_SECRET_KEY": "test-only-" + "x" * 50,
        "DJANGO_ALLOWED_HOSTS": "mail.example.org",
        "PRIMARY_SMTP_HOST": "smtp.primary.example",
        "PRIMARY_SMTP_USER": "primary-user",
        "PRIMARY_SMTP_PASSWORD": "primary-password",
        "BACKUP_SMTP_HOST": "smtp.backup.example",
        "BACKUP_SMTP_USER": "backup-user",
        "BACKUP_SMTP_PASSWORD": "backup-password",
        "REDIS_URL": "redis://127.0.0.1:1/0",
    }
    script = (
        "import django; django.setup()\n"
        "from robust_mail.conf import get_config\n"
        "for p in get_config().providers:\n"
        "    print(p.name, p.host, p.port, p.use_tls, p.use_ssl, p.username, p.password)\n"
        "print(get_config().fallback)\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "primary smtp.primary.example 587 True False primary-user primary-password",
        "backup smtp.backup.example 465 False True backup-user backup-password",
        "outbox",
    ]
    del env["PRIMARY_SMTP_PASSWORD"]
    missing = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True
    )
    assert missing.returncode != 0
    assert "PRIMARY_SMTP_PASSWORD" in missing.stderr


@pytest.mark.parametrize(
    "path", ["/", "/status.json", "/status/live/", "/mailbox/", "/mailbox/live/", "/send/"]
)
def test_operator_pages_are_staff_only_outside_the_local_demo(
    client: Client, site: SimpleNamespace, settings: Any, path: str
) -> None:
    settings.EXAMPLE_OPEN_PAGES = False

    response = client.get(path)

    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


def test_server_switch_is_staff_only_outside_the_local_demo(
    client: Client, site: SimpleNamespace, settings: Any
) -> None:
    settings.EXAMPLE_OPEN_PAGES = False

    response = client.post("/servers/primary/mode/", {"mode": "refuse"})

    assert response.status_code == 302
    assert site.primary.mode == "accept"


def test_terminal_tour_shows_each_failure_class(tmp_path: Path) -> None:
    env = {**os.environ, "EXAMPLE_DATA_DIR": str(tmp_path), "DJANGO_SETTINGS_MODULE": ""}
    env.pop("DJANGO_SETTINGS_MODULE")
    done = subprocess.run(
        [sys.executable, "-m", "example_project.demo", "--terminal"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    results = [line.strip() for line in done.stdout.splitlines() if line.startswith("  ->")]

    assert results[0] == "-> sent via primary after 1 attempt(s)"
    assert results[1] == "-> sent via backup after 3 attempt(s)"  # 421: retried, then failover
    assert results[2] == "-> sent via backup after 2 attempt(s)"  # 535: no retry
    assert results[3] == "-> sent via backup after 1 attempt(s)"  # breaker open: skipped
    assert results[4] == "-> sent via backup after 2 attempt(s)"  # unreachable: no retry
    assert "message_fatal at rcpt" in results[5]


@pytest.mark.parametrize("url", ["/signin/", "/signin/code/", "/reset/code/", "/reset/new/"])
def test_views_that_take_codes_or_passwords_keep_them_out_of_error_reports(
    client: Client, site: SimpleNamespace, url: str
) -> None:
    response = client.post(url, {"email": "a@example.com", "code": "123456"})

    hidden = set(getattr(response.wsgi_request, "sensitive_post_parameters", ()))
    assert {"code", "password", "password1", "password2"} <= hidden


def test_open_operator_pages_are_open_to_this_machine_only(
    client: Client, site: SimpleNamespace
) -> None:
    # A demo started on 0.0.0.0 by mistake must not show its mailboxes (sign-in codes).
    assert client.get("/mailbox/").status_code == 200
    remote = client.get("/mailbox/", REMOTE_ADDR="192.0.2.10")  # no traffic: a META value
    assert remote.status_code == 302 and "/admin/login/" in remote["Location"]


def test_demo_runner_retries_when_an_smtp_port_was_taken_after_it_was_chosen() -> None:
    from example_project.demo_process import _port_taken

    # asyncio's wording, as the embedded SMTP servers report it (a CI run met it).
    asyncio_log = (
        "RuntimeError: cannot listen on 127.0.0.1:33327 for the backup demo SMTP server "
        "([Errno 98] error while attempting to bind on address ('127.0.0.1', 33327): "
        "address already in use)"
    )
    assert _port_taken(asyncio_log)
    assert _port_taken("Error: That port is already in use.")
    assert not _port_taken("ImproperlyConfigured: SECRET_KEY is missing")
