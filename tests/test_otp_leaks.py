"""Codes never leak: not in logs, exceptions, the admin, or the console fallback outside DEBUG."""

from __future__ import annotations

import logging
import traceback

import pytest
from django.test import override_settings

from robust_mail.exceptions import DeliveryFailed, RateLimited
from robust_mail.models import OneTimePassword
from robust_mail.otp import OTPService, SecretCode
from robust_mail.password_reset import PasswordResetService
from tests.conftest import provider
from tests.test_otp_support import Clock, code_from

pytestmark = pytest.mark.django_db

USER = "alice@example.com"
WRONG = "000000"


#: aiosmtpd's own logger: the receiving test server, i.e. the user's mailbox, not us.
MAILBOX_LOGGER = "mail.log"


def _all_log_text(caplog: pytest.LogCaptureFixture) -> str:
    parts = []
    for record in caplog.records:
        if record.name == MAILBOX_LOGGER:
            continue
        parts.append(caplog.handler.format(record))
        parts.append(record.getMessage())
        parts.append(repr(record.args))
        if record.exc_info:
            parts.append("".join(traceback.format_exception(*record.exc_info)))
    return "\n".join(parts)


def test_codes_never_reach_logs_or_exceptions(smtp_server, robust, caplog, django_user_model):
    caplog.set_level(logging.DEBUG)  # root: every logger, robust_mail's included
    caplog.set_level(logging.DEBUG, logger="robust_mail")
    server = smtp_server()
    robust([provider(server, "only")], CIRCUIT_BREAKER={"FAILURE_THRESHOLD": 100})
    django_user_model.objects.create_user("alice", USER, "an-old-password-1")
    clock = Clock()
    otp = OTPService(clock=clock)
    errors: list[str] = []

    otp.issue(USER)  # sent
    otp.verify(USER, WRONG)  # wrong
    code = code_from(server.messages[-1])
    otp.verify(USER, code)  # right
    otp.verify(USER, code)  # replay
    try:
        otp.issue(USER)  # cooldown
    except RateLimited as exc:
        errors.append(f"{exc} {exc!r}")
    clock.advance(61)
    server.mode = "data_451"
    try:
        otp.issue(USER)  # the provider refuses the email: the failure path logs and raises
    except DeliveryFailed as exc:
        errors.append("".join(traceback.format_exception(exc)))
    server.mode = "accept"
    reset = PasswordResetService(otp=otp, background=False)
    clock.advance(61)
    reset.initiate(USER)
    reset_code = code_from(server.messages[-1])
    token = reset.verify(USER, reset_code)
    assert token is not None

    codes = {code_from(m) for m in server.messages}
    assert len(codes) == 2
    seen = _all_log_text(caplog) + "\n".join(errors)
    assert errors and any(r.name.startswith("robust_mail.otp") for r in caplog.records)
    for leaked in codes:
        assert leaked not in seen


class FixedCode(OTPService):
    """Issues a code the test knows without reading it from an email."""

    code = "428571"

    def generate(self) -> SecretCode:
        return SecretCode(self.code)


@pytest.mark.parametrize("flow", ["issue", "password_reset"])
def test_a_failed_send_leaves_no_readable_code_in_traceback_locals(
    smtp_server, robust, django_user_model, flow
):
    # What error trackers (Sentry) and `traceback` with capture_locals record: the repr of
    # every local variable of every frame between the raise and the catch.
    server = smtp_server("rcpt_550")
    robust([provider(server, "only")])
    django_user_model.objects.create_user("alice", USER, "an-old-password-1")
    otp = FixedCode(clock=Clock())

    with pytest.raises(DeliveryFailed) as failed:
        if flow == "issue":
            otp.issue(USER)
        else:
            PasswordResetService(otp=otp, background=False).initiate(USER)

    report = "".join(
        traceback.TracebackException.from_exception(failed.value, capture_locals=True).format()
    )
    assert "robust_mail/otp.py" in report
    assert FixedCode.code not in report
    assert FixedCode.code not in str(failed.value)


def test_console_fallback_withholds_the_code_outside_debug(smtp_server, robust, capsys):
    server = smtp_server("mail_421")
    robust([provider(server, "only")], FALLBACK="console")
    issued = OTPService().issue(USER)

    printed = capsys.readouterr().out
    assert issued.sent
    assert USER in printed  # the message was printed...
    assert "Your code is" not in printed  # ...without its body


def test_console_fallback_shows_the_code_in_debug(smtp_server, robust, capsys, settings):
    settings.DEBUG = True
    server = smtp_server("mail_421")
    robust([provider(server, "only")], FALLBACK="console")
    OTPService().issue(USER)

    printed = capsys.readouterr().out
    assert "Your code is" in printed  # development mode: that is the point


@override_settings(ROOT_URLCONF="tests.test_otp_urls")
def test_admin_lists_codes_without_code_or_hash(client, django_user_model, smtp_server, robust):
    server = smtp_server()
    robust([provider(server, "only")])
    OTPService().issue(USER, ip_address="192.0.2.44")
    code = code_from(server.messages[0])
    row = OneTimePassword.objects.get()
    admin = django_user_model.objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(admin)

    listing = client.get("/admin/robust_mail/onetimepassword/")
    detail = client.get(f"/admin/robust_mail/onetimepassword/{row.pk}/change/")

    for page in (listing, detail):
        assert page.status_code == 200
        body = page.content.decode()
        assert code not in body
        assert row.code_hash not in body
    assert USER in listing.content.decode() and "192.0.2.44" in listing.content.decode()
    assert client.get("/admin/robust_mail/onetimepassword/add/").status_code == 403
    deleted = client.post(f"/admin/robust_mail/onetimepassword/{row.pk}/delete/", {"post": "yes"})
    assert deleted.status_code == 403
    assert OneTimePassword.objects.filter(pk=row.pk).exists()


def test_model_str_and_repr_hold_no_hash():
    row = OneTimePassword(identifier=USER, purpose="login", code_hash="f" * 64)

    assert "f" * 16 not in str(row) and "f" * 16 not in repr(row)
