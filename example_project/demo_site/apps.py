from __future__ import annotations

import os
import sys

from django.apps import AppConfig
from django.conf import settings


class DemoSiteConfig(AppConfig):
    name = "example_project.demo_site"
    label = "demo_site"
    verbose_name = "robust_mail demo site"

    def ready(self) -> None:
        from example_project.demo_site import deliveries, embedded

        deliveries.connect()
        if getattr(settings, "EXAMPLE_EMBEDDED_SMTP", False) and not _autoreloader_parent():
            embedded.start(settings.EXAMPLE_SMTP_PORTS)


def _autoreloader_parent() -> bool:
    # `runserver` without --noreload runs the site in a child process; the parent only
    # watches files and must not take the SMTP ports the child needs.
    return (
        "runserver" in sys.argv
        and "--noreload" not in sys.argv
        and os.environ.get("RUN_MAIN") != "true"
    )
