"""A code is pending while its email is being sent: nobody can try it, nothing is lost.

Before, a code was live from the moment it was stored: it could be verified while the
email carrying it was still being sent, and if the send then failed, withdrawing it
deleted the attempts made on it meanwhile — unlimited guessing for an address whose mail
bounces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from robust_mail.exceptions import DeliveryFailed
from robust_mail.otp import OTPService, Reason, VerifyResult
from robust_mail.otp_store import CacheOTPStore, DatabaseOTPStore, OTPStore
from tests.test_otp_support import Clock, code_from, mail_server

__all__ = ["mail_server"]  # the fixture

pytestmark = pytest.mark.django_db

USER = "alice@example.com"


def right(code: str) -> str:
    return code


def wrong(code: str) -> str:
    return "000000" if code != "000000" else "111111"


class GuessingWhileSending(OTPService):
    """Someone tries a code for the address while the email with the new one is on its way."""

    def __init__(self, guess: Callable[[str], str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.guess = guess
        self.during_send: list[VerifyResult] = []

    def send(self, address: str, code: str, *args: Any, **kwargs: Any) -> None:
        self.during_send.append(self.verify(address, self.guess(code)))
        super().send(address, code, *args, **kwargs)


@pytest.fixture(params=["database", "cache"])
def store(request: pytest.FixtureRequest) -> OTPStore:
    return DatabaseOTPStore() if request.param == "database" else CacheOTPStore("default")


def test_a_code_cannot_be_used_before_its_email_is_sent(mail_server, store):
    server = mail_server()
    otp = GuessingWhileSending(right, store=store, clock=Clock())

    otp.issue(USER)

    assert [r.reason for r in otp.during_send] == [Reason.NO_CODE]  # not even the right one
    assert otp.verify(USER, code_from(server.messages[0])).ok  # once it has been sent


def test_attempts_made_during_a_failed_send_are_kept(mail_server, store):
    # No cooldown: the cache store's runs on the cache's own clock, not the test's.
    server = mail_server(OTP={"COOLDOWN": 0})
    clock = Clock()
    OTPService(store=store, clock=clock).issue(USER)
    previous = store.latest(USER, "login")
    clock.advance(1)
    server.mode = "mail_421"
    otp = GuessingWhileSending(wrong, store=store, clock=clock)

    with pytest.raises(DeliveryFailed):
        otp.issue(USER)

    # The guess was tried against the code the address had: it counts there, and the
    # failed send, which withdrew the new code, took no attempt away with it.
    assert [r.reason for r in otp.during_send] == [Reason.INVALID]
    latest = store.latest(USER, "login")
    assert latest is not None and previous is not None
    assert (latest.key, latest.attempts) == (previous.key, 1)
    assert otp.verify(USER, code_from(server.messages[0])).ok


def test_once_a_code_is_used_no_other_live_code_works(settings):
    # Two codes whose emails crossed can both end up live when their activations race
    # (each retiring the others before the other was live; database store, autocommit).
    # That end state is made directly: the first code is made live again.
    from robust_mail.models import OneTimePassword

    settings.ROBUST_MAIL = {"OTP": {"COOLDOWN": 0}}
    otp = OTPService(store=DatabaseOTPStore(), clock=Clock())
    first = otp.issue(USER, send=False)
    second = otp.issue(USER, send=False)
    OneTimePassword.objects.filter(pk=int(first.key)).update(invalidated=False)

    assert otp.verify(USER, str(second.code)).ok

    assert not otp.verify(USER, str(first.code)).ok


class ActivationBlip(DatabaseOTPStore):
    """A store whose first activation fails (the database dropped the connection)."""

    failed = False

    def activate(self, key: str) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("server closed the connection unexpectedly")
        super().activate(key)


def test_a_code_whose_activation_blips_is_still_made_usable(mail_server):
    # Its email is already out: left pending, the code the user got would never work.
    server = mail_server()
    otp = OTPService(store=ActivationBlip(), clock=Clock())

    otp.issue(USER)

    assert otp.verify(USER, code_from(server.messages[-1])).ok


class RetiringFails(DatabaseOTPStore):
    """A store whose invalidate() fails (the database dropped the connection)."""

    def invalidate(self, identifier: str, purpose: str) -> int:
        raise RuntimeError("server closed the connection unexpectedly")


def test_a_used_code_is_a_success_even_if_retiring_the_others_fails():
    # The code is used up by then: reporting an error would lock the user out for nothing.
    otp = OTPService(store=RetiringFails(), clock=Clock())
    issued = otp.issue(USER, send=False)

    assert otp.verify(USER, str(issued.code)).ok


class InvalidatedBeforePush(CacheOTPStore):
    """An invalidate() (a password change in another request) lands after activate() has
    checked the generation, just before it puts the code in the index."""

    armed = False
    invalidated: int | None = None

    def _push(self, identifier: str, purpose: str, key: str, ttl: float) -> None:
        if self.armed:
            self.armed = False
            self.invalidated = self.invalidate(identifier, purpose)
        super()._push(identifier, purpose, key, ttl)


def test_a_code_invalidated_while_the_cache_store_activates_it_never_works():
    store = InvalidatedBeforePush("default")
    otp = OTPService(store=store, clock=Clock())
    store.armed = True

    issued = otp.issue(USER, "password_reset", send=False)

    assert not store.armed and store.invalidated == 0  # it ran, and found nothing to kill
    assert otp.verify(USER, str(issued.code), "password_reset").reason is Reason.NO_CODE
