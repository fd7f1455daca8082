"""The example's admin: staff sign in with an emailed code instead of a password.

A site of its own (rather than changing ``admin.site``) so that nothing global is
touched; it shows the outbox, the one-time passwords and the users.
"""

from __future__ import annotations

from django.contrib import admin
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group, User

from robust_mail.admin_otp import OneTimePasswordAdmin
from robust_mail.admin_outbox import OutboxMessageAdmin
from robust_mail.auth_backends import EmailCodeAdminLoginForm
from robust_mail.models import OneTimePassword, OutboxMessage


class CodeLoginAdminSite(admin.AdminSite):
    site_header = "robust_mail demo administration"
    site_title = "robust_mail demo"
    login_form = EmailCodeAdminLoginForm
    # The stock login page plus a link to ask for a code.
    login_template = "demo_site/admin_login.html"


site = CodeLoginAdminSite(name="admin")
site.register(User, UserAdmin)
site.register(Group, GroupAdmin)
site.register(OutboxMessage, OutboxMessageAdmin)
site.register(OneTimePassword, OneTimePasswordAdmin)
