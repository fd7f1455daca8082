"""Settings → frozen dataclasses: provider URLs, defaults, both forms, caching, errors."""

from __future__ import annotations

import sys
from dataclasses import FrozenInstanceError
from typing import Any

import django
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from robust_mail.conf import (
    BreakerConfig,
    ConfigurationError,
    DNSConfig,
    OTPConfig,
    OutboxConfig,
    PoolConfig,
    RateLimitConfig,
    RetryConfig,
    get_config,
    read_config,
    validate,
)
from robust_mail.exceptions import RobustMailError
from robust_mail.providers import (
    ProviderConfig,
    ProviderURLError,
    mask_password,
    parse_bool,
    parse_provider_url,
)
from tests.conftest import needs_mailers

SECRET = "s3cr3t-Pa55"


def codes(problems: list[Any]) -> list[str]:
    return [p.code for p in problems]


# --- provider URLs --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "smtp://mail.example.com",
            {"NAME": "mail.example.com", "HOST": "mail.example.com", "PORT": 25},
        ),
        (
            "smtp+tls://user:pass@smtp.example.com",
            {"PORT": 587, "USE_TLS": True, "USE_SSL": False, "USERNAME": "user"},
        ),
        ("smtps://smtp.example.com", {"PORT": 465, "USE_TLS": False, "USE_SSL": True}),
        ("smtps://smtp.example.com:2465", {"PORT": 2465, "USE_SSL": True}),
        (
            "smtp+tls://us%40er%2Bx:p%40ss%3Aw%2Ford%20x@smtp.example.com",
            {"USERNAME": "us@er+x", "PASSWORD": "p@ss:w/ord x"},
        ),
        ("smtp://[::1]:2525", {"HOST": "::1", "PORT": 2525, "NAME": "::1"}),
        ("SMTP+TLS://Smtp.Example.COM", {"HOST": "smtp.example.com", "USE_TLS": True}),
        ("smtp://127.0.0.1:2525/", {"HOST": "127.0.0.1", "PORT": 2525}),
        (
            "smtp://h.example?name=backup&timeout=2.5&force_ipv4=no&ssl_cafile=/etc/ca%20x.pem",
            {"NAME": "backup", "TIMEOUT": 2.5, "FORCE_IPV4": False, "SSL_CAFILE": "/etc/ca x.pem"},
        ),
        (
            "smtps://u:p@h.example?ssl_certfile=/c.pem&ssl_keyfile=/k.pem&force_ipv4=TRUE",
            {"SSL_CERTFILE": "/c.pem", "SSL_KEYFILE": "/k.pem", "FORCE_IPV4": True},
        ),
        ("smtp+tls://h.example?chunking=no", {"CHUNKING": False}),
    ],
)
def test_provider_url_is_parsed_into_provider_keys(url: str, expected: dict[str, Any]) -> None:
    parsed = parse_provider_url(url, index=0)
    for key, value in expected.items():
        assert parsed[key] == value, key


