"""System checks: every robust_mail.E0xx / W0xx id of the configuration, with its hint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import django
import pytest
from django.core.checks import CheckMessage, run_checks

from robust_mail.checks import check_settings
from tests.conftest import needs_mailers

ROBUST = "robust_mail.backends.RobustEmailBackend"
OUTBOX = "robust_mail.backends.OutboxEmailBackend"
SECRET = "s3cr3t-Pa55"


def messages() -> list[CheckMessage]:
    """The configuration messages, through Django's registry (proves registration)."""
    return [
        m
        for m in run_checks(tags=["robust_mail"])
        if m.id and m.id.startswith("robust_mail.") and int(m.id[-3:]) < 20
    ]


def ids() -> list[str]:
    return [m.id for m in messages() if m.id]


def only(check_id: str) -> CheckMessage:
    found = [m for m in messages() if m.id == check_id]
    assert len(found) == 1, [(m.id, m.msg) for m in messages()]
    return found[0]


def test_the_test_settings_pass_every_check() -> None:
    assert messages() == []


def test_check_function_is_registered_with_django() -> None:
    from django.core.checks import registry

    assert check_settings in registry.registry.get_checks()


# --- E001 -----------------------------------------------------------------------------


@needs_mailers
def test_e001_mailers_alias_without_providers(settings: Any) -> None:
    settings.MAILERS = {"default": {"BACKEND": ROBUST, "OPTIONS": {}}}
    message = only("robust_mail.E001")
    assert "MAILERS['default']['OPTIONS']['providers']" in message.msg
    assert "Add at least one provider" in (message.hint or "")


def test_e001_classic_form_without_providers_and_without_email_host(settings: Any) -> None:
    settings.EMAIL_HOST = ""
    assert "EMAIL_HOST" in (only("robust_mail.E001").hint or "")


# --- E002 .. E008 (shared with get_config) --------------------------------------------


def test_e002_use_tls_and_use_ssl_both_true(settings: Any) -> None:
    settings.ROBUST_MAIL = {"PROVIDERS": [{"HOST": "h", "USE_TLS": True, "USE_SSL": True}]}
    message = only("robust_mail.E002")
    assert "['USE_TLS']" in message.msg
    assert "set only one" in (message.hint or "")


@pytest.mark.parametrize(
    ("robust_mail", "key", "valid"),
    [
        ({"RETRIES": {}}, "'RETRIES'", "PROVIDERS, FORCE_IPV4"),
        ({"POOL": {"MAX_SIZE": 3}}, "'MAX_SIZE'", "SIZE, IDLE_TIMEOUT, MAX_MESSAGES"),
        ({"PROVIDERS": [{"HOST": "h", "SSL": True}]}, "'SSL'", "USE_SSL"),
    ],
)
def test_e003_unknown_key_is_named_and_valid_keys_listed(
    settings: Any, robust_mail: dict[str, Any], key: str, valid: str
) -> None:
    settings.ROBUST_MAIL = robust_mail
    message = only("robust_mail.E003")
    assert f"unknown key {key}" in message.msg
    assert valid in (message.hint or "")


@needs_mailers
def test_e003_in_mailers_options_uses_lower_case_keys(settings: Any) -> None:
    settings.MAILERS = {
        "default": {"BACKEND": OUTBOX, "OPTIONS": {"providers": ["smtp://h"], "Retry": {}}}
    }
    message = only("robust_mail.E003")
    assert "MAILERS['default']['OPTIONS']" in message.msg
    assert "Did you mean 'retry'?" in (message.hint or "")


def test_e004_unparsable_provider_url_never_shows_the_password(settings: Any) -> None:
    settings.ROBUST_MAIL = {"PROVIDERS": [f"smtp+ssl://user:{SECRET}@mail.example.com"]}
    message = only("robust_mail.E004")
    assert "['PROVIDERS'][0]" in message.msg
    assert "user:***@mail.example.com" in message.msg
    assert SECRET not in message.msg
    assert "smtp+tls://" in (message.hint or "")


