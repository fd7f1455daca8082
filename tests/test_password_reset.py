"""PasswordResetService: the flow, single use, sessions, and no account enumeration."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.contrib.auth import get_user
from django.core.exceptions import ValidationError
from django.db import connection
from django.http import HttpRequest
from django.test.utils import CaptureQueriesContext

from robust_mail import envelope, outbox, serialization
from robust_mail.exceptions import RateLimited
from robust_mail.models import OneTimePassword
from robust_mail.models.outbox import OutboxMessage
from robust_mail.otp import OTPService, purge_expired
from robust_mail.otp_store import DatabaseOTPStore
from robust_mail.outbox import process_pk
from robust_mail.password_reset import PasswordResetService, ResetTokenInvalid
from tests.test_otp_support import (
    Clock,
    code_from,
    html_body,
    mail_server,
    notices_only,
    text_body,
)

__all__ = ["mail_server"]

pytestmark = pytest.mark.django_db

EMAIL = "alice@example.com"
OLD = "an-old-password-1"
NEW = "a-brand-new-password-2"


@pytest.fixture
def alice(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user("alice", EMAIL, OLD)


def deliver_outbox() -> None:
    """What a worker does: send every queued message (through the real SMTP server)."""
    for pk in OutboxMessage.objects.values_list("pk", flat=True):
        process_pk(pk)


def reset_code(server: Any, reset: PasswordResetService, email: str = EMAIL) -> str:
    reset.initiate(email)
    deliver_outbox()
    return code_from(server.messages[-1])


def test_full_reset_through_the_outbox_and_a_real_smtp_server(mail_server, alice):
    server = mail_server()
    reset = PasswordResetService()

    assert reset.initiate(EMAIL, ip_address="192.0.2.5") is None
    assert server.messages == []  # queued, not sent in the request
    assert OutboxMessage.objects.get().sensitive  # the outbox erases the code once sent
    deliver_outbox()
    (received,) = server.messages
    assert received.message["Subject"] == "Your password reset code"
    token = reset.verify(EMAIL, code_from(received))
    assert token is not None
    user = reset.complete(token, NEW)

    alice.refresh_from_db()
    assert user.pk == alice.pk
    assert alice.check_password(NEW)


def test_wrong_code_gives_no_token(mail_server, alice):
    server = mail_server()
    reset = PasswordResetService()
    code = reset_code(server, reset)

    assert reset.verify(EMAIL, "000000" if code != "000000" else "111111") is None
    assert reset.verify("bob@example.com", code) is None


def test_token_is_single_use(mail_server, alice):
    server = mail_server()
    reset = PasswordResetService()
    token = reset.verify(EMAIL, reset_code(server, reset))
    reset.complete(token, NEW)

    with pytest.raises(ResetTokenInvalid):
        reset.complete(token, "yet-another-password-3")
    alice.refresh_from_db()
    assert alice.check_password(NEW)


def test_code_is_single_use(mail_server, alice):
    server = mail_server()
    reset = PasswordResetService()
    code = reset_code(server, reset)

    assert reset.verify(EMAIL, code) is not None
    assert reset.verify(EMAIL, code) is None


def test_token_dies_when_the_user_signs_in_meanwhile(mail_server, alice, client):
    server = mail_server()
    reset = PasswordResetService()
    token = reset.verify(EMAIL, reset_code(server, reset))

    assert client.login(username="alice", password=OLD)

    with pytest.raises(ResetTokenInvalid):
        reset.complete(token, NEW)


def test_token_expires(mail_server, alice, monkeypatch):
    server = mail_server()
    reset = PasswordResetService(token_max_age=600)
    code = reset_code(server, reset)
    issued_at = time.time() - 601
    with monkeypatch.context() as patch:
        # django.core.signing stamps tokens with time.time(): make this one 601 s old.
        patch.setattr(time, "time", lambda: issued_at)
        token = reset.verify(EMAIL, code)

    with pytest.raises(ResetTokenInvalid):
        reset.complete(token, NEW)


@pytest.mark.parametrize("token", ["", "garbage", "a:b:c", "x" * 5000, None])
def test_malformed_tokens_are_invalid(token):
    with pytest.raises(ResetTokenInvalid):
        PasswordResetService().complete(token, NEW)


def test_password_validators_run_and_a_weak_password_changes_nothing(mail_server, alice, settings):
    settings.AUTH_PASSWORD_VALIDATORS = [
        {
            "NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
            "OPTIONS": {"min_length": 12},
        }
    ]
    server = mail_server()
    reset = PasswordResetService()
    token = reset.verify(EMAIL, reset_code(server, reset))

    with pytest.raises(ValidationError):
        reset.complete(token, "short")

    alice.refresh_from_db()
    assert alice.check_password(OLD)
    reset.complete(token, NEW)  # the token survives a rejected password


def test_old_sessions_are_signed_out(mail_server, alice, client):
    server = mail_server()
    client.force_login(alice)
    session_key = client.session.session_key
    reset = PasswordResetService()

    reset.complete(reset.verify(EMAIL, reset_code(server, reset)), NEW)

    request = HttpRequest()
    request.session = client.session.__class__(session_key)
    assert get_user(request).is_anonymous


def refused_account(users: Any, account: str, address: str) -> None:
    """Accounts that have ``address`` but may not reset a password with it."""
    if account == "shared":
        users.objects.create_user("o1", address, OLD)
        users.objects.create_user("o2", address.upper(), OLD)
        return
    user = users.objects.create_user("o", address, OLD)
    if account == "passwordless":
        user.set_unusable_password()
    else:
        user.is_active = False
    user.save()


def test_several_accounts_sharing_an_address_get_no_code_and_no_token(
    mail_server, alice, django_user_model
):
    django_user_model.objects.create_user("alice2", EMAIL.upper(), OLD)
    server = mail_server()
    clock = Clock()
    reset = PasswordResetService(otp=OTPService(clock=clock))

    reset.initiate(EMAIL)
    deliver_outbox()
    clock.advance(61)
    code = str(reset.otp.issue(EMAIL, "password_reset", send=False).code)

    # Whose password would it reset? Neither: the address is told no code was sent, and
    # no code gives a token.
    assert notices_only(server) == [EMAIL]
    assert reset.verify(EMAIL, code) is None


@pytest.mark.parametrize("account", ["inactive", "passwordless"])
def test_an_account_that_may_not_reset_gets_the_notice_and_no_code(
    mail_server, django_user_model, account
):
    # No code, as Django's PasswordResetForm (an inactive account; one that signs in
    # another way: codes, single sign-on). Mailing nothing took the decoy path, whose
    # timing told these addresses from those without an account: they get the notice.
    refused_account(django_user_model, account, "o@example.com")
    server = mail_server()

    PasswordResetService().initiate("o@example.com")
    deliver_outbox()

    assert notices_only(server) == ["o@example.com"]


@pytest.mark.parametrize("account", ["inactive", "passwordless"])
def test_without_notices_an_account_that_may_not_reset_is_mailed_nothing(
    mail_server, django_user_model, account
):
    refused_account(django_user_model, account, "o@example.com")
    server = mail_server(OTP={"NOTIFY_UNKNOWN": False})

    PasswordResetService().initiate("o@example.com")
    deliver_outbox()

    assert server.messages == []


def test_malformed_address_is_refused_alike(alice):
    with pytest.raises(ValueError):
        PasswordResetService().initiate("not an address")


# --- enumeration -------------------------------------------------------------------------


class Recording(OTPService):
    """Records the work OTPService does, to compare the two paths step by step."""

    def __init__(self, steps: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.steps = steps

    def generate(self) -> Any:
        self.steps.append("generate")
        return super().generate()

    def hash_code(self, identifier: str, purpose: str, code: str) -> str:
        self.steps.append("hash")
        return super().hash_code(identifier, purpose, code)

    def render(self, *args: Any, **kwargs: Any) -> tuple[str, str, str]:
        self.steps.append("render")
        return super().render(*args, **kwargs)


class RecordingStore(DatabaseOTPStore):
    def __init__(self, steps: list[str]) -> None:
        super().__init__()
        self.steps = steps

    def add(self, code: Any, limits: Any) -> str:
        self.steps.append("store.add")
        return super().add(code, limits)

    def activate(self, key: str) -> None:
        self.steps.append("store.activate")
        super().activate(key)


class Work:
    """What one ``initiate`` did: the service's steps, the SQL, MIME builds, JSON payloads."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.sql: list[str] = []
        self.builds = 0
        self.payloads = 0


