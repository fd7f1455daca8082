"""Test helpers for robust_mail and its users: a fault-injecting SMTP server.

No Django here. ``robust_mail.testing.dns`` (a test DNS server) is imported on
its own, not from this package, so using the SMTP server never loads dnspython.
"""

from __future__ import annotations

from robust_mail.testing.certs import TestCertificates, default_certificates
from robust_mail.testing.modes import Mode
from robust_mail.testing.received import ReceivedMessage

try:
    from robust_mail.testing.smtp import SMTPTestServer
except ModuleNotFoundError as exc:  # say which extra brings it, not just its name
    if (exc.name or "").partition(".")[0] != "aiosmtpd":
        raise
    raise ModuleNotFoundError(
        "robust_mail.testing needs aiosmtpd, from the testing extra: "
        "pip install 'robust-mail[testing]'",
        name="aiosmtpd",
    ) from exc

__all__ = [
    "Mode",
    "ReceivedMessage",
    "SMTPTestServer",
    "TestCertificates",
    "default_certificates",
]
