"""Django settings for the outbox peers (django-mailer, django-post-office).

Used only inside ``.venv-bench-peers`` by ``python -m benchmarks.outbox_peers``; robust_mail
is not installed there. SQLite in the directory given by ``ROBUST_MAIL_BENCH_DIR``.
"""

from __future__ import annotations

import os
import tempfile

_DIRECTORY = os.environ.get("ROBUST_MAIL_BENCH_DIR") or tempfile.mkdtemp(prefix="bench-peers-")

SECRET_KEY = "benchmark-only-not-a-secret"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "mailer",
    "post_office",
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(_DIRECTORY, "peers.sqlite3"),
        "OPTIONS": {"timeout": 30},
    }
}
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
DEFAULT_FROM_EMAIL = "bench@example.com"
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
# django-mailer: the queue's sender is Django's SMTP backend; its lock file in the temp dir.
MAILER_EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
MAILER_LOCK_PATH = os.path.join(_DIRECTORY, "mailer-send")
# django-post-office: queue (priority "medium"), send with Django's SMTP backend, no Celery.
POST_OFFICE = {
    "BACKENDS": {"default": "django.core.mail.backends.smtp.EmailBackend"},
    "DEFAULT_PRIORITY": "medium",
    "CELERY_ENABLED": False,
    "THREADS_PER_PROCESS": int(os.environ.get("BENCH_PEER_THREADS", "4")),
}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"null": {"class": "logging.NullHandler"}},
    "loggers": {
        name: {"handlers": ["null"], "level": "WARNING", "propagate": False}
        for name in ("mailer", "post_office")
    },
}
# django-post-office renders its (template-less) emails through Django's template engine.
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}]
