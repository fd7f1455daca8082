"""Test TLS certificates for the test SMTP server (trustme underneath).

One certificate authority signs a server certificate valid for the configured
names; clients trust it through ``ca_file``. A second, unrelated authority signs
an "untrusted" certificate for the same names, so tests can check that a client
refuses a server whose certificate does not chain to the CA it was given.

trustme is imported only when certificates are made, so a plain-text server
runs without it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import ssl
import tempfile
import threading
from collections.abc import Iterable, Iterator
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import trustme

DEFAULT_NAMES = ("localhost", "127.0.0.1", "mail.test")


class TestCertificates:
    """A CA, a server certificate signed by it, and a decoy signed by another CA.

    ``ca_file`` is a PEM file clients pass as ``cafile``; ``cert_file`` and
    ``key_file`` hold the server certificate chain and key, for running a server
    outside this module.

    Without ``directory`` the files live in a private temporary directory removed
    by ``cleanup()`` (or leaving the ``with`` block). With ``directory`` they are
    kept there: made on first use, reused by every later instance (so clients
    keep trusting the same ``ca_file``), never removed. Reused files keep the
    names they were made for; asking for other names raises ``ValueError``.
    Key files are written with mode 0600.
    """

    __test__ = False  # the name starts with "Test": keep pytest from collecting it

    def __init__(
        self,
        names: Iterable[str] = DEFAULT_NAMES,
        *,
        directory: str | os.PathLike[str] | None = None,
    ) -> None:
        self.names: tuple[str, ...] = tuple(names)
        if not self.names:
            raise ValueError("TestCertificates needs at least one name")
        _trustme()  # a missing extra is reported before any file is made
        self._untrusted_cert: trustme.LeafCert | None = None
        self._lock = threading.Lock()
        self._kept = directory is not None
        if directory is None:
            self.directory = tempfile.mkdtemp(prefix="robust-mail-certs-")
        else:
            self.directory = os.path.abspath(directory)
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self.ca_file = os.path.join(self.directory, "ca.pem")
        self.cert_file = os.path.join(self.directory, "server.pem")
        self.key_file = os.path.join(self.directory, "server.key")
        self._names_file = os.path.join(self.directory, "names.txt")
        # None when the certificate was loaded from files made by an earlier instance.
        self._cert: trustme.LeafCert | None
        if not self._kept:
            try:
                self._cert = self._create()
            except BaseException:
                self.cleanup()
                raise
            return
        # Two servers started together on a fresh directory must not each write half a set.
        with _exclusive(os.path.join(self.directory, ".lock")):
            if os.path.exists(self.ca_file):  # written last: the set is complete
                self._check_names()
                self._cert = None
            else:
                self._cert = self._create()

    def _create(self) -> trustme.LeafCert:
        ca = _trustme().CA(organization_name="robust_mail test CA")
        cert = ca.issue_cert(*self.names)
        _write(self.key_file, cert.private_key_pem.bytes())
        _write(self.cert_file, b"".join(blob.bytes() for blob in cert.cert_chain_pems), 0o644)
        _write(self._names_file, "".join(f"{name}\n" for name in self.names).encode(), 0o644)
        _write(self.ca_file, ca.cert_pem.bytes(), 0o644)
        return cert

    def _check_names(self) -> None:
        with open(self._names_file, encoding="utf-8") as file:
            stored = tuple(file.read().split())
        if stored != self.names:
            raise ValueError(
                f"{self.directory} holds certificates for {', '.join(stored)}, not "
                f"{', '.join(self.names)}: use another directory, or delete this one"
            )

    def server_context(self) -> ssl.SSLContext:
        """A new server-side context presenting the certificate signed by ``ca_file``."""
        context = _server_context()
        if self._cert is None:
            context.load_cert_chain(self.cert_file, self.key_file)
        else:
            self._cert.configure_cert(context)
        return context

    def untrusted_server_context(self) -> ssl.SSLContext:
        """A new server-side context whose certificate comes from another CA."""
        with self._lock:
            # Generated on first use: most tests never need it.
            if self._untrusted_cert is None:
                other = _trustme().CA(organization_name="robust_mail untrusted CA")
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
        """Remove the certificate files, unless they were given a ``directory``. Idempotent."""
        if not self._kept:
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


def _trustme() -> ModuleType:
    try:
        import trustme
    except ModuleNotFoundError as exc:
        if exc.name != "trustme":
            raise
        raise ModuleNotFoundError(
            "TLS certificates for the test SMTP server need trustme, from the testing "
            "extra: pip install 'robust-mail[testing]'",
            name="trustme",
        ) from exc
    return trustme


def _write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` at once: a reader sees the old file or the new one.

    The temporary file is created 0600, so a key is never readable by others, even briefly.
    """
    descriptor, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def _exclusive(path: str) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if missing) while in the block."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock, servers started together may race on first use
        yield
        return
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


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
