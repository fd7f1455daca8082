"""robust_mail: outgoing email for Django that survives dead providers, flaky networks, crashes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"
__all__ = ["EmailService", "__version__"]

if TYPE_CHECKING:
    from robust_mail.service import EmailService


def __getattr__(name: str) -> Any:
    # Lazy so that importing robust_mail (e.g. from settings.py) never imports Django models.
    if name == "EmailService":
        from robust_mail.service import EmailService

        return EmailService
    raise AttributeError(f"module 'robust_mail' has no attribute {name!r}")
