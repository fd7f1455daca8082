"""The faults the test SMTP server can be told to inject."""

from __future__ import annotations

import enum


class Mode(enum.StrEnum):
    """How the server behaves; see docs/testing.md for what a client sees in each."""

    ACCEPT = "accept"
    """A well-behaved server: every message is accepted and recorded."""
    REFUSE = "refuse"
    """The port stops listening, so connecting fails with ECONNREFUSED."""
    BLACKHOLE = "blackhole"
    """TCP connections are accepted but the server never greets."""
    GREETING_421 = "greeting_421"
    """The greeting is ``421`` and the connection is closed."""
    MAIL_421 = "mail_421"
    """``MAIL FROM`` is answered with ``421`` and the connection is closed."""
    DATA_451 = "data_451"
    """The final dot is answered with ``451``; the message is not recorded."""
    AUTH_535 = "auth_535"
    """``AUTH`` is offered and always fails with ``535``."""
    RCPT_550 = "rcpt_550"
    """Recipients are refused with ``550 5.1.1`` (all, or those in ``refuse_recipients``)."""
    DROP_MID_DATA = "drop_mid_data"
    """The connection is dropped in the data phase, before the final dot; nothing recorded."""
    DISCONNECT_AFTER_DATA = "disconnect_after_data"
    """The message is recorded, then the connection closes without a reply (ambiguous)."""
    STALL_AFTER_DATA = "stall_after_data"
    """The message is recorded and the final dot is never answered."""
    SLOW = "slow"
    """Every reply, the greeting included, is delayed by ``reply_delay`` seconds."""
    NO_STARTTLS = "no_starttls"
    """``STARTTLS`` is not advertised (nor accepted), even with ``tls="starttls"``."""
    UNTRUSTED_CERT = "untrusted_cert"
    """TLS uses a certificate signed by a CA other than ``certificates.ca_file``."""
