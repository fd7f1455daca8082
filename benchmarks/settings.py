"""Django settings for the benchmark process: SQLite in a temporary directory, locmem cache.

Each contender sets its own email settings with ``override_settings``.
"""

from __future__ import annotations

import os
import tempfile

_DIRECTORY = os.environ.get("ROBUST_MAIL_BENCH_DIR") or tempfile.mkdtemp(
    prefix="robust-mail-bench-"
)

SECRET_KEY = "benchmark-only-not-a-secret"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "robust_mail",
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(_DIRECTORY, "bench.sqlite3"),
        # Several worker threads write the outbox: wait for the lock rather than fail.
        "OPTIONS": {"timeout": 30},
    }
}
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
DEFAULT_FROM_EMAIL = "bench@example.com"
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
ROBUST_MAIL: dict[str, object] = {}
# Production-like logging: robust_mail's per-message INFO lines are off, warnings would show;
# the dead-primary case logs a warning per failed attempt, which is expected there.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"null": {"class": "logging.NullHandler"}},
    "loggers": {"robust_mail": {"handlers": ["null"], "level": "WARNING", "propagate": False}},
}
