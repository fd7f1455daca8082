"""Sign-in and password reset with a custom user model that has no ``is_active`` field.

AbstractBaseUser gives ``is_active = True`` as a class attribute only: a query filtering on
it raises FieldError, so the account helpers check it in Python for such models.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.auth import authenticate, get_user_model
from django.db import connection

from robust_mail.otp import OTPService
from robust_mail.password_reset import PasswordResetService, ResetTokenInvalid

EMAIL = "alice@example.com"


@pytest.fixture
def member(settings: Any, transactional_db: Any) -> Iterator[Any]:
    """A Member, with ``custom_user.Member`` as AUTH_USER_MODEL and its table created.

    Transactional: SQLite cannot create a table inside the test's transaction."""
    settings.INSTALLED_APPS = [*settings.INSTALLED_APPS, "tests.custom_user"]
    settings.AUTH_USER_MODEL = "custom_user.Member"
    settings.AUTHENTICATION_BACKENDS = ["robust_mail.auth_backends.EmailCodeBackend"]
    settings.ROBUST_MAIL = {"OTP": {"COOLDOWN": 0}}
    model = get_user_model()
    assert model.__name__ == "Member" and not any(
        f.name == "is_active" for f in model._meta.get_fields()
    )
    with connection.schema_editor() as editor:
        editor.create_model(model)
    try:
        yield model.objects.create_user(EMAIL, "an old password")
    finally:
        with connection.schema_editor() as editor:
            editor.delete_model(model)


def test_sign_in_by_code_works_without_an_is_active_field(member):
    code = str(OTPService().issue(member, send=False).code)

    assert authenticate(None, email=EMAIL, code=code) == member


def test_password_reset_works_without_an_is_active_field(member):
    reset = PasswordResetService(background=False)
    code = str(OTPService().issue(member, reset.purpose, send=False).code)

    token = reset.verify(EMAIL, code)
    assert token is not None
    user = reset.complete(token, "A-new-passw0rd-xyz")

    assert user == member
    assert get_user_model().objects.get(pk=member.pk).check_password("A-new-passw0rd-xyz")


def test_a_model_that_says_inactive_without_a_field_is_refused(member, monkeypatch):
    # A property or attribute in place of the field: checked in Python.
    login = str(OTPService().issue(member, send=False).code)
    reset = PasswordResetService(background=False)
    code = str(OTPService().issue(member, reset.purpose, send=False).code)
    token = reset.make_token(member)
    monkeypatch.setattr(type(member), "is_active", False)

    assert authenticate(None, email=EMAIL, code=login) is None
    assert reset.verify(EMAIL, code) is None
    with pytest.raises(ResetTokenInvalid):
        reset.complete(token, "A-new-passw0rd-xyz")