@pytest.mark.parametrize("timeout", [None, 0, -5])
def test_e005_provider_timeout_none_or_not_positive(settings: Any, timeout: Any) -> None:
    settings.ROBUST_MAIL = {"PROVIDERS": [{"HOST": "h", "TIMEOUT": timeout}]}
    message = only("robust_mail.E005")
    assert "['TIMEOUT']" in message.msg
    assert "never wait forever" in (message.hint or "")


def test_e005_email_timeout_not_positive(settings: Any) -> None:
    settings.EMAIL_TIMEOUT = 0
    assert "settings.EMAIL_TIMEOUT" in only("robust_mail.E005").msg


def test_email_timeout_none_is_bounded_not_an_error(settings: Any) -> None:
    settings.EMAIL_TIMEOUT = None
    assert ids() == []


def test_e006_unknown_fallback(settings: Any) -> None:
    settings.ROBUST_MAIL = {"FALLBACK": "email"}
    message = only("robust_mail.E006")
    assert "['FALLBACK']" in message.msg
    assert "'console', 'outbox'" in (message.hint or "")


def test_e007_duplicate_provider_names(settings: Any) -> None:
    settings.ROBUST_MAIL = {
        "PROVIDERS": [{"NAME": "a", "HOST": "h1"}, "smtp://h2?name=a"],
    }
    message = only("robust_mail.E007")
    assert "'a'" in message.msg
    assert "distinct NAME" in (message.hint or "")


@pytest.mark.parametrize(
    ("robust_mail", "text"),
    [
        ({"RETRY": {"ATTEMPTS": 0}}, "['RETRY']['ATTEMPTS'] must be an integer ≥ 1"),
        ({"RATE_LIMITS": {"GLOBAL": "lots"}}, "['RATE_LIMITS']['GLOBAL'] must be a rate"),
        ({"PROVIDERS": [{"HOST": "h", "PORT": "587"}]}, "['PORT'] must be an integer"),
    ],
)
def test_e008_bad_value(settings: Any, robust_mail: dict[str, Any], text: str) -> None:
    settings.ROBUST_MAIL = robust_mail
    message = only("robust_mail.E008")
    assert text in message.msg
    assert message.hint


# --- E009 .. E011: the rest of the project --------------------------------------------


def test_e009_cache_alias_not_in_caches(settings: Any) -> None:
    settings.ROBUST_MAIL = {"CACHE": "shared"}
    message = only("robust_mail.E009")
    assert "'shared'" in message.msg
    assert "'default'" in (message.hint or "")


def test_e010_mailer_provider_needs_mailers(settings: Any) -> None:
    settings.ROBUST_MAIL = {"PROVIDERS": [{"MAILER": "ses"}]}
    assert "MAILERS" in (only("robust_mail.E010").hint or "")


@needs_mailers
def test_e010_mailer_provider_names_a_missing_alias(settings: Any) -> None:
    settings.MAILERS = {
        "default": {"BACKEND": ROBUST, "OPTIONS": {"providers": ["smtp://h", {"mailer": "ses"}]}},
        "console": {"BACKEND": "django.core.mail.backends.console.EmailBackend"},
    }
    message = only("robust_mail.E010")
    assert "'ses', which is not in MAILERS" in message.msg
    assert "'console'" in (message.hint or "")


@needs_mailers
def test_e010_mailer_provider_delegating_to_itself(settings: Any) -> None:
    settings.MAILERS = {
        "default": {"BACKEND": ROBUST, "OPTIONS": {"providers": [{"mailer": "default"}]}}
    }
    assert "its own mailer" in only("robust_mail.E010").msg


@needs_mailers
def test_mailer_provider_naming_another_alias_passes(settings: Any) -> None:
    settings.MAILERS = {
        "default": {"BACKEND": ROBUST, "OPTIONS": {"providers": ["smtp://h", {"mailer": "ses"}]}},
        "ses": {"BACKEND": "django.core.mail.backends.locmem.EmailBackend"},
    }
    assert ids() == []