@pytest.fixture
def measure(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``measure(email)`` runs ``initiate(email)`` and returns the :class:`Work` it did.

    Counts every MIME generation (``envelope._message_bytes``, behind every
    ``build_envelope``) and every outbox payload (``message_to_data``) wherever it is
    called from; both are wrapped, not replaced.
    """
    current: list[Work] = []

    def counting(name: str, target: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            setattr(current[-1], name, getattr(current[-1], name) + 1)
            return target(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(envelope, "_message_bytes", counting("builds", envelope._message_bytes))
    payload = counting("payloads", serialization.message_to_data)
    monkeypatch.setattr(serialization, "message_to_data", payload)
    monkeypatch.setattr(outbox, "message_to_data", payload)

    def run(email: str) -> Work:
        work = Work()
        current.append(work)
        otp = Recording(work.steps, store=RecordingStore(work.steps), clock=Clock())
        with CaptureQueriesContext(connection) as queries:
            assert PasswordResetService(otp=otp).initiate(email) is None
        work.sql = [q["sql"] for q in queries.captured_queries]
        return work

    return run


def _verb(sql: str) -> str:
    return sql.split()[0].upper()


def _inserts(sql: list[str]) -> list[str]:
    return [q.split('"')[1] for q in sql if _verb(q) == "INSERT"]


# With OTP["NOTIFY_UNKNOWN"] (the default) the unknown address is told no code was sent,
# through the same outbox; without it, a decoy row in the code table stands in for the
# outbox row.
PATHS = {True: "robust_mail_outboxmessage", False: "robust_mail_onetimepassword"}


@pytest.mark.parametrize("notify", [True, False], ids=["notice", "decoy"])
def test_unknown_address_gets_the_same_answer_and_the_same_work(
    mail_server, alice, measure, notify
):
    mail_server(OTP={"NOTIFY_UNKNOWN": notify})

    known = measure(EMAIL)
    unknown = measure("nobody@example.com")

    assert known.steps == unknown.steps
    assert known.steps == ["generate", "hash", "store.add", "render", "store.activate"]
    # The same email is built and serialised for the outbox on both paths...
    assert (unknown.builds, unknown.payloads) == (known.builds, known.payloads)
    assert known.builds >= 1 and known.payloads == 1
    # ...and the same statements run, in the same order, each INSERT in a transaction
    # (here a savepoint) of its own.
    assert [_verb(q) for q in known.sql] == [_verb(q) for q in unknown.sql]
    assert _inserts(known.sql) == ["robust_mail_onetimepassword", "robust_mail_outboxmessage"]
    assert _inserts(unknown.sql) == ["robust_mail_onetimepassword", PATHS[notify]]


@pytest.mark.parametrize("notify", [True, False], ids=["notice", "decoy"])
@pytest.mark.parametrize("account", ["passwordless", "inactive", "shared"])
def test_an_address_whose_accounts_may_not_reset_does_the_same_work_as_a_known_one(
    mail_server, alice, measure, django_user_model, notify, account
):
    # No code for these, but the work is the same as for an account that gets its code
    # (and for an address without one), so that the answer tells nothing.
    other = "other@example.com"
    refused_account(django_user_model, account, other)
    mail_server(OTP={"NOTIFY_UNKNOWN": notify})

    known = measure(EMAIL)
    refused = measure(other)

    assert refused.steps == known.steps
    assert (refused.builds, refused.payloads) == (known.builds, known.payloads)
    assert [_verb(q) for q in refused.sql] == [_verb(q) for q in known.sql]
    # The notice's outbox row, as for an unknown address; without notices, the decoy row.
    assert _inserts(refused.sql) == ["robust_mail_onetimepassword", PATHS[notify]]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("notify", [True, False], ids=["notice", "decoy"])
def test_both_paths_commit_the_same_number_of_transactions(mail_server, alice, measure, notify):
    mail_server(OTP={"NOTIFY_UNKNOWN": notify})

    known = measure(EMAIL)
    unknown = measure("nobody@example.com")

    verbs = [_verb(q) for q in known.sql]
    # Outside a test transaction: the code row in a transaction of its own, then the outbox
    # row (or the decoy) as one INSERT in autocommit, with no BEGIN or COMMIT around it —
    # the same statements, in the same order.
    last_insert = len(verbs) - 1 - verbs[::-1].index("INSERT")
    assert verbs.count("COMMIT") == 1
    assert verbs[verbs.index("INSERT") - 1 : verbs.index("INSERT") + 2] == [
        "BEGIN",
        "INSERT",
        "COMMIT",
    ]
    assert "BEGIN" not in verbs[last_insert - 1 : last_insert + 2]
    assert verbs == [_verb(q) for q in unknown.sql]
    assert _inserts(unknown.sql) == ["robust_mail_onetimepassword", PATHS[notify]]


def test_unknown_address_is_told_no_code_was_sent(mail_server, alice):
    server = mail_server()

    PasswordResetService().initiate("nobody@example.com")
    deliver_outbox()

    assert notices_only(server) == ["nobody@example.com"]
    (received,) = server.messages
    assert received.message["Subject"] == "Your password reset request"
    # What was typed is not echoed into the body: it is anyone's text, not the owner's.
    assert "nobody" not in text_body(received) and "nobody" not in html_body(received)


def test_notices_stop_at_the_hourly_cap_and_codes_do_not(mail_server, alice):
    # A flood of typed addresses (a+1@x, a+2@x... one mailbox) must not turn the site into
    # a mail cannon; the answer stays the same, and account holders still get their codes.
    server = mail_server(OTP={"MAX_NOTICES_PER_HOUR": 2})
    reset = PasswordResetService()

    for i in range(4):
        assert reset.initiate(f"victim+{i}@example.org") is None
    reset.initiate(EMAIL)
    deliver_outbox()

    notices = [m for m in server.messages if m.rcpt_tos != [EMAIL]]
    assert sorted(m.rcpt_tos[0] for m in notices) == [
        "victim+0@example.org",
        "victim+1@example.org",
    ]
    (code_mail,) = [m for m in server.messages if m.rcpt_tos == [EMAIL]]
    assert code_from(code_mail)


def test_without_notices_unknown_addresses_get_no_email(mail_server, alice):
    server = mail_server(OTP={"NOTIFY_UNKNOWN": False})

    PasswordResetService().initiate("nobody@example.com")
    deliver_outbox()

    assert server.messages == []


def test_the_decoy_row_is_invisible_and_purged(mail_server, alice, measure):
    mail_server(OTP={"NOTIFY_UNKNOWN": False})

    measure("nobody@example.com")

    (decoy,) = OneTimePassword._base_manager.filter(purpose="")
    assert (decoy.identifier, decoy.code_hash, decoy.ip_address) == ("", "", None)
    assert decoy.invalidated and decoy.consumed_at is not None
    assert decoy.expires_at <= decoy.created_at
    # Hidden from the store, the limits and the admin, which all use the default manager.
    assert list(OneTimePassword.objects.values_list("identifier", flat=True)) == [
        "nobody@example.com"
    ]
    assert purge_expired() == 1
    assert not OneTimePassword._base_manager.filter(purpose="").exists()


def test_limits_apply_to_unknown_addresses_exactly_as_to_known_ones(mail_server, alice):
    mail_server()
    reset = PasswordResetService()

    for email in (EMAIL, "nobody@example.com"):
        reset.initiate(email)
        with pytest.raises(RateLimited) as refused:
            reset.initiate(email)
        assert refused.value.retry_after == pytest.approx(60, abs=1)
