"""Throw-away TLS certificates for the test SMTP server (trustme underneath).

One certificate authority signs a server certificate valid for the configured
names; clients trust it through ``ca_file``. A second, unrelated authority signs
an "untrusted" certificate for the same names, so tests can check that a client
refuses a server whose certificate does not chain to the CA it was given.
"""

from __future__ import annotations

import atexit
import os
import shutil
import ssl
import tempfile
import threading
from collections.abc import Iterable
from types import TracebackType

import trustme

DEFAULT_NAMES = ("localhost", "127.0.0.1", "mail.test")


class TestCertificates:
    """A CA, a server certificate signed by it, and a decoy signed by another CA.

    ``ca_file`` is a PEM file clients pass as ``cafile``; ``cert_file`` and
    ``key_file`` hold the server certificate chain and key, for running a server
    outside this module. Files live in a private temporary directory removed by
    ``cleanup()`` (or leaving the ``with`` block).
    """

    __test__ = False  # the name starts with "Test": keep pytest from collecting it

    def __init__(self, names: Iterable[str] = DEFAULT_NAMES) -> None:
        self.names: tuple[str, ...] = tuple(names)
        if not self.names:
            raise ValueError("TestCertificates needs at least one name")
        self._ca = trustme.CA(organization_name="robust_mail test CA")
        self._cert = self._ca.issue_cert(*self.names)
        self._untrusted_cert: trustme.LeafCert | None = None
        self._lock = threading.Lock()
        self.directory = tempfile.mkdtemp(prefix="robust-mail-certs-")
        self.ca_file = os.path.join(self.directory, "ca.pem")
        self.cert_file = os.path.join(self.directory, "server.pem")
        self.key_file = os.path.join(self.directory, "server.key")
        self._ca.cert_pem.write_to_path(self.ca_file)
        with open(self.cert_file, "wb") as chain:
            for blob in self._cert.cert_chain_pems:
                chain.write(blob.bytes())
        self._cert.private_key_pem.write_to_path(self.key_file)

    def server_context(self) -> ssl.SSLContext:
        """A new server-side context presenting the certificate signed by ``ca_file``."""
        context = _server_context()
        self._cert.configure_cert(context)
        return context

    def untrusted_server_context(self) -> ssl.SSLContext:
        """A new server-side context whose certificate comes from another CA."""
        with self._lock:
            # Generated on first use: most tests never need it.
            if self._untrusted_cert is None:
                other = trustme.CA(organization_name="robust_mail untrusted CA")
                self._untrusted_cert = other.issue_cert(*self.names)
            cert = self._untrusted_cert
        context = _server_context()
        cert.configure_cert(context)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts ``ca_file`` (and nothing else)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_verify_locations(cafile=self.ca_file)
        return context

    def cleanup(self) -> None:
        """Remove the certificate files. Idempotent."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> TestCertificates:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


def _server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


_default: TestCertificates | None = None
_default_lock = threading.Lock()


def default_certificates() -> TestCertificates:
    """The process-wide certificates used when a server is given none.

    Shared so that starting hundreds of TLS servers costs one key generation;
    removed at interpreter exit. Do not call ``cleanup()`` on it.
    """
    global _default
    with _default_lock:
        if _default is None:
            _default = TestCertificates()
            atexit.register(_default.cleanup)
        return _default
