"""A user model as AbstractBaseUser leaves it: ``is_active`` only as a class attribute.

Installed, and made ``AUTH_USER_MODEL``, only by the tests that need it
(tests/test_otp_custom_user.py), which create its table.
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.contrib.auth.base_user import AbstractBaseUser, BaseUserManager
from django.db import models


class MemberManager(BaseUserManager["Member"]):
    def create_user(self, mail: str, password: str | None = None) -> Member:
        member = self.model(mail=mail)
        member.set_password(password)
        member.save(using=self._db)
        return member


class Member(AbstractBaseUser):
    mail = models.EmailField(unique=True)

    EMAIL_FIELD = "mail"
    USERNAME_FIELD = "mail"
    REQUIRED_FIELDS: ClassVar[list[str]] = []

    objects: ClassVar[Any] = MemberManager()

    class Meta:
        app_label = "custom_user"
