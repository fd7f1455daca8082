"""The verifying TLS client context for SMTP connections, built once and shared.

Loading the system CA bundle costs tens of milliseconds of CPU, so a context is
built once per ``(ssl_cafile, ssl_certfile, ssl_keyfile)`` and reused for every
connection and every message. An ``SSLContext`` is safe to share between threads
once configured, and between a process and the children it forks.

The context always verifies: system CAs plus the provider's ``ssl_cafile`` (an
extra trust anchor, not a replacement), host name checking on, TLS 1.2 or newer.
A client certificate is loaded when ``ssl_certfile`` is set.

Imports nothing from Django.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from robust_mail.providers import ProviderConfig

__all__ = ["clear_tls_contexts", "tls_context"]

_Key = tuple[str | None, str | None, str | None]

# No lock: a single dict get / setdefault / clear is atomic, and a lock held while
# building (tens of milliseconds loading CA files) would be inherited *held* by a child
# forked meanwhile, whose first TLS connection would then wait forever. Two threads making
# their first connection at the same moment may both build; the first one stored wins.
_contexts: dict[_Key, ssl.SSLContext] = {}


def tls_context(provider: ProviderConfig) -> ssl.SSLContext:
    """The shared client context for ``provider``'s certificate files.

    Raises ``OSError`` (missing file) or ``ssl.SSLError`` (unusable file) if the
    files cannot be loaded; nothing is cached then, so a fixed file is picked up.
    Safe to call from any thread and in a child process forked at any moment.
    """
    key = (provider.ssl_cafile, provider.ssl_certfile, provider.ssl_keyfile)
    context = _contexts.get(key)
    if context is None:
        context = _contexts.setdefault(key, _build(*key))
    return context


def clear_tls_contexts() -> None:
    """Forget every cached context, e.g. after certificate files were replaced on disk."""
    _contexts.clear()


def _build(cafile: str | None, certfile: str | None, keyfile: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if cafile:
        context.load_verify_locations(cafile=cafile)
    if certfile:
        context.load_cert_chain(certfile, keyfile or None)
    # create_default_context already verifies; say so explicitly, it is the whole point.
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