def test_provider_url_without_credentials_has_empty_user_and_password() -> None:
    parsed = parse_provider_url("smtp://mail.example.com", index=0)
    assert parsed["USERNAME"] == ""
    assert parsed["PASSWORD"] == ""
    assert "TIMEOUT" not in parsed  # left to the configuration's default
    assert "FORCE_IPV4" not in parsed  # None: defers to the global FORCE_IPV4


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (f"http://user:{SECRET}@mail.example.com", "unknown scheme 'http'"),
        (f"smtp+ssl://user:{SECRET}@mail.example.com", "unknown scheme"),
        (f"user:{SECRET}@mail.example.com", "not a URL"),
        (f"smtp://user:{SECRET}@mail.example.com?foo=1", "unknown query key 'foo'"),
        (f"smtp://user:{SECRET}@mail.example.com?port=26", "unknown query key 'port'"),
        (f"smtp://user:{SECRET}@mail.example.com?name=a&name=b", "given twice"),
        (f"smtp://user:{SECRET}@mail.example.com:0", "port must be"),
        (f"smtp://user:{SECRET}@mail.example.com:70000", "port must be"),
        (f"smtp://user:{SECRET}@mail.example.com:abc", "port must be"),
        (f"smtp://user:{SECRET}@mail.example.com?timeout=soon", "timeout must be a number"),
        (f"smtp://user:{SECRET}@mail.example.com?timeout=inf", "finite"),
        (f"smtp://user:{SECRET}@mail.example.com?force_ipv4=maybe", "true/false"),
        (f"smtp://user:{SECRET}@mail.example.com?name=", "empty value"),
        (f"smtp://user:{SECRET}@", "no host"),
        (f"smtp://user:{SECRET}@[::1", "IPv6"),
        # Unencoded '/', '#' in a password: the rest would be read as a path or fragment.
        (f"smtp://user:ab/{SECRET}@mail.example.com", "percent-encode"),
        (f"smtp://user:ab#{SECRET}@mail.example.com", "percent-encode"),
        (f"smtp://user:{SECRET}@mail.example.com/path", "unexpected path"),
        # An unencoded '?' made the password look like a port ("port must be a number").
        (f"smtp+tls://user:{SECRET}?pass@smtp.example.com:587", "percent-encode it (%3F)"),
        (f"smtp+tls://user:123?{SECRET}@smtp.example.com", "percent-encode it (%3F)"),
        (f"smtp://user:ab/{SECRET}@mail.example.com:25?name=x", "percent-encode it (%2F)"),
        (f"smtp://user:ab#{SECRET}@[::1]:25", "percent-encode it (%23)"),
        # An '@' in a query value is not a credential separator.
        ("smtp://h.example?ssl_cafile=/c/a@b.pem&foo=1", "unknown query key 'foo'"),
    ],
)
def test_bad_provider_url_is_a_value_error_that_never_shows_the_password(
    url: str, reason: str
) -> None:
    with pytest.raises(ValueError, match="provider URL #3") as caught:
        parse_provider_url(url, index=3)
    assert isinstance(caught.value, ProviderURLError)
    assert reason in caught.value.reason
    assert SECRET not in str(caught.value)
    assert SECRET not in caught.value.url


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("smtp://user:pw@host", "smtp://user:***@host"),
        ("smtp://user@host", "smtp://user@host"),
        ("smtp://host:25", "smtp://host:25"),
        ("smtp://u:p@ss/w#rd@host:25?name=x", "smtp://u:***@host:25?name=x"),
        ("not a url", "not a url"),
    ],
)
def test_mask_password_hides_everything_that_could_be_the_password(url: str, masked: str) -> None:
    assert mask_password(url) == masked


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("1", True),
        ("yes", True),
        ("True", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("NO", False),
    ],
)
def test_url_booleans_accept_only_true_false_1_0_yes_no(text: str, value: bool) -> None:
    assert parse_bool(text) is value


@pytest.mark.parametrize("text", ["on", "off", "y", "", "2", "truthy"])
def test_url_booleans_reject_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="true/false"):
        parse_bool(text)


def test_provider_config_is_frozen_hashable_and_never_shows_its_password() -> None:
    provider = ProviderConfig(name="p", host="::1", port=2525, username="u", password=SECRET)
    assert SECRET not in repr(provider)
    assert hash(provider) == hash(ProviderConfig("p", "::1", 2525, "u", SECRET))
    assert provider.safe_url == "smtp://u@[::1]:2525"
    with pytest.raises(FrozenInstanceError):
        provider.port = 25  # type: ignore[misc]


# --- defaults and the EMAIL_* fallback ------------------------------------------------


def test_defaults_are_the_documented_ones() -> None:
    config = get_config()
    assert config.force_ipv4 is True
    assert config.fallback is None
    assert config.cache == "default"
    assert config.dns == DNSConfig(nameservers=None, port=53, timeout=2.0, stale_ttl=86400.0)
    assert config.retry == RetryConfig(attempts=3, backoff=1.0, max_backoff=4.0, deadline=30.0)
    assert config.breaker == BreakerConfig(failure_threshold=5, reset_timeout=60.0)
    assert config.pool == PoolConfig(size=5, idle_timeout=60.0, max_messages=None)
    assert config.outbox == OutboxConfig(
        retry_schedule=(60, 300, 1800, 7200, 21600), max_age=259200, lease=300, batch=100
    )
    assert config.rate_limits == RateLimitConfig(global_rate=None, per_recipient=None)
    assert config.otp == OTPConfig(
        length=6, ttl=600, max_attempts=3, cooldown=60, max_per_hour=5, max_per_day=10,
        secret=None, alphabet="digits", max_per_ip_per_hour=20, store=None,
    )  # fmt: skip


def test_without_providers_one_provider_is_built_from_django_email_settings() -> None:
    # tests/settings.py: EMAIL_HOST 127.0.0.1, EMAIL_PORT 1, EMAIL_TIMEOUT 5, ROBUST_MAIL {}.
    (provider,) = get_config().providers
    assert provider == ProviderConfig(name="default", host="127.0.0.1", port=1, timeout=5.0)


