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

import os
import ssl
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from robust_mail.providers import ProviderConfig

__all__ = ["check_tls_files", "clear_tls_contexts", "server_name", "tls_context"]

_Key = tuple[str | None, str | None, str | None]

# The first connections of a worker's threads start together: one of them builds the
# context while the others wait for it, instead of each spending the CPU on its own copy.
# One lock per certificate-file set, so a slow file (a network mount) delays only the
# providers that use it. A lock held by another thread at fork() would stay held in the
# child: the child starts with fresh locks (and builds its own context if need be).
_contexts: dict[_Key, ssl.SSLContext] = {}
_guard = threading.Lock()
_building: dict[_Key, threading.Lock] = {}
#: Counts clear_tls_contexts() calls, so that a build it overlapped is not cached.
_generation = 0


def tls_context(provider: ProviderConfig) -> ssl.SSLContext:
    """The shared client context for ``provider``'s certificate files.

    Raises ``OSError`` (missing file) or ``ssl.SSLError`` (unusable file) if the
    files cannot be loaded; nothing is cached then, so a fixed file is picked up.
    Safe to call from any thread and in a child process forked at any moment.
    """
    key = (provider.ssl_cafile, provider.ssl_certfile, provider.ssl_keyfile)
    context = _contexts.get(key)
    if context is not None:
        return context
    with _guard:
        lock = _building.setdefault(key, threading.Lock())
    with lock:
        context = _contexts.get(key)
        if context is None:
            generation = _generation
            context = _build(*key)
            if generation == _generation:  # else the files were cleared meanwhile: stale
                _contexts[key] = context
    return context


def check_tls_files(provider: ProviderConfig) -> None:
    """Load ``provider``'s certificate files the way a connection will, without caching.

    Raises what :func:`tls_context` would (``OSError``, ``ssl.SSLError``), so that a file
    that exists but is not PEM, or a key that does not match its certificate, is found by
    the system checks instead of at every send. An encrypted key fails here too: nothing
    could supply its passphrase at send time either.
    """
    _build(provider.ssl_cafile, provider.ssl_certfile, provider.ssl_keyfile, password=_none)


def _none() -> str:
    # Never prompt on a terminal for a passphrase from a system check.
    return ""


def server_name(host: str) -> str:
    """The name TLS sends (SNI) and checks the certificate against, for ``host``.

    ``host`` without its trailing dot: "mail.example.com." is the same name as
    "mail.example.com" (the resolver strips the dot too), but certificates never
    name the DNS root and OpenSSL compares the two literally.
    """
    return host.rstrip(".")


def clear_tls_contexts() -> None:
    """Forget every cached context, e.g. after certificate files were replaced on disk.

    A context being built meanwhile (from the files as they were) is used once, not kept.
    """
    global _generation
    _generation += 1
    _contexts.clear()


def _build(
    cafile: str | None,
    certfile: str | None,
    keyfile: str | None,
    password: Callable[[], str] | None = None,
) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if cafile:
        context.load_verify_locations(cafile=cafile)
    if certfile:
        context.load_cert_chain(certfile, keyfile or None, password)
    # create_default_context already verifies; say so explicitly, it is the whole point.
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _after_fork_in_child() -> None:
    global _guard, _building
    _guard = threading.Lock()
    _building = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
