"""Settings of the example project (the site ``make demo`` runs).

Credentials and provider addresses come only from the environment; nothing
secret lives in this file. Without any environment the project runs on its
demo defaults: SQLite in ``.demo/`` and the two local SMTP servers that the
demo starts on 127.0.0.1 (primary on 2525, backup on 2526).
``settings_production.py`` shows the same project configured for real providers.

Environment variables:

- ``ROBUST_MAIL_PROVIDERS``: provider URLs separated by spaces, tried in order, e.g.
  ``smtp+tls://user:pass@smtp.example.com:587?name=primary smtps://u:p@backup.example:465``
  (percent-encode special characters in user names and passwords). Default: the two
  local demo servers.
- ``EXAMPLE_SMTP_PRIMARY_PORT``, ``EXAMPLE_SMTP_BACKUP_PORT``: ports of the local demo
  servers (2525, 2526); ``EXAMPLE_EMBEDDED_SMTP=1`` makes the web process run them
  (the demo runner sets it for the web server only).
- ``DJANGO_SECRET_KEY``, ``DJANGO_DEBUG`` (``1``/``0``), ``DJANGO_ALLOWED_HOSTS``.
- ``ROBUST_MAIL_FALLBACK``: ``outbox`` (default), ``console`` or ``none``.
- ``EXAMPLE_BREAKER_THRESHOLD``: failed messages that open a provider's breaker (2).
- ``EXAMPLE_DATA_DIR``: where the SQLite database, the shared cache and the generated
  secret key live (``.demo/``, git-ignored). ``EXAMPLE_CACHE``: ``file`` (default: shared
  by the web server and the worker) or ``locmem``; ``REDIS_URL`` wins over both.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent
DATA_DIR = Path(os.environ.get("EXAMPLE_DATA_DIR", BASE_DIR.parent / ".demo"))
DATA_DIR.mkdir(parents=True, exist_ok=True)


def _secret_key() -> str:
    # A random key kept in the (git-ignored) data directory: never committed.
    if key := os.environ.get("DJANGO_SECRET_KEY"):
        return key
    path = DATA_DIR / "secret_key"
    if not path.exists():
        # Created 0600 from the start: never readable by others, not even for a moment.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1 localhost").split()

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "robust_mail",
    "example_project.demo_site",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
# Passwords as usual, plus sign-in with a code sent by email (the site and the admin).
AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "robust_mail.auth_backends.EmailCodeBackend",
]
LOGIN_URL = "demo_site:sign_in"
LOGIN_REDIRECT_URL = "demo_site:dashboard"
ROOT_URLCONF = "example_project.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
WSGI_APPLICATION = "example_project.wsgi.application"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("EXAMPLE_DB", str(DATA_DIR / "db.sqlite3")),
        # The web server and the worker write to the same file: wait for each other's locks.
        "OPTIONS": {"timeout": 20},
    }
}
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

# Breakers, counters and rate limits live in this cache. The web server and the worker are
# two processes, so they share it through files (or Redis): the dashboard then shows what
# both did, and a breaker the web server opened is open for the worker too.
if redis_url := os.environ.get("REDIS_URL"):
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": redis_url,
            # A Redis that stops answering must not hold up sending (check W004).
            "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
        }
    }
elif os.environ.get("EXAMPLE_CACHE", "file") == "locmem":
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(DATA_DIR / "cache"),
            "OPTIONS": {"MAX_ENTRIES": 10_000},
        }
    }
STATIC_URL = "static/"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "robust-mail-demo@example.com")

EXAMPLE_SMTP_PORTS = {
    "primary": int(os.environ.get("EXAMPLE_SMTP_PRIMARY_PORT", "2525")),
    "backup": int(os.environ.get("EXAMPLE_SMTP_BACKUP_PORT", "2526")),
}
EXAMPLE_EMBEDDED_SMTP = os.environ.get("EXAMPLE_EMBEDDED_SMTP") == "1"
# The local demo's operator pages (dashboard, mailboxes, switches) are open to anyone on
# 127.0.0.1; settings_production.py closes them to staff.
EXAMPLE_OPEN_PAGES = os.environ.get("EXAMPLE_OPEN_PAGES", "1") == "1"

EMAIL_BACKEND = "robust_mail.backends.RobustEmailBackend"
_providers = os.environ.get(
    "ROBUST_MAIL_PROVIDERS",
    " ".join(
        f"smtp://127.0.0.1:{port}?name={name}&timeout=3"
        for name, port in EXAMPLE_SMTP_PORTS.items()
    ),
).split()
_fallback = os.environ.get("ROBUST_MAIL_FALLBACK", "outbox")
ROBUST_MAIL = {
    "PROVIDERS": _providers,
    "FALLBACK": None if _fallback == "none" else _fallback,
    # Short waits so that a person watching the dashboard sees retries, failover and the
    # breaker within seconds; production settings keep the library's defaults.
    "RETRY": {"ATTEMPTS": 2, "BACKOFF": 0.5, "MAX_BACKOFF": 2.0, "DEADLINE": 15.0},
    "CIRCUIT_BREAKER": {
        "FAILURE_THRESHOLD": int(os.environ.get("EXAMPLE_BREAKER_THRESHOLD", "2")),
        "RESET_TIMEOUT": 30,
    },
    "OUTBOX": {"RETRY_SCHEDULE": [5, 15, 60, 300], "MAX_AGE": 86400},
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        # The dashboard and mailbox poll every two seconds: keep that out of the terminal.
        "quiet_polling": {
            "()": "django.utils.log.CallbackFilter",
            "callback": lambda record: "/live/ " not in record.getMessage(),
        }
    },
    "formatters": {"short": {"format": "%(levelname)-7s %(name)s: %(message)s"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "short"},
        "requests": {"class": "logging.StreamHandler", "filters": ["quiet_polling"]},
    },
    "loggers": {
        "robust_mail": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "django.server": {"handlers": ["requests"], "level": "INFO", "propagate": False},
    },
}
