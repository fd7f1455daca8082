"""The example project configured for real providers: a template to copy, not to run as is.

Every secret and address comes from the environment; this file holds none. Required:

- ``DJANGO_SECRET_KEY``, ``DJANGO_ALLOWED_HOSTS`` (space separated);
- ``PRIMARY_SMTP_HOST``, ``PRIMARY_SMTP_USER``, ``PRIMARY_SMTP_PASSWORD``: the first
  provider, STARTTLS on port 587 (``PRIMARY_SMTP_PORT`` to change it);
- ``BACKUP_SMTP_HOST``, ``BACKUP_SMTP_USER``, ``BACKUP_SMTP_PASSWORD``: the second,
  implicit TLS (SMTPS) on port 465 (``BACKUP_SMTP_PORT``);
- ``REDIS_URL`` (e.g. ``redis://127.0.0.1:6379/0``): breakers, rate limits, counters
  and OTP limits shared by every web process and worker.

Optional: ``POSTGRES_DB`` (with ``POSTGRES_USER``, ``POSTGRES_PASSWORD``, ``POSTGRES_HOST``,
``POSTGRES_PORT``) for PostgreSQL instead of SQLite; ``DEFAULT_FROM_EMAIL``.

Run ``manage.py robust_mail_check`` once deployed: it connects to each provider, checks
TLS and the login, and sends nothing. Run ``manage.py robust_mail_worker`` beside the web
processes: it delivers what was queued in the outbox.
"""

from __future__ import annotations

import os

from example_project.settings import *  # noqa: F403 - the demo's apps, URLs and templates

DEBUG = False
SECRET_KEY = os.environ["DJANGO_SECRET_KEY"]
ALLOWED_HOSTS = os.environ["DJANGO_ALLOWED_HOSTS"].split()
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True

# The demo's local SMTP servers never run here.
EXAMPLE_EMBEDDED_SMTP = False
EXAMPLE_OPEN_PAGES = False  # dashboard, mailbox and send: staff only

if postgres_db := os.environ.get("POSTGRES_DB"):
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": postgres_db,
            "USER": os.environ.get("POSTGRES_USER", ""),
            "PASSWORD": os.environ.get("POSTGRES_PASSWORD", ""),
            "HOST": os.environ.get("POSTGRES_HOST", ""),
            "PORT": os.environ.get("POSTGRES_PORT", ""),
            # Workers hold a connection per thread; keep them for a while.
            "CONN_MAX_AGE": 60,
        }
    }

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": os.environ["REDIS_URL"],
        # Short socket timeouts: a dead Redis must cost little per message; robust_mail
        # then keeps breakers per process until it answers again.
        "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1},
    }
}

ROBUST_MAIL = {
    "PROVIDERS": [  # tried in this order
        {
            "NAME": "primary",
            "HOST": os.environ["PRIMARY_SMTP_HOST"],
            "PORT": int(os.environ.get("PRIMARY_SMTP_PORT", "587")),
            "USE_TLS": True,  # STARTTLS, required: never falls back to plain text
            "USERNAME": os.environ["PRIMARY_SMTP_USER"],
            "PASSWORD": os.environ["PRIMARY_SMTP_PASSWORD"],
            "TIMEOUT": 10,
        },
        {
            "NAME": "backup",
            "HOST": os.environ["BACKUP_SMTP_HOST"],
            "PORT": int(os.environ.get("BACKUP_SMTP_PORT", "465")),
            "USE_SSL": True,  # implicit TLS (SMTPS)
            "USERNAME": os.environ["BACKUP_SMTP_USER"],
            "PASSWORD": os.environ["BACKUP_SMTP_PASSWORD"],
            "TIMEOUT": 10,
        },
    ],
    "FORCE_IPV4": True,
    # Every provider down: keep the message in the outbox for robust_mail_worker.
    "FALLBACK": "outbox",
    "CACHE": "default",
    # The library's defaults for RETRY, CIRCUIT_BREAKER, POOL and OUTBOX are made for
    # production; the demo shortens them only so that a person sees effects at once.
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"short": {"format": "%(asctime)s %(levelname)-7s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "short"}},
    "loggers": {"robust_mail": {"handlers": ["console"], "level": "INFO", "propagate": False}},
}