@override_settings(
    ROBUST_MAIL={"FORCE_IPV4": False},
    EMAIL_HOST="smtp.example.com",
    EMAIL_PORT=465,
    EMAIL_HOST_USER="me",
    EMAIL_HOST_PASSWORD=SECRET,
    EMAIL_USE_TLS=False,
    EMAIL_USE_SSL=True,
    EMAIL_TIMEOUT=None,
    EMAIL_SSL_CAFILE="/etc/ca.pem",
    EMAIL_SSL_CERTFILE="/etc/cert.pem",
    EMAIL_SSL_KEYFILE="/etc/key.pem",
)
def test_email_settings_fallback_takes_every_email_setting_and_bounds_the_timeout() -> None:
    (provider,) = get_config().providers
    assert provider == ProviderConfig(
        name="default", host="smtp.example.com", port=465, username="me", password=SECRET,
        use_tls=False, use_ssl=True, timeout=10.0, ssl_cafile="/etc/ca.pem",
        ssl_certfile="/etc/cert.pem", ssl_keyfile="/etc/key.pem", force_ipv4=False,
    )  # fmt: skip


def test_chunking_is_on_unless_a_provider_turns_it_off(settings: Any) -> None:
    # BDAT is used only where the server offers CHUNKING; CHUNKING False is the way out
    # for a provider whose BDAT is broken.
    settings.ROBUST_MAIL = {
        "PROVIDERS": [
            {"HOST": "a.example"},
            {"HOST": "b.example", "CHUNKING": False},
            "smtp://c.example?chunking=false",
        ]
    }
    assert [p.chunking for p in get_config().providers] == [True, False, False]
    settings.ROBUST_MAIL = {"PROVIDERS": [{"HOST": "a.example", "CHUNKING": "sometimes"}]}
    problems = validate()
    assert any("CHUNKING" in str(p) for p in problems), [str(p) for p in problems]


@override_settings(EMAIL_USE_TLS=True, EMAIL_USE_SSL=True, EMAIL_HOST_PASSWORD=SECRET)
def test_email_settings_errors_name_the_django_setting() -> None:
    with pytest.raises(ConfigurationError, match=r"settings\.EMAIL_USE_TLS") as caught:
        get_config()
    assert codes(list(caught.value.problems)) == ["E002"]
    assert SECRET not in str(caught.value)


@override_settings(
    ROBUST_MAIL={"PROVIDERS": ["smtp://relay.example.com"]}, EMAIL_USE_TLS=True, EMAIL_USE_SSL=True
)
def test_explicit_providers_ignore_email_settings() -> None:
    assert [p.name for p in get_config().providers] == ["relay.example.com"]


@override_settings(EMAIL_HOST="")
def test_no_providers_and_no_email_host_is_an_error() -> None:
    with pytest.raises(ConfigurationError, match="EMAIL_HOST is empty"):
        get_config()


@needs_mailers
@override_settings(MAILERS={}, ROBUST_MAIL={"OTP": {"LENGTH": 8}})
def test_with_mailers_the_classic_form_has_no_providers_and_never_invents_one() -> None:
    # Django 6.1: the backends take providers from MAILERS OPTIONS; ROBUST_MAIL still
    # carries the settings that are not per mailer.
    config = get_config()
    assert config.providers == ()
    assert config.otp.length == 8


# --- the classic form -----------------------------------------------------------------


