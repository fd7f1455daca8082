"""Django's error reports (the 500 email, ``AdminEmailHandler``) show no typed code.

A store that fails while a code is being checked raises out of ``verify`` with the code
in its locals; Django's ``ExceptionReporter`` renders every frame's locals unless a
``sensitive_variables`` decorator names them.
"""

from __future__ import annotations

from datetime import datetime
from types import TracebackType
from typing import Any

import pytest
from django.contrib.auth import authenticate
from django.views.debug import ExceptionReporter
from django.views.decorators.debug import sensitive_variables

from robust_mail.auth_backends import EmailCodeAdminLoginForm
from robust_mail.otp import OTPService, SecretCode
from robust_mail.otp_store import DatabaseOTPStore, NewCode

pytestmark = pytest.mark.django_db

EMAIL = "alice@example.com"
STORE = "tests.test_otp_error_reports.FailingStore"
#: A code that cannot occur in a report by chance, nor in this file's source as such.
KNOWN = "".join(("QWER", "TYUP"))


class FailingStore(DatabaseOTPStore):
    """Fails where a right code is being used up: every local of ``verify`` is set."""

    def consume(self, key: str, now: datetime) -> bool:
        raise RuntimeError("the store went away")


@pytest.fixture
def typed(settings: Any) -> str:
    """A live code for EMAIL as a user types it (lower case, a dash): ``abcd-efgh``.

    Eight letters from the alphanumeric alphabet, which no address, timestamp or hex id
    in a report can contain by chance.
    """
    settings.ROBUST_MAIL = {"OTP": {"ALPHABET": "alphanumeric", "LENGTH": 8, "STORE": STORE}}
    settings.AUTHENTICATION_BACKENDS = ["robust_mail.auth_backends.EmailCodeBackend"]
    code = str(OTPService().issue(EMAIL, send=False).code)
    return f"{code[:4]}-{code[4:]}".lower()


def report(excinfo: pytest.ExceptionInfo[BaseException]) -> str:
    """The text and HTML reports Django makes of the exception, DEBUG off (production).

    The test's own frames are left out: they hold the code as the test knows it.
    """
    tb: TracebackType | None = excinfo.tb
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    reporter = ExceptionReporter(None, excinfo.type, excinfo.value, tb)
    return reporter.get_traceback_text() + reporter.get_traceback_html()


@pytest.mark.parametrize("called_on", ["instance", "class"])
def test_verify_keeps_the_code_out_of_error_reports(typed, called_on):
    otp = OTPService() if called_on == "instance" else OTPService  # class_or_instance too

    with pytest.raises(RuntimeError) as excinfo:
        otp.verify(EMAIL, typed)

    text = report(excinfo)
    assert "in verify" in text and "record" in text  # the frame and its locals are there
    assert typed not in text
    assert typed.replace("-", "").upper() not in text  # the normalised candidate


SIGN_IN = {
    "authenticate": lambda email, code: authenticate(None, email=email, code=code),
    "admin_form": lambda email, code: EmailCodeAdminLoginForm(
        None, data={"username": email, "password": code}
    ).is_valid(),
}


@pytest.mark.parametrize("via", SIGN_IN)
def test_sign_in_keeps_the_code_out_of_error_reports(django_user_model, typed, via):
    django_user_model.objects.create_user("alice", EMAIL)

    with pytest.raises(RuntimeError) as excinfo:
        SIGN_IN[via](EMAIL, typed)

    text = report(excinfo)
    assert "in authenticate" in text
    assert typed not in text
    assert typed.replace("-", "").upper() not in text


