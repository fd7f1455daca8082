"""The verifying TLS client context for SMTP connections, built once and shared.

Loading the system CA bundle costs tens of milliseconds of CPU, so a context is
built once per ``(ssl_cafile, ssl_certfile, ssl_keyfile)`` and reused for every
connection and every message. An ``SSLContext`` is safe to share between threads
once configured.

The context always verifies: system CAs plus the provider's ``ssl_cafile`` (an
extra trust anchor, not a replacement), host name checking on, TLS 1.2 or newer.
A client certificate is loaded when ``ssl_certfile`` is set.

Imports nothing from Django.
"""

from __future__ import annotations

import ssl
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from robust_mail.providers import ProviderConfig

__all__ = ["clear_tls_contexts", "tls_context"]

_Key = tuple[str | None, str | None, str | None]

_contexts: dict[_Key, ssl.SSLContext] = {}
# Held while building, so concurrent first connections build one context, not several.
_lock = threading.Lock()


def tls_context(provider: ProviderConfig) -> ssl.SSLContext:
    """The shared client context for ``provider``'s certificate files.

    Raises ``OSError`` (missing file) or ``ssl.SSLError`` (unusable file) if the
    files cannot be loaded; nothing is cached then, so a fixed file is picked up.
    """
    key = (provider.ssl_cafile, provider.ssl_certfile, provider.ssl_keyfile)
    with _lock:
        context = _contexts.get(key)
        if context is None:
            context = _build(*key)
            _contexts[key] = context
        return context


def clear_tls_contexts() -> None:
    """Forget every cached context, e.g. after certificate files were replaced on disk."""
    with _lock:
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