def test_full_classic_configuration_is_read(settings: Any) -> None:
    settings.ROBUST_MAIL = {
        "PROVIDERS": [
            {"NAME": "primary", "HOST": "smtp.example.com", "PORT": 587, "USERNAME": "u",
             "PASSWORD": SECRET, "USE_TLS": True, "USE_SSL": False, "TIMEOUT": 7,
             "SSL_CAFILE": None, "SSL_CERTFILE": None, "SSL_KEYFILE": None, "FORCE_IPV4": None},
            "smtp+tls://user:pass@smtp.backup.example:587?name=backup&force_ipv4=false",
        ],
        "FORCE_IPV4": True,
        "DNS": {"NAMESERVERS": ["127.0.0.1"], "PORT": 5353, "TIMEOUT": 0.5, "STALE_TTL": 0},
        "RETRY": {"ATTEMPTS": 1, "BACKOFF": 0, "MAX_BACKOFF": 0, "DEADLINE": 5},
        "CIRCUIT_BREAKER": {"FAILURE_THRESHOLD": 2, "RESET_TIMEOUT": 1.5},
        "POOL": {"SIZE": 1, "IDLE_TIMEOUT": 5, "MAX_MESSAGES": 100},
        "FALLBACK": "outbox",
        "CACHE": "default",
        "OUTBOX": {"RETRY_SCHEDULE": [1, 2], "MAX_AGE": 60, "LEASE": 0.5, "BATCH": 10},
        "RATE_LIMITS": {"GLOBAL": "100/h", "PER_RECIPIENT": "5 / m"},
        "OTP": {"LENGTH": 8, "TTL": 300, "MAX_ATTEMPTS": 5, "COOLDOWN": 0, "MAX_PER_HOUR": 3,
                "MAX_PER_DAY": 6, "SECRET": "otp-key", "ALPHABET": "alphanumeric",
                "MAX_PER_IP_PER_HOUR": 50},
    }  # fmt: skip
    config = get_config()
    primary, backup = config.providers
    assert primary == ProviderConfig(
        name="primary", host="smtp.example.com", port=587, username="u", password=SECRET,
        use_tls=True, timeout=7.0, force_ipv4=True,
    )  # fmt: skip
    assert (backup.name, backup.port, backup.use_tls, backup.force_ipv4) == (
        "backup",
        587,
        True,
        False,
    )
    assert config.dns == DNSConfig(("127.0.0.1",), 5353, 0.5, 0.0)
    assert config.retry == RetryConfig(1, 0.0, 0.0, 5.0)
    assert config.breaker == BreakerConfig(2, 1.5)
    assert config.pool == PoolConfig(1, 5.0, 100)
    assert config.fallback == "outbox"
    assert config.outbox == OutboxConfig((1.0, 2.0), 60.0, 0.5, 10)
    assert config.rate_limits == RateLimitConfig("100/h", "5/m")
    assert config.otp.alphabet == "alphanumeric"
    assert config.otp.max_per_ip_per_hour == 50
    assert config.otp.secret == "otp-key"
    assert "otp-key" not in repr(config.otp)


@pytest.mark.parametrize(
    ("provider", "port"),
    [
        ({"HOST": "h"}, 25),
        ({"HOST": "h", "USE_TLS": True}, 587),
        ({"HOST": "h", "USE_SSL": True}, 465),
    ],
)
def test_provider_dict_port_defaults_to_the_tls_mode(
    settings: Any, provider: dict[str, Any], port: int
) -> None:
    settings.ROBUST_MAIL = {"PROVIDERS": [provider]}
    assert get_config().providers[0].port == port


def test_provider_force_ipv4_none_defers_to_the_global_setting(settings: Any) -> None:
    settings.ROBUST_MAIL = {
        "FORCE_IPV4": False,
        "PROVIDERS": [
            {"NAME": "a", "HOST": "a.example", "FORCE_IPV4": None},
            {"NAME": "b", "HOST": "b.example"},
            {"NAME": "c", "HOST": "c.example", "FORCE_IPV4": True},
        ],
    }
    assert [p.force_ipv4 for p in get_config().providers] == [False, False, True]


def test_unnamed_providers_are_named_after_their_host(settings: Any) -> None:
    settings.ROBUST_MAIL = {
        "PROVIDERS": [{"HOST": "[::1]", "FORCE_IPV4": False}, "smtps://smtp.example.com"]
    }
    assert [p.name for p in get_config().providers] == ["::1", "smtp.example.com"]
    assert get_config().providers[0].host == "::1"


def test_two_unnamed_providers_on_one_host_are_a_duplicate_name(settings: Any) -> None:
    settings.ROBUST_MAIL = {"PROVIDERS": ["smtp://mx.example", "smtps://mx.example"]}
    with pytest.raises(ConfigurationError, match=r"two providers named 'mx\.example'") as caught:
        get_config()
    assert codes(list(caught.value.problems)) == ["E007"]


def test_configuration_error_is_improperly_configured_and_a_robust_mail_error() -> None:
    assert issubclass(ConfigurationError, ImproperlyConfigured)
    assert issubclass(ConfigurationError, RobustMailError)


def test_configuration_error_lists_every_problem_with_its_key(settings: Any) -> None:
    settings.ROBUST_MAIL = {
        "RETRY": {"ATTEMPTS": 0},
        "FALLBACK": "email",
        "PROVIDERS": [{"HOST": "h", "TIMEOUT": None}],
    }
    with pytest.raises(ConfigurationError) as caught:
        get_config()
    message = str(caught.value)
    assert "ROBUST_MAIL['RETRY']['ATTEMPTS'] must be an integer ≥ 1, got 0" in message
    assert "ROBUST_MAIL['FALLBACK']" in message
    assert "ROBUST_MAIL['PROVIDERS'][0]['TIMEOUT']" in message
    assert sorted(codes(list(caught.value.problems))) == ["E005", "E006", "E008"]


