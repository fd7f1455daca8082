"""OTPService: issuing, verifying and the security properties, through a real SMTP server."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from django.core import serializers
from django.core.management import call_command

from robust_mail.exceptions import DeliveryFailed, RateLimited
from robust_mail.models import OneTimePassword
from robust_mail.otp import (
    ALPHANUMERIC,
    OTPService,
    Reason,
    SecretCode,
    code_keys,
    purge_expired,
)
from tests.test_otp_support import (
    Clock,
    close_cache,
    code_from,
    html_body,
    mail_server,
    text_body,
)

__all__ = ["mail_server"]  # the fixture, imported for the tests below

pytestmark = pytest.mark.django_db

USER = "alice@example.com"


def service(clock: Clock | None = None) -> OTPService:
    return OTPService(clock=clock or Clock())


def test_issued_code_arrives_by_email_and_verifies(mail_server):
    server = mail_server()
    otp = service()

    issued = otp.issue(USER, ip_address="192.0.2.1", user_agent="pytest")

    (received,) = server.messages
    assert received.rcpt_tos == [USER]
    code = code_from(received)
    assert len(code) == 6 and code.isdigit()
    assert code in html_body(received)
    assert code not in received.message["Subject"]
    assert received.message["Subject"] == "Your sign-in code"
    assert issued.sent and issued.code is None
    assert otp.verify(USER, code).ok  # once: see the replay test below


def test_verify_succeeds_then_a_replay_fails(mail_server):
    server = mail_server()
    otp = service()
    otp.issue(USER)
    code = code_from(server.messages[0])

    first = otp.verify(USER, code)
    replay = otp.verify(USER, code)

    assert (first.ok, first.reason) == (True, Reason.OK)
    assert not replay.ok and replay.reason in (Reason.NO_CODE, Reason.INVALID)


def test_identifier_is_case_and_whitespace_insensitive(mail_server):
    server = mail_server()
    otp = service()
    otp.issue("  Alice@Example.COM ")

    # Sent to the address as given (local parts may be case-sensitive), bound to its
    # case-insensitive form.
    assert server.messages[0].rcpt_tos == ["Alice@Example.COM"]
    assert otp.verify("ALICE@example.com", code_from(server.messages[0])).ok


def test_user_object_as_identifier_uses_its_email(mail_server, django_user_model):
    server = mail_server()
    user = django_user_model.objects.create_user("alice", USER, "pw-long-enough-1")
    otp = service()
    otp.issue(user)

    assert otp.verify(user, code_from(server.messages[0])).ok


def test_send_false_returns_the_code_for_the_caller_and_sends_nothing(mail_server):
    server = mail_server()
    otp = service()

    issued = otp.issue("+15550100", purpose="sms", send=False)

    assert server.messages == []
    assert isinstance(issued.code, SecretCode)
    assert "******" in repr(issued.code) and issued.code not in repr(issued)
    assert otp.verify("+15550100", str(issued.code), purpose="sms").ok


def test_alphanumeric_alphabet_has_no_look_alikes_and_ignores_case(mail_server):
    server = mail_server(OTP={"ALPHABET": "alphanumeric", "LENGTH": 8})
    otp = service()
    otp.issue(USER)

    code = code_from(server.messages[0])
    assert len(code) == 8 and set(code) <= set(ALPHANUMERIC)
    assert not set(code) & set("01OIL")
    assert otp.verify(USER, code.lower()).ok


# --- storage: keyed hashes only ------------------------------------------------------


def test_database_holds_a_keyed_hmac_not_the_code_nor_its_plain_hash(mail_server):
    server = mail_server()
    otp = service()
    otp.issue(USER)
    code = code_from(server.messages[0])

    row = OneTimePassword.objects.get()
    assert row.code_hash != code
    assert row.code_hash != hashlib.sha256(code.encode()).hexdigest()
    key = code_keys(otp.config)[0]
    assert key != b"tests-only-not-a-secret"
    data = "\x00".join(("robust_mail.otp", "login", USER, code)).encode()
    assert row.code_hash == hmac.new(key, data, hashlib.sha256).hexdigest()


def test_equal_codes_hash_differently_per_identifier_and_purpose():
    otp = service()

    hashes = {
        otp.hash_code("a@example.com", "login", "123456"),
        otp.hash_code("b@example.com", "login", "123456"),
        otp.hash_code("a@example.com", "password_reset", "123456"),
    }

    assert len(hashes) == 3


def test_database_dump_reveals_no_code(mail_server, capsys):
    server = mail_server()
    otp = service()
    for address in ("a@example.com", "b@example.com", "c@example.com"):
        otp.issue(address)
    codes = [code_from(m) for m in server.messages]

    dumped = serializers.serialize("json", OneTimePassword.objects.all())
    call_command("dumpdata", "robust_mail.OneTimePassword", stdout=None)
    printed = capsys.readouterr().out

    for code in codes:
        assert code not in dumped
        assert code not in printed
    assert "code_hash" in dumped  # the hash is there, and useless without the key


def test_changing_the_secret_invalidates_outstanding_codes(mail_server, settings):
    server = mail_server(OTP={"SECRET": "a" * 40})
    service().issue(USER)
    code = code_from(server.messages[0])

    settings.ROBUST_MAIL = {**settings.ROBUST_MAIL, "OTP": {"SECRET": "b" * 40}}

    assert service().verify(USER, code).reason is Reason.INVALID


def test_rotated_secret_key_in_fallbacks_still_verifies(mail_server, settings):
    server = mail_server()
    service().issue(USER)
    code = code_from(server.messages[0])

    settings.SECRET_KEY_FALLBACKS = [settings.SECRET_KEY]
    settings.SECRET_KEY = "a-new-secret-key-for-the-rotation-test"

    assert service().verify(USER, code).ok


# --- verification rules ----------------------------------------------------------------


def test_wrong_codes_lock_the_code_after_max_attempts(mail_server):
    server = mail_server()
    otp = service()
    otp.issue(USER)
    code = code_from(server.messages[0])
    wrong = "000000" if code != "000000" else "111111"

    reasons = [otp.verify(USER, wrong).reason for _ in range(3)]
    after = otp.verify(USER, code)

    assert reasons == [Reason.INVALID] * 3
    assert (after.ok, after.reason) == (False, Reason.LOCKED)
    assert OneTimePassword.objects.get().attempts == 3


def test_right_code_on_the_last_attempt_still_succeeds(mail_server):
    server = mail_server()
    otp = service()
    otp.issue(USER)
    code = code_from(server.messages[0])
    wrong = "000000" if code != "000000" else "111111"

    otp.verify(USER, wrong)
    otp.verify(USER, wrong)

    assert otp.verify(USER, code).ok


def test_code_expires_after_ttl_with_a_frozen_clock(mail_server):
    server = mail_server(OTP={"TTL": 300})
    clock = Clock()
    otp = service(clock)
    otp.issue(USER)
    code = code_from(server.messages[0])

    clock.advance(300)

    assert otp.verify(USER, code).reason is Reason.EXPIRED


def test_code_is_valid_until_just_before_expiry(mail_server):
    server = mail_server(OTP={"TTL": 300})
    clock = Clock()
    otp = service(clock)
    otp.issue(USER)
    clock.advance(299)

    assert otp.verify(USER, code_from(server.messages[0])).ok


def test_a_new_code_invalidates_the_previous_one(mail_server):
    server = mail_server()
    clock = Clock()
    otp = service(clock)
    otp.issue(USER)
    clock.advance(61)
    otp.issue(USER)
    old, new = (code_from(m) for m in server.messages)

    assert otp.verify(USER, old).reason is Reason.INVALID or old == new
    assert otp.verify(USER, new).ok


def test_codes_are_separate_per_purpose(mail_server):
    server = mail_server()
    otp = service()
    otp.issue(USER, purpose="login")
    otp.issue(USER, purpose="password_reset")
    login, reset = (code_from(m) for m in server.messages)

    assert server.messages[1].message["Subject"] == "Your password reset code"
    assert otp.verify(USER, reset, purpose="password_reset").ok
    assert otp.verify(USER, login, purpose="login").ok


def test_no_code_issued_gives_no_code():
    assert service().verify(USER, "123456").reason is Reason.NO_CODE


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   ",
        "1" * 1000,
        "12345",
        "1234567",
        "\u0661\u0662\u0663\u0664\u0665\u0666",  # Arabic-Indic: isdigit() yes, ASCII no
        "\uff11\uff12\uff13\uff14\uff15\uff16",  # full-width digits
        "12345\x00",
        "abcdef",
        None,
        123456,
        b"123456",
    ],
)
def test_malformed_input_is_invalid_and_never_raises(mail_server, bad):
    mail_server()
    otp = service()
    otp.issue(USER)

    result = otp.verify(USER, bad)

    assert (result.ok, result.reason) == (False, Reason.INVALID)


def test_whitespace_and_dashes_around_a_right_code_are_ignored(mail_server):
    server = mail_server()
    otp = service()
    otp.issue(USER)
    code = code_from(server.messages[0])

    assert otp.verify(USER, f"  {code[:3]} - {code[3:]}\n").ok


@pytest.mark.parametrize("identifier", ["", "   ", "x" * 300, None, 42])
def test_bad_identifiers_verify_as_no_code(identifier):
    assert service().verify(identifier, "123456").reason is Reason.NO_CODE


@pytest.mark.parametrize("identifier", ["", "x" * 300, "not-an-address"])
def test_bad_identifiers_cannot_be_issued_an_email(identifier):
    with pytest.raises(ValueError):
        service().issue(identifier)


@pytest.mark.parametrize("purpose", ["Login", "log in", "", "x" * 65, "login\n", "../etc"])
def test_unknown_purpose_shapes_are_rejected(purpose):
    otp = service()
    with pytest.raises(ValueError):
        otp.issue(USER, purpose=purpose, send=False)
    with pytest.raises(ValueError):
        otp.verify(USER, "123456", purpose=purpose)


def test_projects_may_use_their_own_slug_purposes(mail_server):
    server = mail_server()
    otp = service()
    otp.issue(USER, purpose="email_change")

    assert server.messages[0].message["Subject"] == "Your verification code"
    assert otp.verify(USER, code_from(server.messages[0]), purpose="email_change").ok


# --- issue limits ----------------------------------------------------------------------


def test_cooldown_refuses_a_second_code_then_allows_it(mail_server):
    mail_server()
    clock = Clock()
    otp = service(clock)
    otp.issue(USER)

    clock.advance(20)
    with pytest.raises(RateLimited) as refused:
        otp.issue(USER)
    clock.advance(41)
    otp.issue(USER)

    assert refused.value.retry_after == pytest.approx(40)
    assert OneTimePassword.objects.count() == 2


def test_hourly_limit_per_identifier_counts_every_purpose(mail_server):
    mail_server(OTP={"COOLDOWN": 0, "MAX_PER_HOUR": 3})
    clock = Clock()
    otp = service(clock)
    for purpose in ("login", "password_reset", "login"):
        otp.issue(USER, purpose=purpose)
        clock.advance(600)

    with pytest.raises(RateLimited) as refused:
        otp.issue(USER, purpose="email_change")
    otp.issue("bob@example.com")  # other identifiers are not affected

    # The first of the three leaves the hour 1800 s after it was issued + 1800 s.
    assert refused.value.retry_after == pytest.approx(3600 - 1800)
    clock.advance(refused.value.retry_after + 1)
    otp.issue(USER)


def test_daily_limit_per_identifier(mail_server):
    mail_server(OTP={"COOLDOWN": 0, "MAX_PER_HOUR": 100, "MAX_PER_DAY": 4})
    clock = Clock()
    otp = service(clock)
    for _ in range(4):
        otp.issue(USER)
        clock.advance(3600)

    with pytest.raises(RateLimited) as refused:
        otp.issue(USER)

    assert refused.value.retry_after == pytest.approx(86400 - 4 * 3600)


def test_per_ip_limit_spans_identifiers(mail_server):
    mail_server(OTP={"MAX_PER_IP_PER_HOUR": 2})
    otp = service()
    otp.issue("a@example.com", ip_address="198.51.100.7")
    otp.issue("b@example.com", ip_address="198.51.100.7")

    with pytest.raises(RateLimited):
        otp.issue("c@example.com", ip_address="198.51.100.7")
    otp.issue("c@example.com", ip_address="198.51.100.8")


def test_a_refused_request_keeps_nothing(mail_server):
    server = mail_server()
    otp = service()
    otp.issue(USER)
    code = code_from(server.messages[0])

    with pytest.raises(RateLimited):
        otp.issue(USER)

    assert OneTimePassword.objects.count() == 1
    assert len(server.messages) == 1
    assert otp.verify(USER, code).ok  # the earlier code still works


def test_failed_send_does_not_burn_the_cooldown_or_the_old_code(smtp_server, robust):
    from tests.conftest import provider

    server = smtp_server()
    robust([provider(server, "only")])
    clock = Clock()
    otp = service(clock)
    otp.issue(USER)
    clock.advance(61)

    server.mode = "mail_421"
    with pytest.raises(DeliveryFailed):
        otp.issue(USER)
    server.mode = "accept"

    assert OneTimePassword.objects.count() == 1  # the unsent code was withdrawn
    otp.issue(USER)  # at once: no cooldown was used up by the failed send
    assert OneTimePassword.objects.count() == 2


def test_failed_send_leaves_the_previous_code_working(smtp_server, robust):
    from tests.conftest import provider

    server = smtp_server()
    robust([provider(server, "only")])
    clock = Clock()
    otp = service(clock)
    otp.issue(USER)
    first = code_from(server.messages[0])
    clock.advance(61)

    server.mode = "mail_421"
    with pytest.raises(DeliveryFailed):
        otp.issue(USER)

    assert otp.verify(USER, first).ok


def test_failed_sends_use_up_no_hourly_limit(smtp_server, robust):
    from tests.conftest import provider

    server = smtp_server("mail_421")
    robust(
        [provider(server, "only")],
        OTP={"COOLDOWN": 0, "MAX_PER_HOUR": 2},
        CIRCUIT_BREAKER={"FAILURE_THRESHOLD": 100},
    )
    otp = service()
    for _ in range(5):
        with pytest.raises(DeliveryFailed):
            otp.issue(USER)
    server.mode = "accept"

    otp.issue(USER)
    otp.issue(USER)
    assert len(server.messages) == 2


def test_a_mail_rate_limit_on_the_email_withdraws_the_code(mail_server):
    server = mail_server(RATE_LIMITS={"PER_RECIPIENT": "1/h"}, OTP={"COOLDOWN": 0})
    otp = service()
    otp.issue(USER)

    with pytest.raises(RateLimited):
        otp.issue(USER)

    assert OneTimePassword.objects.count() == 1
    assert otp.verify(USER, code_from(server.messages[0])).ok


# --- verification limits per address ------------------------------------------------


def test_guessing_across_identifiers_from_one_address_is_bounded(mail_server):
    mail_server(OTP={"MAX_PER_IP_PER_HOUR": 2, "MAX_ATTEMPTS": 3, "COOLDOWN": 0})
    otp = service()
    for n in range(4):
        otp.issue(f"user{n}@example.com", send=False)

    reasons = [
        otp.verify(f"user{n}@example.com", "000000", ip_address="203.0.113.9").reason
        for n in range(4)
        for _ in range(2)
    ]

    # 2 codes/hour x 3 attempts = 6 tries an hour from one address, whoever they target.
    assert reasons.count(Reason.LOCKED) == 2
    assert reasons[-2:] == [Reason.LOCKED, Reason.LOCKED]


def test_guessing_from_fresh_ipv6_addresses_of_one_slash_64_is_bounded(mail_server):
    mail_server(OTP={"MAX_PER_IP_PER_HOUR": 2, "MAX_ATTEMPTS": 3, "COOLDOWN": 0})
    otp = service()
    for n in range(4):
        otp.issue(f"user{n}@example.com", send=False)

    # A new interface identifier for every guess: the same /64, so the same budget.
    reasons = [
        otp.verify(f"user{n}@example.com", "000000", ip_address=f"2001:db8:5:6::{n}:{k}").reason
        for n in range(4)
        for k in range(2)
    ]
    elsewhere = otp.verify("user3@example.com", "000000", ip_address="2001:db8:5:7::1")

    assert reasons.count(Reason.LOCKED) == 2
    assert elsewhere.reason is Reason.INVALID


def test_ipv6_issue_limit_and_stored_address_use_the_slash_64(mail_server):
    mail_server(OTP={"MAX_PER_IP_PER_HOUR": 2})
    otp = service()
    otp.issue("a@example.com", ip_address="2001:db8:9:9:1:2:3:4")
    otp.issue("b@example.com", ip_address="2001:db8:9:9:5:6:7:8")

    with pytest.raises(RateLimited):
        otp.issue("c@example.com", ip_address="2001:db8:9:9::c")
    otp.issue("c@example.com", ip_address="192.0.2.77")

    stored = set(OneTimePassword.objects.values_list("ip_address", flat=True))
    assert stored == {"2001:db8:9:9::", "192.0.2.77"}


def test_verify_limit_per_address_fails_open_when_its_cache_is_down(mail_server, settings):
    # Documented trade-off (docs/otp.md, Limits): a dead cache must not lock everyone out;
    # the per-code attempt limit, kept in the store, still holds.
    mail_server(OTP={"MAX_PER_IP_PER_HOUR": 1, "MAX_ATTEMPTS": 3, "COOLDOWN": 0})
    settings.CACHES = {
        **settings.CACHES,
        "dead": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",
            "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
        },
    }
    otp = OTPService(clock=Clock(), cache_alias="dead")
    codes = {n: str(otp.issue(f"user{n}@example.com", send=False).code) for n in range(2)}
    wrong = {n: "000000" if code != "000000" else "111111" for n, code in codes.items()}

    try:
        guesses = [
            otp.verify(f"user{n}@example.com", wrong[n], ip_address="203.0.113.9").reason
            for n in range(2)
            for _ in range(4)
        ]
    finally:
        close_cache("dead")

    # With the cache up, one address would get 1 x 3 tries an hour; down, each code
    # still allows only its own 3.
    assert guesses == [Reason.INVALID] * 3 + [Reason.LOCKED] + [Reason.INVALID] * 3 + [
        Reason.LOCKED
    ]


# --- purge -----------------------------------------------------------------------------


def test_purge_removes_codes_a_day_past_expiry_and_keeps_the_rest(mail_server):
    mail_server(OTP={"COOLDOWN": 0})
    clock = Clock()
    otp = service(clock)
    otp.issue("old@example.com", send=False)
    clock.advance(2 * 86400)
    otp.issue("new@example.com", send=False)

    removed = purge_expired(now=clock())

    assert removed == 1
    assert list(OneTimePassword.objects.values_list("identifier", flat=True)) == ["new@example.com"]


def test_text_and_html_templates_say_how_long_the_code_lasts(mail_server):
    server = mail_server(OTP={"TTL": 900})
    service().issue(USER)

    assert "15 minutes" in text_body(server.messages[0])
    assert "15 minutes" in html_body(server.messages[0])


def test_services_can_be_called_on_the_class_as_design_md_spells_them(smtp_server, robust):
    # DESIGN.md: OTPService.issue(identifier, ...) / .verify(...), without an instance.
    from robust_mail.otp import OTPService
    from tests.conftest import provider

    server = smtp_server()
    robust([provider(server, "only")])

    issued = OTPService.issue("class-call@example.com", send=False)
    result = OTPService.verify("class-call@example.com", str(issued.code))

    assert result.ok
