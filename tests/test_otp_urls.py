"""URLconf for the sign-in-by-code and OTP admin tests: an admin site of their own."""

from __future__ import annotations

from django.contrib.admin import AdminSite
from django.urls import path

from robust_mail.admin_otp import register
from robust_mail.auth_backends import EmailCodeAdminLoginForm, request_login_code


class CodeLoginSite(AdminSite):
    login_form = EmailCodeAdminLoginForm


site = CodeLoginSite(name="admin")
register(site)

urlpatterns = [
    path("admin/login/code/", request_login_code, name="login_code"),
    path("admin/", site.urls),
]