@pytest.mark.parametrize(
    "provider",
    [
        {"HOST": "h", "PASSWORD": 123456789},
        {"HOST": "h", "PASSWORD": SECRET, "PORT": "25"},
        {"HOST": "h", "PASSWORD": SECRET, "USE_TLS": True, "USE_SSL": True},
        {"HOST": "h", "PASSWORD": SECRET, "TIMEOUT": 0},
        f"smtp://u:{SECRET}@h?timeout=0",
        f"smtp://u:{SECRET}@h:bad",
        f"smtp://u:ab/{SECRET}@h",
    ],
)
def test_configuration_errors_never_show_a_password(settings: Any, provider: Any) -> None:
    settings.ROBUST_MAIL = {"PROVIDERS": [provider]}
    with pytest.raises(ConfigurationError) as caught:
        get_config()
    assert SECRET not in str(caught.value)
    assert "123456789" not in str(caught.value)


# The same bound for every duration: robust_mail_purge's 100 years. A finite value beyond
# it passed validation, then overflowed ``now +/- timedelta(seconds=...)`` in the worker at
# every claim (OverflowError), or in a send.
TOO_LONG = "at most 3153600000 seconds (100 years)"


@pytest.mark.parametrize(
    ("robust_mail", "label"),
    [
        ({"OUTBOX": {"MAX_AGE": sys.maxsize}}, "ROBUST_MAIL['OUTBOX']['MAX_AGE']"),
        ({"OUTBOX": {"MAX_AGE": 1e11}}, "ROBUST_MAIL['OUTBOX']['MAX_AGE']"),
        ({"OUTBOX": {"LEASE": 1e11}}, "ROBUST_MAIL['OUTBOX']['LEASE']"),
        ({"OUTBOX": {"RETRY_SCHEDULE": [60, 1e11]}}, "ROBUST_MAIL['OUTBOX']['RETRY_SCHEDULE']"),
        ({"RETRY": {"DEADLINE": 1e11}}, "ROBUST_MAIL['RETRY']['DEADLINE']"),
        ({"OTP": {"TTL": sys.maxsize}}, "ROBUST_MAIL['OTP']['TTL']"),
        ({"PROVIDERS": [{"HOST": "h", "TIMEOUT": 1e11}]}, "ROBUST_MAIL['PROVIDERS'][0]['TIMEOUT']"),
        ({"PROVIDERS": ["smtp://h?timeout=1e11"]}, "('smtp://h?timeout=1e11') query 'timeout'"),
    ],
)
def test_a_duration_over_100_years_is_a_configuration_error_naming_the_setting(
    settings: Any, robust_mail: Any, label: str
) -> None:
    settings.ROBUST_MAIL = robust_mail
    with pytest.raises(ConfigurationError) as caught:
        get_config()
    message = str(caught.value)
    assert f"{label} must" in message and TOO_LONG in message
    assert codes(validate()) == ["E008"]


def test_a_duration_of_100_years_is_accepted(settings: Any) -> None:
    hundred_years = 36500 * 86400
    settings.ROBUST_MAIL = {
        "OUTBOX": {"MAX_AGE": hundred_years, "LEASE": hundred_years, "RETRY_SCHEDULE": [60]},
    }
    assert get_config().outbox.max_age == hundred_years


def test_url_provider_range_errors_name_the_url_and_the_query_key(settings: Any) -> None:
    settings.ROBUST_MAIL = {"PROVIDERS": [f"smtp://u:{SECRET}@h?timeout=0"]}
    problems = validate()
    assert codes(problems) == ["E005"]
    assert "ROBUST_MAIL['PROVIDERS'][0] ('smtp://u:***@h?timeout=0') query 'timeout'" in str(
        problems[0]
    )


