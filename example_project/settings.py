"""Settings of the example project.

Credentials and provider addresses come only from the environment; nothing
secret lives in this file. Without any environment the project runs on its
embedded defaults: SQLite and the two local SMTP servers that `make demo`
starts on 127.0.0.1 (primary on 2525, backup on 2526).

Environment variables:

- ``ROBUST_MAIL_PROVIDERS``: provider URLs separated by spaces, tried in order, e.g.
  ``smtp+tls://user:pass@smtp.example.com:587?name=primary smtps://u:p@backup.example:465``
  (percent-encode special characters in user names and passwords).
- ``DJANGO_SECRET_KEY``, ``DJANGO_DEBUG`` (``1``/``0``), ``DJANGO_ALLOWED_HOSTS``.
- ``ROBUST_MAIL_FALLBACK``: ``outbox`` (default), ``console`` or ``none``.
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
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
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
ROOT_URLCONF = "example_project.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
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
        "OPTIONS": {"timeout": 20},
    }
}
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
if redis_url := os.environ.get("REDIS_URL"):
    CACHES["default"] = {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": redis_url,
    }
STATIC_URL = "static/"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "robust-mail-demo@example.com")

EMAIL_BACKEND = "robust_mail.backends.RobustEmailBackend"
_providers = os.environ.get(
    "ROBUST_MAIL_PROVIDERS",
    "smtp://127.0.0.1:2525?name=primary&timeout=3 smtp://127.0.0.1:2526?name=backup&timeout=3",
).split()
_fallback = os.environ.get("ROBUST_MAIL_FALLBACK", "outbox")
ROBUST_MAIL = {
    "PROVIDERS": _providers,
    "FALLBACK": None if _fallback == "none" else _fallback,
    "RETRY": {"ATTEMPTS": 2, "BACKOFF": 0.5, "MAX_BACKOFF": 2.0, "DEADLINE": 15.0},
    "CIRCUIT_BREAKER": {"FAILURE_THRESHOLD": 3, "RESET_TIMEOUT": 30},
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"short": {"format": "%(levelname)-7s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "short"}},
    "loggers": {"robust_mail": {"handlers": ["console"], "level": "INFO", "propagate": False}},
}
