"""Sign in with a code sent by email — for users, and for staff into the admin.

Settings::

    AUTHENTICATION_BACKENDS = [
        "django.contrib.auth.backends.ModelBackend",
        "robust_mail.auth_backends.EmailCodeBackend",
    ]

Then ``authenticate(request, email=..., code=...)`` signs a user in with a code from
:func:`send_login_code`. For the admin, see :class:`EmailCodeAdminLoginForm` and
:func:`request_login_code` (docs/otp.md has the URLconf).
"""

from __future__ import annotations

import logging
from typing import Any

from django import forms
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import authenticate
from django.contrib.auth.backends import ModelBackend
from django.core.validators import EmailValidator
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render, resolve_url
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.debug import sensitive_variables
from django.views.decorators.http import require_http_methods

from robust_mail.exceptions import RateLimited, RobustMailError
from robust_mail.otp import IssuedCode, OTPService, SecretCode
from robust_mail.password_reset import issue_account_code, users_with_email

__all__ = [
    "LOGIN_PURPOSE",
    "EmailCodeAdminLoginForm",
    "EmailCodeBackend",
    "LoginCodeRequestForm",
    "request_login_code",
    "send_login_code",
]

logger = logging.getLogger("robust_mail.otp")

LOGIN_PURPOSE = "login"


def client_ip(request: HttpRequest | None) -> str | None:
    """``REMOTE_ADDR``. Behind a proxy, set it from a trusted header in middleware first:
    a client-supplied ``X-Forwarded-For`` would let anyone dodge the per-IP limits."""
    if request is None:
        return None
    return request.META.get("REMOTE_ADDR") or None


def send_login_code(
    email: str, *, request: HttpRequest | None = None, background: bool = True
) -> IssuedCode:
    """Email a sign-in code if an active account has ``email``; the same work if none has.

    Raises ``ValueError`` (malformed address) and :class:`RateLimited` alike for known and
    unknown addresses.
    """
    user_agent = request.META.get("HTTP_USER_AGENT", "") if request is not None else ""
    return issue_account_code(
        OTPService(),
        email,
        LOGIN_PURPOSE,
        ip_address=client_ip(request),
        user_agent=str(user_agent),
        background=background,
        usable_password=False,
    )


class EmailCodeBackend(ModelBackend):
    """``authenticate(request, email=..., code=...)`` → the user, or None.

    Inherits ModelBackend's ``get_user`` and permission checks, so staff signed in this
    way have their usual admin permissions.
    """

    purpose = LOGIN_PURPOSE

    # The code in Django's error reports as stars (DEBUG off), as Django does for passwords.
    @sensitive_variables("code")
    def authenticate(  # type: ignore[override]
        self,
        request: HttpRequest | None,
        email: str | None = None,
        code: str | None = None,
        **kwargs: Any,
    ) -> Any:
        if email is None or code is None:
            return None  # a username/password attempt meant for another backend
        # Only the account whose stored address *is* the one typed (strictly: never a
        # look-alike the database folds onto it), and the code must be bound to it.
        users = users_with_email(email, usable_password=False) if isinstance(email, str) else []
        user = users[0] if len(users) == 1 else None
        result = OTPService().verify(
            user if user is not None else email,
            code,
            self.purpose,
            ip_address=client_ip(request),
        )
        if not result.ok:
            return None
        if user is None:
            logger.warning("a sign-in code matched %d accounts; refused", len(users))
            return None
        return user if self.user_can_authenticate(user) else None


class EmailCodeAdminLoginForm(AdminAuthenticationForm):
    """The admin login form with "Email" and "Code" in place of username and password.

    The field names stay ``username`` and ``password`` so the stock admin login template
    renders it. ``admin.site.login_form = EmailCodeAdminLoginForm``.
    """

    error_messages = {
        **AdminAuthenticationForm.error_messages,
        # One message for every failure: wrong, expired, used, locked, no account.
        "invalid_login": "That code is not valid. Request a new code and try again.",
    }

    def __init__(self, request: HttpRequest | None = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(request, *args, **kwargs)
        self.fields["username"] = forms.EmailField(label="Email", max_length=254)
        self.fields["password"] = forms.CharField(
            label="Code",
            max_length=64,
            strip=True,
            widget=forms.TextInput(attrs={"autocomplete": "one-time-code"}),
        )

    @sensitive_variables("code")
    def clean(self) -> dict[str, Any]:
        email = self.cleaned_data.get("username")
        code = self.cleaned_data.get("password")
        if email and code:
            # Django sends the credentials to user_login_failed receivers and masks only
            # password-like keys: a SecretCode at least keeps the code out of their repr.
            self.user_cache = authenticate(self.request, email=email, code=SecretCode(code))
            if self.user_cache is None:
                raise self.get_invalid_login_error()
            self.confirm_login_allowed(self.user_cache)
        return self.cleaned_data


class LoginCodeRequestForm(forms.Form):
    email = forms.EmailField(label="Email", max_length=254)


@csrf_protect
@require_http_methods(["GET", "POST"])
def request_login_code(
    request: HttpRequest,
    *,
    next_url: str = "admin:login",
    template_name: str = "robust_mail/otp/request_code.html",
) -> HttpResponse:
    """Ask for a sign-in code; then redirect to ``next_url`` to type it in.

    Every outcome but a rate limit looks the same to the visitor, whether or not an
    account has the address, and whether or not the email could be sent.
    """
    form = LoginCodeRequestForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            send_login_code(form.cleaned_data["email"], request=request)
        except RateLimited as exc:
            minutes = max(1, round(exc.retry_after / 60))
            form.add_error(None, f"Too many codes were requested. Try again in {minutes} min.")
        except ValueError:
            # An address EmailField accepts but that is no usable identifier (one that grows
            # past 254 characters under NFKC), or that no message can be built for: the
            # visitor's input, not a server error. The wording is Django's own, not ours.
            form.add_error("email", EmailValidator.message)
        except RobustMailError:
            # Logged by the delivery layer; showing it would tell that the account exists.
            logger.warning("sign-in code could not be queued")
            return _redirect(request, next_url)
        else:
            return _redirect(request, next_url)
    return render(request, template_name, {"form": form, "next_url": resolve_url(next_url)})


def _redirect(request: HttpRequest, next_url: str) -> HttpResponse:
    target = resolve_url(next_url)
    if not url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
        target = "/"
    return HttpResponseRedirect(target)
