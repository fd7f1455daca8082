"""Sign-in by emailed code: the backend, and staff into the admin through the test client."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth import authenticate
from django.contrib.auth.signals import user_login_failed
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from robust_mail.auth_backends import EmailCodeBackend, send_login_code
from robust_mail.models import OneTimePassword
from robust_mail.models.outbox import OutboxMessage
from robust_mail.otp import OTPService
from robust_mail.outbox import process_pk
from tests.test_otp_support import code_from, mail_server, notices_only

__all__ = ["mail_server"]

BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "robust_mail.auth_backends.EmailCodeBackend",
]
EMAIL = "staff@example.com"

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.usefixtures("code_backends"),
]


@pytest.fixture
def code_backends(settings: Any) -> None:
    settings.AUTHENTICATION_BACKENDS = BACKENDS
    settings.ROOT_URLCONF = "tests.test_otp_urls"


@pytest.fixture
def staff(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user("staff", EMAIL, is_staff=True)


def deliver_outbox() -> None:
    for pk in OutboxMessage.objects.values_list("pk", flat=True):
        process_pk(pk)


def login_code(server: Any, email: str = EMAIL) -> str:
    send_login_code(email)
    deliver_outbox()
    return code_from(server.messages[-1])


def test_authenticate_with_the_emailed_code(mail_server, staff, rf):
    server = mail_server()
    code = login_code(server)

    user = authenticate(rf.post("/"), email="Staff@Example.com", code=code)

    assert user == staff
    assert user.backend == "robust_mail.auth_backends.EmailCodeBackend"
    assert authenticate(rf.post("/"), email=EMAIL, code=code) is None  # used


def test_wrong_code_unknown_address_and_inactive_user_are_refused(
    mail_server, staff, django_user_model
):
    server = mail_server()
    code = login_code(server)
    wrong = "000000" if code != "000000" else "111111"
    off = django_user_model.objects.create_user("off", "off@example.com", is_active=False)
    off_code = str(OTPService().issue(off.email, send=False).code)

    assert authenticate(None, email=EMAIL, code=wrong) is None
    assert authenticate(None, email="nobody@example.com", code=code) is None
    assert authenticate(None, email=off.email, code=off_code) is None


def test_username_and_password_go_to_the_other_backends(staff):
    staff.set_password("a-password-long-enough")
    staff.save()

    assert EmailCodeBackend().authenticate(None, username="staff", password="x") is None
    assert authenticate(None, username="staff", password="a-password-long-enough") == staff


def test_unknown_address_gets_a_notice_without_a_code(mail_server):
    server = mail_server()

    send_login_code("nobody@example.com")
    deliver_outbox()

    assert notices_only(server) == ["nobody@example.com"]
    assert server.messages[0].message["Subject"] == "Your sign-in request"


def test_inactive_account_gets_the_notice_and_no_code(mail_server, django_user_model):
    # Mailing it nothing took the decoy path, whose timing told "an account exists here"
    # apart from "none does".
    django_user_model.objects.create_user("off", "off@example.com", is_active=False)
    server = mail_server()

    send_login_code("off@example.com")
    deliver_outbox()

    assert notices_only(server) == ["off@example.com"]


def test_without_notices_unknown_address_gets_no_email(mail_server):
    server = mail_server(OTP={"NOTIFY_UNKNOWN": False})

    send_login_code("nobody@example.com")
    deliver_outbox()

    assert server.messages == []


def test_unknown_address_does_the_same_database_work(mail_server, staff):
    mail_server()

    def statements(email: str) -> list[str]:
        with CaptureQueriesContext(connection) as queries:
            send_login_code(email)
        return [q["sql"] for q in queries.captured_queries]

    known = statements(EMAIL)
    unknown = statements("nobody@example.com")

    # The same statements in the same order: an outbox INSERT for each, the code for the
    # known address, the notice that no code was sent for the unknown one.
    assert [q.split()[0] for q in known] == [q.split()[0] for q in unknown]
    assert OutboxMessage.objects.count() == 2
    assert not OneTimePassword._base_manager.filter(purpose="").exists()


def test_staff_signs_into_the_admin_with_a_code(mail_server, staff, client):
    server = mail_server()

    form = client.get("/admin/login/code/")
    asked = client.post("/admin/login/code/", {"email": EMAIL})
    deliver_outbox()
    code = code_from(server.messages[-1])
    login_page = client.get("/admin/login/")
    signed_in = client.post(
        "/admin/login/?next=/admin/", {"username": EMAIL, "password": f" {code} "}
    )
    index = client.get("/admin/")

    assert form.status_code == 200 and b'name="email"' in form.content
    assert (asked.status_code, asked["Location"]) == (302, "/admin/login/")
    assert b"Code" in login_page.content and b"Email" in login_page.content
    assert (signed_in.status_code, signed_in["Location"]) == (302, "/admin/")
    assert index.status_code == 200


def test_known_and_unknown_addresses_get_the_same_response(mail_server, staff, client):
    mail_server()

    known = client.post("/admin/login/code/", {"email": EMAIL})
    unknown = client.post("/admin/login/code/", {"email": "nobody@example.com"})

    assert (known.status_code, known["Location"]) == (unknown.status_code, unknown["Location"])


def test_rate_limited_requests_say_so_alike(mail_server, staff, client):
    mail_server()
    for email in (EMAIL, "nobody@example.com"):
        client.post("/admin/login/code/", {"email": email})

        again = client.post("/admin/login/code/", {"email": email})

        assert again.status_code == 200
        assert b"Too many codes were requested" in again.content


def test_one_message_for_every_failed_code(mail_server, staff, client):
    server = mail_server()
    code = login_code(server)
    wrong = "000000" if code != "000000" else "111111"

    bad = client.post("/admin/login/", {"username": EMAIL, "password": wrong})
    unknown = client.post("/admin/login/", {"username": "nobody@example.com", "password": wrong})

    for page in (bad, unknown):
        assert page.status_code == 200
        assert b"That code is not valid" in page.content


def test_non_staff_cannot_use_a_code_for_the_admin(mail_server, django_user_model, client):
    server = mail_server()
    django_user_model.objects.create_user("plain", "plain@example.com")
    code = login_code(server, "plain@example.com")

    page = client.post("/admin/login/", {"username": "plain@example.com", "password": code})

    assert page.status_code == 200
    assert "_auth_user_id" not in client.session


@override_settings(ROOT_URLCONF="tests.test_otp_urls")
def test_request_view_rejects_a_malformed_address(client):
    page = client.post("/admin/login/code/", {"email": "not an address"})

    assert page.status_code == 200
    assert OutboxMessage.objects.count() == 0


def test_failed_admin_sign_in_keeps_the_code_out_of_logged_credentials(mail_server, staff, client):
    # Django masks only password-like keys before user_login_failed; a receiver that logs
    # the credentials (the dict, so the repr of each value) must not log the code.
    server = mail_server()
    code = login_code(server)
    wrong = "000000" if code != "000000" else "111111"
    logged: list[str] = []

    def receiver(sender: Any, credentials: dict[str, Any], **kwargs: Any) -> None:
        logged.append(f"failed sign-in with {credentials}")

    user_login_failed.connect(receiver)
    try:
        client.post("/admin/login/", {"username": EMAIL, "password": wrong})
    finally:
        user_login_failed.disconnect(receiver)

    (line,) = logged
    assert EMAIL in line and wrong not in line


@pytest.mark.django_db
def test_an_address_nfkc_makes_too_long_is_a_form_error_not_a_500(settings: Any) -> None:
    from django.contrib.messages.storage import default_storage
    from django.contrib.sessions.middleware import SessionMiddleware
    from django.test import RequestFactory

    from robust_mail.auth_backends import LoginCodeRequestForm, request_login_code

    email = "a@" + "\ufdfa" * 15 + ".com"  # EmailField accepts it; NFKC makes it 270+ long
    assert LoginCodeRequestForm({"email": email}).is_valid()
    request = RequestFactory().post("/", {"email": email})
    request._dont_enforce_csrf_checks = True  # type: ignore[attr-defined]
    SessionMiddleware(lambda r: None).process_request(request)  # type: ignore[arg-type,return-value]
    request._messages = default_storage(request)  # type: ignore[attr-defined]

    response = request_login_code(request, next_url="/")

    assert response.status_code == 200  # the form again, with the error
    assert b"Enter a valid email address." in response.content
