"""The demo account that ``make demo`` creates."""

from __future__ import annotations

import secrets
from typing import Any

from django.contrib.auth import get_user_model

DEMO_EMAIL = "demo@example.com"


def ensure_demo_user(email: str = DEMO_EMAIL) -> tuple[Any, bool]:
    """Create the staff user ``email`` once; return it and whether it was created.

    Its password is random and shown nowhere: one signs in with an emailed code, or sets
    a password through a reset by code. (A password nobody knows rather than an unusable
    one, because robust_mail, like Django, resets only passwords that exist.)
    """
    user_model = get_user_model()
    user = user_model._default_manager.filter(email__iexact=email).first()
    if user is not None:
        return user, False
    user = user_model._default_manager.create_user(
        username=email,
        email=email,
        password=secrets.token_urlsafe(32),
        is_staff=True,
        is_superuser=True,
    )
    return user, True
