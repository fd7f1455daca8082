"""Verification inside the caller's transaction (``ATOMIC_REQUESTS``, DRF's set_rollback).

A view that refuses a wrong code by raising (PermissionDenied, AuthenticationFailed) rolls
back its request's transaction, and with it the store's attempt count.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.core.cache import caches
from django.db import transaction

from robust_mail.models import OneTimePassword
from robust_mail.otp import OTPService, Reason, VerifyResult
from robust_mail.otp_store import CacheOTPStore
from tests.test_otp_support import Clock

pytestmark = pytest.mark.django_db

USER = "alice@example.com"
MAX_ATTEMPTS = 3


def refusing_view(otp: OTPService, code: str) -> VerifyResult:
    """What ATOMIC_REQUESTS does around a view that raises on a wrong code."""
    with transaction.atomic():
        result = otp.verify(USER, code)
        if not result.ok:
            transaction.set_rollback(True)
        return result


def wrong_for(code: str) -> str:
    return "000000" if code != "000000" else "111111"


def test_wrong_guesses_rolled_back_by_the_view_still_lock_the_code(settings: Any) -> None:
    settings.ROBUST_MAIL = {"OTP": {"MAX_ATTEMPTS": MAX_ATTEMPTS}}
    otp = OTPService(clock=Clock())
    issued = otp.issue(USER, send=False)
    right = str(issued.code)

    reasons = [refusing_view(otp, wrong_for(right)).reason for _ in range(MAX_ATTEMPTS + 1)]
    afterwards = refusing_view(otp, right)

    # The store's count went with each rollback; the bound held all the same.
    assert OneTimePassword.objects.get(pk=int(issued.key)).attempts == 0
    assert reasons == [Reason.INVALID] * MAX_ATTEMPTS + [Reason.LOCKED]
    assert (afterwards.ok, afterwards.reason) == (False, Reason.LOCKED)


def test_without_a_rollback_the_right_code_still_works_on_the_last_attempt(settings: Any) -> None:
    settings.ROBUST_MAIL = {"OTP": {"MAX_ATTEMPTS": MAX_ATTEMPTS}}
    otp = OTPService(clock=Clock())
    right = str(otp.issue(USER, send=False).code)

    wrong = [otp.verify(USER, wrong_for(right)).reason for _ in range(MAX_ATTEMPTS - 1)]

    # Two counts of one attempt each, not one attempt counted twice.
    assert wrong == [Reason.INVALID] * (MAX_ATTEMPTS - 1)
    assert otp.verify(USER, right).ok


def test_the_cache_store_counts_each_attempt_once(settings: Any) -> None:
    # Its counts are in the cache already: no second counter beside them.
    settings.ROBUST_MAIL = {"OTP": {"MAX_ATTEMPTS": MAX_ATTEMPTS}}
    otp = OTPService(clock=Clock(), store=CacheOTPStore("default"))
    right = str(otp.issue(USER, send=False).code)

    reasons = [refusing_view(otp, wrong_for(right)).reason for _ in range(MAX_ATTEMPTS + 1)]

    assert reasons == [Reason.INVALID] * MAX_ATTEMPTS + [Reason.LOCKED]
    keys = list(caches["default"]._cache)  # type: ignore[attr-defined]
    assert keys and not [key for key in keys if "otp-attempts" in key]
