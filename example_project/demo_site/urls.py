from __future__ import annotations

from django.urls import path

from example_project.demo_site import views_auth, views_mail, views_status

app_name = "demo_site"

urlpatterns = [
    path("", views_status.dashboard, name="dashboard"),
    path("status/live/", views_status.live, name="dashboard_live"),
    path("status.json", views_status.status_json, name="status_json"),
    path("send/", views_mail.send, name="send"),
    path("mailbox/", views_mail.mailbox_page, name="mailbox"),
    path("mailbox/live/", views_mail.mailbox_live, name="mailbox_live"),
    path("mailbox/<str:name>/clear/", views_mail.mailbox_clear, name="mailbox_clear"),
    path("servers/<str:name>/mode/", views_mail.server_mode, name="server_mode"),
    path("signin/", views_auth.sign_in, name="sign_in"),
    path("signin/code/", views_auth.sign_in_code, name="sign_in_code"),
    path("signout/", views_auth.sign_out, name="sign_out"),
    path("reset/", views_auth.reset, name="reset"),
    path("reset/code/", views_auth.reset_code, name="reset_code"),
    path("reset/new/", views_auth.reset_new, name="reset_new"),
]