@pytest.mark.parametrize(
    ("robust_mail", "code", "text"),
    [
        ({"RETRYS": {}}, "E003", "Did you mean 'RETRY'?"),
        ({"retry": {}}, "E003", "Did you mean 'RETRY'?"),
        ({"RETRY": {"ATEMPTS": 2}}, "E003", "Did you mean 'ATTEMPTS'?"),
        ({"PROVIDERS": [{"HOST": "h", "TLS": True}]}, "E003", "Valid keys: NAME, HOST"),
        ({"PROVIDERS": ["ftp://h"]}, "E004", "unknown scheme 'ftp'"),
        ({"PROVIDERS": "smtp://h"}, "E008", "must be a list"),
        ({"PROVIDERS": [42]}, "E008", "provider dict or URL"),
        ({"PROVIDERS": [{"HOST": "h", "TIMEOUT": -1}]}, "E005", "> 0"),
        ({"PROVIDERS": [{"HOST": "h", "TIMEOUT": "10"}]}, "E008", "seconds > 0, got '10'"),
        ({"PROVIDERS": [{"HOST": "h", "SSL_KEYFILE": "/k"}]}, "E008", "SSL_CERTFILE"),
        ({"PROVIDERS": [{"MAILER": "ses", "HOST": "h"}]}, "E008", "no effect"),
        ({"PROVIDERS": [{"HOST": "smtp..example.com"}]}, "E008", "empty label"),
        ({"PROVIDERS": [{"HOST": "[::1]:25"}]}, "E008", "without a port"),
        ({"PROVIDERS": [{"HOST": "fe80::1::2"}]}, "E008", "without a port"),
        ({"PROVIDERS": [{"HOST": ".example.com"}]}, "E008", "empty label"),
        ({"PROVIDERS": ["smtp://smtp..example.com"]}, "E008", "empty label"),
        ({"PROVIDERS": [{"HOST": "a" * 64 + ".example.com"}]}, "E008", "over 63"),
        ({"PROVIDERS": [{"HOST": "h", "PASSWORD": SECRET}]}, "E008", "without a user name"),
        ({"PROVIDERS": [f"smtp+tls://:{SECRET}@h"]}, "E008", "without a user name"),
        (
            {"PROVIDERS": [{"HOST": "h", "USERNAME": "u", "PASSWORD": "pässwörd"}]},
            "E008",
            "['PASSWORD'] has characters that are not ASCII",
        ),
        (
            {"PROVIDERS": ["smtp+tls://j%C3%BCrgen:p@h"]},
            "E008",
            "username has characters that are not ASCII",
        ),
        ({"FALLBACK": "Outbox"}, "E006", "'outbox'"),
        ({"FORCE_IPV4": "yes"}, "E008", "True or False"),
        ({"CACHE": ""}, "E008", "non-empty string"),
        ({"DNS": {"NAMESERVERS": "8.8.8.8"}}, "E008", 'not "192.0.2.53"'),
        ({"DNS": {"NAMESERVERS": ["dns.google"]}}, "E008", "only IP addresses"),
        ({"DNS": {"NAMESERVERS": ["192.0.2.53:53"]}}, "E008", "without a port"),
        ({"DNS": {"PORT": 0}}, "E008", "1 to 65535"),
        ({"RETRY": {"ATTEMPTS": True}}, "E008", "integer"),
        ({"RETRY": {"DEADLINE": float("nan")}}, "E008", "seconds > 0"),
        # Ints too large for a float: reported as too long, not an OverflowError.
        ({"RETRY": {"DEADLINE": 10**400}}, "E008", "at most 3153600000 seconds"),
        ({"PROVIDERS": [{"HOST": "h", "TIMEOUT": 10**400}]}, "E008", "an integer too large"),
        ({"OUTBOX": {"RETRY_SCHEDULE": [60, 10**400]}}, "E008", "each delay at most"),
        ({"OUTBOX": {"LEASE": 10**400}}, "E008", "at most 3153600000 seconds"),
        ({"POOL": {"MAX_MESSAGES": 0}}, "E008", "≥ 1"),
        ({"OUTBOX": {"RETRY_SCHEDULE": []}}, "E008", "non-empty list"),
        ({"RATE_LIMITS": {"GLOBAL": "100/week"}}, "E008", "N/s, N/m, N/h or N/d"),
        ({"RATE_LIMITS": {"PER_RECIPIENT": "0/h"}}, "E008", "'100/h'"),
        ({"OTP": {"ALPHABET": "hex"}}, "E008", "'digits', 'alphanumeric'"),
        ({"OTP": {"LENGTH": 3}}, "E008", "from 4 to 32"),
        ({"OTP": {"SECRET": ""}}, "E008", "got a value of type str"),
        ([("PROVIDERS", [])], "E008", "must be a dict"),
    ],
)
def test_invalid_classic_settings_are_reported_with_a_code_and_an_actionable_text(
    settings: Any, robust_mail: Any, code: str, text: str
) -> None:
    settings.ROBUST_MAIL = robust_mail
    config, problems = read_config()
    assert config is None
    assert code in codes(problems)
    assert any(text in str(p) for p in problems), [str(p) for p in problems]


