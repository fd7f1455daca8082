"""Sign in (by emailed code or password) and reset a password by emailed code.

Every rule — code generation, limits, attempts, expiry, enumeration-safe sending, reset
tokens — is robust_mail's (:mod:`robust_mail.otp`, :mod:`robust_mail.password_reset`,
:mod:`robust_mail.auth_backends`); these views only move a person between forms.
"""

from __future__ import annotations

import logging
from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.auth import authenticate, login, logout
from django.contrib.auth.forms import AuthenticationForm
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_http_methods, require_POST

from example_project.demo_site.forms import CodeForm, EmailForm, NewPasswordForm
from robust_mail.auth_backends import client_ip, send_login_code
from robust_mail.exceptions import RateLimited, RobustMailError
from robust_mail.password_reset import PasswordResetService, ResetTokenInvalid

logger = logging.getLogger("example_project")

RESET_TOKEN = "demo_site_reset_token"
WRONG_CODE = "That code is not valid. Check the newest email, or ask for a new code."


#: Codes and passwords typed into these views never reach Django's error reports.
_SECRET_FIELDS = sensitive_post_parameters("code", "password", "password1", "password2")


def _next_url(request: HttpRequest) -> str:
    candidate = request.POST.get("next") or request.GET.get("next") or ""
    if candidate and url_has_allowed_host_and_scheme(
        candidate, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return candidate
    return reverse("demo_site:dashboard")


def _with_email(view: str, email: str, next_url: str = "") -> HttpResponseRedirect:
    query = {"email": email, **({"next": next_url} if next_url else {})}
    return HttpResponseRedirect(f"{reverse(view)}?{urlencode(query)}")


def _too_many(exc: RateLimited) -> str:
    seconds = max(1, round(exc.retry_after))
    return f"Too many codes were asked for. Try again in {seconds} s."


@require_http_methods(["GET", "POST"])
@_SECRET_FIELDS
def sign_in(request: HttpRequest) -> HttpResponse:
    """Ask for a code by email, or sign in with a password."""
    action = request.POST.get("action") if request.method == "POST" else None
    code_form = EmailForm(request.POST if action == "code" else None, prefix="code")
    password_form = AuthenticationForm(request, request.POST if action == "password" else None)
    password_form.fields["username"].label = "Email"
    # The code is the way in for the demo account: the cursor starts there.
    password_form.fields["username"].widget.attrs.pop("autofocus", None)
    code_form.fields["email"].widget.attrs["autofocus"] = True
    next_url = _next_url(request)
    if action == "code" and code_form.is_valid():
        email = code_form.cleaned_data["email"]
        try:
            send_login_code(email, request=request)
        except RateLimited as exc:
            code_form.add_error(None, _too_many(exc))
        except RobustMailError:
            # Same page as success: an error here would tell that the account exists.
            logger.warning("a sign-in code could not be queued")
            return _with_email("demo_site:sign_in_code", email, next_url)
        else:
            return _with_email("demo_site:sign_in_code", email, next_url)
    if action == "password" and password_form.is_valid():
        login(request, password_form.get_user())
        return redirect(next_url)
    return render(
        request,
        "demo_site/sign_in.html",
        {"code_form": code_form, "password_form": password_form, "next": next_url},
    )


@require_http_methods(["GET", "POST"])
@_SECRET_FIELDS
def sign_in_code(request: HttpRequest) -> HttpResponse:
    """Type in the emailed code."""
    form = CodeForm(request.POST or None, initial={"email": request.GET.get("email", "")})
    if request.method == "POST" and form.is_valid():
        user = authenticate(
            request, email=form.cleaned_data["email"], code=form.cleaned_data["code"]
        )
        if user is not None:
            login(request, user)
            messages.success(request, f"Signed in as {user.get_username()}.")
            return redirect(_next_url(request))
        form.add_error(None, WRONG_CODE)
    return render(
        request, "demo_site/sign_in_code.html", {"form": form, "next": _next_url(request)}
    )


@require_POST
def sign_out(request: HttpRequest) -> HttpResponse:
    logout(request)
    return redirect("demo_site:dashboard")


@require_http_methods(["GET", "POST"])
def reset(request: HttpRequest) -> HttpResponse:
    """Step 1: email a reset code (if an account has the address; the page never says)."""
    form = EmailForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        email = form.cleaned_data["email"]
        try:
            PasswordResetService().initiate(
                email,
                ip_address=client_ip(request),
                user_agent=request.META.get("HTTP_USER_AGENT", ""),
            )
        except RateLimited as exc:
            form.add_error(None, _too_many(exc))
        except ValueError:
            form.add_error("email", "Enter a valid email address.")
        except RobustMailError:
            logger.warning("a password reset code could not be queued")
            return _with_email("demo_site:reset_code", email)
        else:
            return _with_email("demo_site:reset_code", email)
    return render(request, "demo_site/reset.html", {"form": form})


@require_http_methods(["GET", "POST"])
@_SECRET_FIELDS
def reset_code(request: HttpRequest) -> HttpResponse:
    """Step 2: the code buys a short-lived, single-use reset token (kept in the session)."""
    form = CodeForm(request.POST or None, initial={"email": request.GET.get("email", "")})
    if request.method == "POST" and form.is_valid():
        token = PasswordResetService().verify(
            form.cleaned_data["email"], form.cleaned_data["code"], ip_address=client_ip(request)
        )
        if token is not None:
            request.session[RESET_TOKEN] = token
            return redirect("demo_site:reset_new")
        form.add_error(None, WRONG_CODE)
    return render(request, "demo_site/reset_code.html", {"form": form})


@require_http_methods(["GET", "POST"])
@_SECRET_FIELDS
def reset_new(request: HttpRequest) -> HttpResponse:
    """Step 3: choose the new password."""
    token = request.session.get(RESET_TOKEN)
    if not token:
        messages.error(request, "Ask for a reset code first.")
        return redirect("demo_site:reset")
    form = NewPasswordForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            PasswordResetService().complete(token, form.cleaned_data["password1"])
        except ResetTokenInvalid:
            del request.session[RESET_TOKEN]
            messages.error(request, "That reset has expired or was used. Start again.")
            return redirect("demo_site:reset")
        except ValidationError as exc:
            form.add_error("password1", exc)
        else:
            del request.session[RESET_TOKEN]
            messages.success(request, "Password changed. Sign in with it.")
            return redirect("demo_site:sign_in")
    return render(request, "demo_site/reset_new.html", {"form": form})