def test_e011_ssl_file_missing(settings: Any, tmp_path: Path) -> None:
    present = tmp_path / "ca.pem"
    present.write_text("not checked for content")
    missing = tmp_path / "client.pem"
    settings.ROBUST_MAIL = {
        "PROVIDERS": [{"HOST": "h", "SSL_CAFILE": str(present), "SSL_CERTFILE": str(missing)}]
    }
    message = only("robust_mail.E011")
    assert "SSL_CERTFILE" in message.msg
    assert str(missing) in message.msg
    assert "PEM file" in (message.hint or "")


def test_e011_ssl_file_that_is_not_pem_is_reported_not_failed_at_every_send(
    settings: Any, tmp_path: Path
) -> None:
    # The file exists, so the old isfile() test passed; every TLS connection then failed.
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    settings.ROBUST_MAIL = {
        "PROVIDERS": [{"HOST": "h", "USE_TLS": True, "SSL_CAFILE": str(not_pem)}]
    }
    message = only("robust_mail.E011")
    assert "cannot be loaded" in message.msg and "SSL_CAFILE" in message.msg
    assert "PEM" in (message.hint or "")


def test_e011_loadable_ssl_files_pass(settings: Any, certs: Any) -> None:
    # The test CA as an extra trust anchor, the server's pair as a client certificate.
    settings.ROBUST_MAIL = {
        "PROVIDERS": [
            {
                "HOST": "h",
                "USE_TLS": True,
                "SSL_CAFILE": certs.ca_file,
                "SSL_CERTFILE": certs.cert_file,
                "SSL_KEYFILE": certs.key_file,
            }
        ]
    }
    assert "robust_mail.E011" not in ids()


def test_e011_a_key_that_does_not_match_its_certificate(
    settings: Any, certs: Any, tmp_path: Path
) -> None:
    settings.ROBUST_MAIL = {
        "PROVIDERS": [{"HOST": "h", "SSL_CERTFILE": certs.cert_file, "SSL_KEYFILE": certs.ca_file}]
    }
    assert "cannot be loaded" in only("robust_mail.E011").msg


# --- warnings -------------------------------------------------------------------------


def test_w001_console_fallback_without_debug(settings: Any) -> None:
    settings.ROBUST_MAIL = {"FALLBACK": "console"}
    settings.DEBUG = False
    message = only("robust_mail.W001")
    assert "printed to the console, not sent" in message.msg
    assert "'outbox'" in (message.hint or "")


def test_console_fallback_with_debug_is_fine(settings: Any) -> None:
    settings.ROBUST_MAIL = {"FALLBACK": "console"}
    settings.DEBUG = True
    assert ids() == []


def test_w002_password_over_plain_text_to_a_remote_host(settings: Any) -> None:
    settings.ROBUST_MAIL = {
        "PROVIDERS": [
            f"smtp://user:{SECRET}@smtp.example.com",
            f"smtp://user:{SECRET}@127.0.0.1:2525",  # local: fine
            f"smtp+tls://user:{SECRET}@smtp2.example.com",  # TLS: fine
        ]
    }
    message = only("robust_mail.W002")
    assert "'smtp.example.com'" in message.msg
    assert SECRET not in message.msg
    assert "USE_TLS" in (message.hint or "")


def test_w003_timeout_not_shorter_than_the_deadline(settings: Any) -> None:
    settings.ROBUST_MAIL = {
        "PROVIDERS": [
            "smtp://127.0.0.1:2525?timeout=30&name=slow",
            "smtp://127.0.0.1:2526?timeout=5&name=fine",
        ],
        "RETRY": {"DEADLINE": 30},
    }
    message = only("robust_mail.W003")
    assert "'slow'" in message.msg and "(30s)" in message.msg
    assert "DEADLINE" in (message.hint or "")


def test_w004_redis_cache_without_socket_timeouts(settings: Any) -> None:
    redis = "django.core.cache.backends.redis.RedisCache"
    settings.ROBUST_MAIL = {"PROVIDERS": ["smtp://127.0.0.1:2525"]}
    settings.CACHES = {"default": {"BACKEND": redis, "LOCATION": "redis://127.0.0.1:1"}}
    message = only("robust_mail.W004")
    assert "socket_timeout" in (message.hint or "")

    settings.CACHES = {
        "default": {
            "BACKEND": redis,
            "LOCATION": "redis://127.0.0.1:1",
            "OPTIONS": {"socket_timeout": 0.5, "socket_connect_timeout": 0.5},
        }
    }
    assert "robust_mail.W004" not in ids()