def test_credential_problems_never_show_the_password(settings: Any) -> None:
    settings.ROBUST_MAIL = {
        "PROVIDERS": [
            {"HOST": "h", "PASSWORD": SECRET},
            {"NAME": "b", "HOST": "h", "USERNAME": "u", "PASSWORD": SECRET + "é"},
        ]
    }
    _, problems = read_config()
    assert len(problems) == 2
    assert not any(SECRET in str(p) for p in problems)


@pytest.mark.skipif(
    django.VERSION >= (6, 1), reason="6.1 deprecates EMAIL_*: only those the project sets"
)
def test_email_settings_assigned_at_run_time_are_read_as_django_reads_them() -> None:
    # As a project loading secrets in AppConfig.ready() does: a plain assignment, which
    # settings.is_overridden() does not report, but Django's SMTP backend reads.
    from django.conf import settings as live

    from robust_mail.conf import clear_cache

    assert live.ROBUST_MAIL == {}  # tests.settings: providers come from EMAIL_*
    saved = live.EMAIL_HOST_USER, live.EMAIL_HOST_PASSWORD
    live.EMAIL_HOST_USER, live.EMAIL_HOST_PASSWORD = "apikey", SECRET
    clear_cache()
    try:
        # Not asserted here: that is_overridden() says no. Alone it does; in the whole
        # suite an override left active by an earlier test makes it say yes.
        provider = get_config().providers[0]
        assert (provider.username, provider.password) == ("apikey", SECRET)
    finally:
        live.EMAIL_HOST_USER, live.EMAIL_HOST_PASSWORD = saved
        clear_cache()


def test_email_host_password_without_user_is_not_used_as_in_django(settings: Any) -> None:
    # Django's SMTP backend logs in only with both; a drop-in replacement must not refuse
    # a configuration Django accepts.
    del settings.ROBUST_MAIL
    settings.EMAIL_HOST_USER = ""
    settings.EMAIL_HOST_PASSWORD = SECRET
    config, problems = read_config()
    assert problems == [] and config is not None


def test_valid_configuration_has_no_problems() -> None:
    assert validate() == []


# --- laziness and the cache -----------------------------------------------------------


def test_config_is_cached_until_a_setting_changes() -> None:
    first = get_config()
    assert get_config() is first
    with override_settings(ROBUST_MAIL={"PROVIDERS": ["smtp://override.example"]}):
        assert [p.name for p in get_config().providers] == ["override.example"]
    assert get_config() == first
    with override_settings(EMAIL_PORT=2525):
        assert get_config().providers[0].port == 2525
    assert get_config().providers[0].port == 1


@pytest.mark.parametrize("options", [None, {"providers": ["smtp://a.example"]}])
def test_a_setting_changed_while_a_config_is_built_is_not_hidden_by_it(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, Any] | None
) -> None:
    # A worker thread builds the configuration from the settings as they were; meanwhile
    # another thread changes a setting (setting_changed clears the cache). What the
    # worker built must not be cached over that change.
    import robust_mail.conf as conf

    real_build = conf._build

    def build_then_settings_change(*args: Any) -> Any:
        built = real_build(*args)
        conf.clear_cache()
        return built

    conf.clear_cache()
    monkeypatch.setattr(conf, "_build", build_then_settings_change)
    stale = get_config(options)
    monkeypatch.setattr(conf, "_build", real_build)
    assert get_config(options) is not stale


def test_settings_fixture_changes_are_seen(settings: Any) -> None:
    assert get_config().retry.attempts == 3
    settings.ROBUST_MAIL = {"RETRY": {"ATTEMPTS": 7}}
    assert get_config().retry.attempts == 7


def test_config_objects_are_frozen() -> None:
    with pytest.raises(FrozenInstanceError):
        get_config().retry.attempts = 9  # type: ignore[misc]


# --- the Django 6.1 MAILERS OPTIONS form ----------------------------------------------


def test_options_form_takes_the_same_keys_in_lower_case() -> None:
    config = get_config(
        {
            "providers": [
                {"name": "main", "host": "127.0.0.1", "port": 2525, "timeout": 3},
                "smtps://u:p@backup.example?name=backup",
                {"mailer": "ses"},
            ],
            "retry": {"attempts": 5},
            "circuit_breaker": {"failure_threshold": 9},
            "fallback": "outbox",
            "rate_limits": {"global": "10/s"},
            "force_ipv4": False,
        },
        alias="default",
    )
    assert [p.name for p in config.providers] == ["main", "backup", "ses"]
    assert config.providers[0] == ProviderConfig(
        name="main", host="127.0.0.1", port=2525, timeout=3.0, force_ipv4=False
    )
    assert config.providers[2].mailer == "ses"
    assert (config.retry.attempts, config.breaker.failure_threshold) == (5, 9)
    assert (config.fallback, config.rate_limits.global_rate) == ("outbox", "10/s")