def test_password_reset_verify_keeps_the_code_out_of_error_reports(django_user_model, settings):
    from robust_mail.password_reset import PasswordResetService

    settings.ROBUST_MAIL = {"OTP": {"ALPHABET": "alphanumeric", "LENGTH": 8, "STORE": STORE}}
    django_user_model.objects.create_user("alice", EMAIL, password="an old password")
    code = str(OTPService().issue(EMAIL, "password_reset", send=False).code).lower()

    with pytest.raises(RuntimeError) as excinfo:
        PasswordResetService.verify(EMAIL, code)

    text = report(excinfo)
    assert "password_reset.py" in text and "in verify" in text
    assert code not in text


def test_password_reset_complete_keeps_the_password_and_token_out_of_error_reports(
    django_user_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import robust_mail.password_reset as password_reset

    user = django_user_model.objects.create_user("alice", EMAIL, password="an old password")
    token = password_reset.PasswordResetService().make_token(user)
    new = "-".join(("Brand", "New", "Passw0rd", "xyz"))  # not in this file's source as such

    @sensitive_variables()  # this stand-in's own frame is not what is tested
    def broken_hasher(password: str) -> str:  # a failure after validation
        raise RuntimeError("the password hasher could not be loaded")

    monkeypatch.setattr(password_reset, "make_password", broken_hasher)
    with pytest.raises(RuntimeError) as excinfo:
        password_reset.PasswordResetService.complete(token, new)

    text = report(excinfo)
    assert "password_reset.py" in text and "in complete" in text
    assert new not in text and token not in text


def test_a_code_email_the_outbox_cannot_store_stays_out_of_error_reports(settings: Any) -> None:
    from django.db import connection

    from robust_mail.exceptions import DeliveryFailed
    from robust_mail.models import OutboxMessage

    settings.ROBUST_MAIL = {"OTP": {"ALPHABET": "alphanumeric", "LENGTH": 8}}
    # Queued only through robust_mail's backend (the test runner's locmem would send it).
    settings.EMAIL_BACKEND = "robust_mail.backends.RobustEmailBackend"
    # A real failure of the INSERT (the table gone), so that Django's own cursor frames,
    # whose locals hold the INSERT's parameters, are in the exception chain.
    table = OutboxMessage._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f'ALTER TABLE "{table}" RENAME TO "{table}_away"')

    class KnownCode(OTPService):
        def generate(self) -> SecretCode:
            return SecretCode(KNOWN)

    with pytest.raises(DeliveryFailed) as excinfo:
        KnownCode().issue(EMAIL, background=True)

    text = report(excinfo)
    assert "in enqueue" in text and "cannot store the message" in text
    assert KNOWN not in text


def test_the_stored_hash_is_in_no_repr(settings: Any) -> None:
    # A hash and the key give the code by trying every one: it stays out of reprs, which
    # error trackers record for every local.
    from robust_mail.otp_cache_store import CacheOTPStore, _CachedCode

    settings.ROBUST_MAIL = {"OTP": {}}
    store = CacheOTPStore("default")
    otp = OTPService(store=store)
    issued = otp.issue(EMAIL, send=False)
    stored = store.latest(EMAIL, "login")
    record = store._record(issued.key)
    assert stored is not None and isinstance(record, _CachedCode)
    new = NewCode(
        identifier=EMAIL,
        purpose="login",
        code_hash=stored.code_hash,
        created_at=stored.created_at,
        expires_at=stored.expires_at,
    )

    for value in (new, stored, record):
        assert stored.code_hash not in repr(value)
        assert "identifier=" in repr(value)  # the rest is still there


def test_verify_keeps_the_stored_hash_out_of_error_reports(settings: Any) -> None:
    from robust_mail.models import OneTimePassword

    settings.ROBUST_MAIL = {"OTP": {"STORE": STORE}}
    issued = OTPService().issue(EMAIL, send=False)
    code_hash = OneTimePassword.objects.get(pk=int(issued.key)).code_hash

    with pytest.raises(RuntimeError) as excinfo:
        OTPService().verify(EMAIL, str(issued.code))

    text = report(excinfo)
    assert "in verify" in text and "in consume" in text
    assert code_hash not in text