DJANGO_REDIS = "django_redis.cache.RedisCache"
BUILTIN_REDIS = "django.core.cache.backends.redis.RedisCache"
BOTH_IN_URL = "redis://127.0.0.1:1/0?socket_timeout=0.5&socket_connect_timeout=0.5"


@pytest.mark.parametrize(
    "cache",
    [
        # django-redis reads its OPTIONS in upper case.
        {"BACKEND": DJANGO_REDIS, "LOCATION": "redis://127.0.0.1:1/0", "OPTIONS": {
            "SOCKET_TIMEOUT": 0.5, "SOCKET_CONNECT_TIMEOUT": 0.5}},
        # redis-py's from_url reads the timeouts from LOCATION's query, for either backend.
        {"BACKEND": BUILTIN_REDIS, "LOCATION": BOTH_IN_URL},
        {"BACKEND": DJANGO_REDIS, "LOCATION": BOTH_IN_URL},
        {"BACKEND": BUILTIN_REDIS, "LOCATION": [BOTH_IN_URL, BOTH_IN_URL.replace(":1/", ":2/")]},
        {"BACKEND": BUILTIN_REDIS, "LOCATION": "redis://h:1?socket_timeout=0.5",
         "OPTIONS": {"socket_connect_timeout": 0.5}},
    ],
)  # fmt: skip
def test_w004_accepts_timeouts_where_the_backend_reads_them(settings: Any, cache: Any) -> None:
    settings.ROBUST_MAIL = {"PROVIDERS": ["smtp://127.0.0.1:2525"]}
    settings.CACHES = {"default": cache}
    assert "robust_mail.W004" not in ids()


@pytest.mark.parametrize(
    ("cache", "hint"),
    [
        # Lower case is what Django's RedisCache wants, but django-redis ignores it.
        ({"BACKEND": DJANGO_REDIS, "LOCATION": "redis://h:1", "OPTIONS": {
            "socket_timeout": 0.5, "socket_connect_timeout": 0.5}}, "'SOCKET_TIMEOUT': 0.5"),
        ({"BACKEND": BUILTIN_REDIS, "LOCATION": "redis://h:1", "OPTIONS": {
            "SOCKET_TIMEOUT": 0.5, "SOCKET_CONNECT_TIMEOUT": 0.5}}, "'socket_timeout': 0.5"),
        # One of two locations without them.
        ({"BACKEND": BUILTIN_REDIS, "LOCATION": [BOTH_IN_URL, "redis://h:2"]}, "LOCATION"),
    ],
)  # fmt: skip
def test_w004_hint_names_the_keys_this_backend_reads(settings: Any, cache: Any, hint: str) -> None:
    settings.ROBUST_MAIL = {"PROVIDERS": ["smtp://127.0.0.1:2525"]}
    settings.CACHES = {"default": cache}
    assert hint in (only("robust_mail.W004").hint or "")


# --- which configurations are checked -------------------------------------------------


@needs_mailers
def test_mailers_aliases_with_other_backends_are_not_checked(settings: Any) -> None:
    settings.MAILERS = {
        "default": {"BACKEND": ROBUST, "OPTIONS": {"providers": ["smtp://h"]}},
        "other": {"BACKEND": "some.Backend", "OPTIONS": {"retry": "anything"}},
    }
    assert ids() == []


@needs_mailers
def test_every_robust_mailers_alias_is_checked(settings: Any) -> None:
    settings.MAILERS = {
        "default": {"BACKEND": ROBUST, "OPTIONS": {"providers": ["smtp://h"], "fallback": "x"}},
        "bulk": {"BACKEND": OUTBOX, "OPTIONS": {"providers": ["smtp://h"], "pool": {"size": 0}}},
    }
    found = {m.id: m.msg for m in messages()}
    assert "MAILERS['default']" in found["robust_mail.E006"]
    assert "MAILERS['bulk']" in found["robust_mail.E008"]