@override_settings(EMAIL_USE_TLS=True, EMAIL_USE_SSL=True, EMAIL_HOST="never.example")
def test_options_form_never_reads_email_settings() -> None:
    config = get_config({"providers": ["smtp://relay.example"]})
    assert [p.host for p in config.providers] == ["relay.example"]
    with pytest.raises(ConfigurationError, match="OPTIONS']\\['providers'\\] is missing") as caught:
        get_config({}, alias="transactional")
    assert "MAILERS['transactional']" in str(caught.value)
    assert codes(list(caught.value.problems)) == ["E001"]


def test_options_form_rejects_upper_case_keys_with_a_suggestion() -> None:
    problems = validate({"PROVIDERS": ["smtp://h"], "providers": ["smtp://h"]})
    assert codes(problems) == ["E003"]
    assert "Did you mean 'providers'?" in problems[0].hint
    problems = validate({"providers": [{"HOST": "h"}]})
    assert codes(problems) == ["E003"]
    assert "Did you mean 'host'?" in problems[0].hint


def test_options_config_is_cached_per_value_without_mixing_true_and_1() -> None:
    options = {"providers": ["smtp://h"], "force_ipv4": True}
    assert get_config(options) is get_config(dict(options))
    with pytest.raises(ConfigurationError, match="True or False"):
        get_config({"providers": ["smtp://h"], "force_ipv4": 1})


@pytest.mark.parametrize("host", ["mail.example.com.", "localhost", "127.0.0.1", "::1", "[::1]"])
def test_host_names_dns_can_hold_are_accepted(settings: Any, host: str) -> None:
    settings.ROBUST_MAIL = {"PROVIDERS": [{"HOST": host, "FORCE_IPV4": False}]}
    config, problems = read_config()
    assert problems == [] and config is not None


@pytest.mark.parametrize(
    ("robust_mail", "where"),
    [
        ({"PROVIDERS": [{"HOST": "::1"}]}, "['HOST']"),
        ({"PROVIDERS": [{"HOST": "[2001:db8::25]", "FORCE_IPV4": True}]}, "['HOST']"),
        ({"PROVIDERS": ["smtp://[::1]:2525?name=relay"]}, "?name=relay') host"),
        ({"PROVIDERS": [{"HOST": "::1", "FORCE_IPV4": None}], "FORCE_IPV4": True}, "['HOST']"),
    ],
)
def test_an_ipv6_host_with_ipv4_forced_is_reported_not_failed_at_every_send(
    settings: Any, robust_mail: Any, where: str
) -> None:
    # It could never be reached: every send would fail at resolve, provider-fatal.
    settings.ROBUST_MAIL = robust_mail
    config, problems = read_config()
    assert config is None
    assert codes(problems) == ["E008"]
    assert where in problems[0].message and "IPv6 address" in problems[0].message
    assert "FORCE_IPV4 to False" in problems[0].hint


@pytest.mark.parametrize(
    "provider",
    [
        {"HOST": "::1", "FORCE_IPV4": False},
        "smtp://[::1]:2525?name=relay&force_ipv4=false",
    ],
)
def test_an_ipv6_host_with_ipv4_not_forced_is_accepted(settings: Any, provider: Any) -> None:
    settings.ROBUST_MAIL = {"PROVIDERS": [provider]}
    config, problems = read_config()
    assert problems == [] and config is not None
    assert config.providers[0].host == "::1"


def test_an_ipv6_email_host_with_ipv4_forced_is_reported(settings: Any) -> None:
    del settings.ROBUST_MAIL
    settings.EMAIL_HOST = "::1"
    config, problems = read_config()
    assert config is None
    assert "settings.EMAIL_HOST is an IPv6 address" in problems[0].message


def test_a_mailers_alias_cannot_set_otp_which_nothing_would_read() -> None:
    options = {"providers": ["smtp://127.0.0.1:25"], "otp": {"length": 8}}

    config, problems = read_config(options, alias="default")

    assert config is None
    (problem,) = problems
    assert problem.code == "E003"
    assert "MAILERS['default']['OPTIONS']" in str(problem) and "'otp'" in str(problem)
    assert "ROBUST_MAIL['OTP']" in problem.hint
