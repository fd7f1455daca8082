"""Test helpers for robust_mail and its users: a fault-injecting SMTP server.

No Django here. ``robust_mail.testing.dns`` (a test DNS server) is imported on
its own, not from this package, so using the SMTP server never loads dnspython.
"""

from __future__ import annotations

from robust_mail.testing.certs import TestCertificates, default_certificates
from robust_mail.testing.modes import Mode
from robust_mail.testing.received import ReceivedMessage
from robust_mail.testing.smtp import SMTPTestServer

__all__ = [
    "Mode",
    "ReceivedMessage",
    "SMTPTestServer",
    "TestCertificates",
    "default_certificates",
]