@pytest.mark.skipif(django.VERSION >= (6, 1), reason="Django 6.1 reads MAILERS")
def test_w005_mailers_before_django_6_1_is_ignored_and_said_so(
    settings: Any, smtp_server: Any, robust: Any
) -> None:
    # Written ahead of an upgrade: Django ignores it, so robust_mail must not read its
    # providers from there and leave the classic backend with none.
    from django.core.mail import send_mail

    from tests.conftest import provider

    server = smtp_server()
    robust([provider(server, "classic")])
    settings.MAILERS = {"default": {"BACKEND": ROBUST, "OPTIONS": {"providers": []}}}

    message = only("robust_mail.W005")
    assert "does not read it" in message.msg
    assert send_mail("s", "b", "f@example.com", ["t@example.com"]) == 1
    assert len(server.messages) == 1


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("smtp://apikey:" + SECRET + "@smtp.sendgrid.net:587", "not a URL or user@host"),
        ("apikey:" + SECRET + "@smtp.sendgrid.net", "not a URL or user@host"),
        ("smtp.example.com:587", "without a port"),
    ],
    ids=["url", "user-at-host", "host-port"],
)
def test_e008_host_must_be_a_host_alone_and_a_password_in_it_is_not_shown(
    settings: Any, given: str, expected: str
) -> None:
    # Accepted, the provider's name, metric labels and log lines would carry the password.
    settings.ROBUST_MAIL = {"PROVIDERS": [{"HOST": given}]}
    message = only("robust_mail.E008")
    assert expected in message.msg
    assert "PORT" in (message.hint or "")
    assert SECRET not in message.msg + (message.hint or "")

    settings.ROBUST_MAIL = None
    del settings.ROBUST_MAIL
    settings.EMAIL_HOST = given
    assert expected in only("robust_mail.E008").msg


def test_ipv6_hosts_are_still_accepted(settings: Any) -> None:
    settings.ROBUST_MAIL = {
        "PROVIDERS": [
            {"HOST": "::1", "FORCE_IPV4": False},
            {"NAME": "b", "HOST": "[::1]", "FORCE_IPV4": False},
        ]
    }
    assert messages() == []


@needs_mailers
def test_e012_one_provider_name_for_two_servers_across_mailers(settings: Any) -> None:
    # Breakers are keyed by name: one failing server would stop sends to the other.
    settings.MAILERS = {
        "default": {"BACKEND": ROBUST, "OPTIONS": {"providers": ["smtp://h1?name=primary"]}},
        "bulk": {"BACKEND": OUTBOX, "OPTIONS": {"providers": ["smtp://h2?name=primary"]}},
    }
    message = only("robust_mail.E012")
    assert "'primary'" in message.msg and "MAILERS['bulk']" in message.msg
    assert "NAME" in (message.hint or "")

    settings.MAILERS["bulk"]["OPTIONS"]["providers"] = ["smtp://h1?name=primary"]
    assert "robust_mail.E012" not in ids()  # the same server: one breaker is right


@needs_mailers
def test_e012_one_provider_name_for_two_accounts_on_one_server(settings: Any) -> None:
    # One account's bad password would open the breaker the other account's mail uses.
    settings.MAILERS = {
        "default": {"BACKEND": ROBUST, "OPTIONS": {"providers": ["smtp://a:x@h1?name=p"]}},
        "bulk": {"BACKEND": OUTBOX, "OPTIONS": {"providers": ["smtp://b:y@h1?name=p"]}},
    }

    message = only("robust_mail.E012")

    assert "servers or accounts" in message.msg and "USERNAME" in (message.hint or "")


@needs_mailers
def test_e010_mailer_provider_delegating_to_another_robust_alias(settings: Any) -> None:
    # Each delegating to the other loops; one way only, its Message-ID is not ours.
    settings.MAILERS = {
        "default": {"BACKEND": ROBUST, "OPTIONS": {"providers": [{"mailer": "bulk"}]}},
        "bulk": {"BACKEND": OUTBOX, "OPTIONS": {"providers": ["smtp://h"]}},
    }
    message = only("robust_mail.E010")
    assert "'bulk', which is itself robust_mail's" in message.msg
