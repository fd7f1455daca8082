"""URLs of the example project: the demo site, and an admin that staff enter with a code."""

from __future__ import annotations

from django.urls import include, path

from example_project.demo_site.admin_site import site as admin_site
from robust_mail.auth_backends import request_login_code

urlpatterns = [
    # Ask for a code, then type it into the admin's login form (Email + Code).
    path(
        "admin/login/code/",
        request_login_code,
        {"template_name": "demo_site/admin_request_code.html"},
        name="admin_login_code",
    ),
    path("admin/", admin_site.urls),
    path("", include("example_project.demo_site.urls")),
]
