"""Django's own ``tests/mail`` package, for the installed Django version, importable as a package.

Django's test suite is not part of its wheel, only of its sdist. :func:`load_mail_tests` fetches
the sdist of exactly the installed version once (``pip download --no-binary :all:``, into
``.cache/django-sdist/``), copies its ``tests/mail/`` unchanged to
``.cache/django-tests/<version>/django_mail_tests/`` and imports it from there. The unique
package name keeps it apart from our own ``tests`` package, and its relative imports
(``from .tests import ...``) keep working because the directory stays a package.

Both steps are atomic (a temporary directory, then a rename), so parallel tox environments
sharing the cache cannot see half a download or half a copy.
"""

from __future__ import annotations

import contextlib
import email.errors
import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as distribution_version
from pathlib import Path, PurePosixPath
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE = REPO_ROOT / ".cache"
SDIST_DIR = CACHE / "django-sdist"
TESTS_DIR = CACHE / "django-tests"
PACKAGE = "django_mail_tests"
DOWNLOAD_TIMEOUT = 300  # seconds; pip's own per-request timeout is shorter


class SdistUnavailable(Exception):
    """Django's tests for the installed version could not be fetched or imported."""


def django_version() -> str:
    """The installed Django distribution's exact version, e.g. ``"5.2.19"``."""
    try:
        return distribution_version("Django")
    except PackageNotFoundError as exc:  # pragma: no cover - Django is a dependency
        raise SdistUnavailable("Django is not installed as a distribution") from exc


def load_mail_tests(submodule: str = "tests") -> ModuleType:
    """Import ``<Django sdist>/tests/mail/<submodule>.py`` as ``django_mail_tests.<submodule>``.

    Raises :class:`SdistUnavailable` when the sdist cannot be downloaded or does not have it.
    """
    version = django_version()
    root = extract_mail_tests(version)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    name = f"{PACKAGE}.{submodule}"
    loaded = sys.modules.get(PACKAGE)
    if loaded is not None and Path(loaded.__file__ or "").parent.parent != root:
        raise SdistUnavailable(f"{PACKAGE} is already imported from {loaded.__file__}")
    if not (root / PACKAGE / f"{submodule}.py").is_file():
        raise SdistUnavailable(f"Django {version}'s tests/mail has no {submodule}.py")
    with _stdlib_names_for_import():
        return importlib.import_module(name)


@contextlib.contextmanager
def _stdlib_names_for_import() -> Iterator[None]:
    """Lend the stdlib names Django's test modules import but an older patch release lacks.

    Django 6.1's ``test_backends.py`` imports ``email.errors.HeaderWriteError`` (added in
    Python 3.12.5 and 3.13.0) for one SMTP-backend test we do not run; Python 3.12.1 lacks
    it, and the import alone would make every test in that module unavailable. The name
    exists only while the module is imported (it keeps its own reference) and is then
    removed, so nothing else ever sees a changed stdlib; with a newer Python this does
    nothing.
    """
    lent = not hasattr(email.errors, "HeaderWriteError")
    if lent:
        email.errors.HeaderWriteError = type(  # type: ignore[attr-defined]
            "HeaderWriteError",
            (email.errors.MessageError,),
            {"__doc__": "Error while writing headers.", "__module__": "email.errors"},
        )
    try:
        yield
    finally:
        if lent:
            del email.errors.HeaderWriteError  # type: ignore[attr-defined]


def extract_mail_tests(version: str) -> Path:
    """The directory holding ``django_mail_tests/`` for ``version``, extracting it if needed."""
    root = TESTS_DIR / version
    if (root / PACKAGE / "__init__.py").is_file():
        return root
    sdist = fetch_sdist(version)
    TESTS_DIR.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=TESTS_DIR))
    try:
        _copy_mail_tests(sdist, staging / PACKAGE)
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the copy from other users
        try:
            staging.rename(root)
        except OSError:
            if not (root / PACKAGE / "__init__.py").is_file():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def fetch_sdist(version: str) -> Path:
    """The path of Django ``version``'s sdist in the cache, downloading it with pip if needed."""
    found = _cached_sdist(version)
    if found is not None:
        return found
    SDIST_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=SDIST_DIR) as staging:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--disable-pip-version-check",
            f"Django=={version}",
            "-d",
            staging,
        ]
        try:
            done = subprocess.run(  # a fixed command, no shell
                command,
                capture_output=True,
                text=True,
                timeout=DOWNLOAD_TIMEOUT,
                check=False,
                env={**os.environ, "PIP_NO_INPUT": "1"},
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SdistUnavailable(f"pip download of Django=={version} failed: {exc}") from exc
        downloaded = _sdists_in(Path(staging), version)
        if done.returncode != 0 or not downloaded:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise SdistUnavailable(
                f"pip download of the Django=={version} sdist failed "
                f"(exit {done.returncode}):\n{tail}"
            )
        target = SDIST_DIR / downloaded[0].name
        os.replace(downloaded[0], target)
    return target


def _cached_sdist(version: str) -> Path | None:
    found = _sdists_in(SDIST_DIR, version) if SDIST_DIR.is_dir() else []
    return found[0] if found else None


def _sdists_in(directory: Path, version: str) -> list[Path]:
    # Newer sdists are named django-X.tar.gz, older ones Django-X.tar.gz.
    wanted = f"django-{version}.tar.gz"
    return sorted(p for p in directory.iterdir() if p.name.lower() == wanted)


def _copy_mail_tests(sdist: Path, destination: Path) -> None:
    """Copy ``<top>/tests/mail/**`` out of the sdist into ``destination``, byte for byte."""
    copied = 0
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive:
            parts = PurePosixPath(member.name).parts
            if len(parts) < 4 or parts[1:3] != ("tests", "mail") or not member.isfile():
                continue
            relative = parts[3:]
            if any(part in ("", ".", "..") for part in relative):
                continue  # never write outside the destination
            source = archive.extractfile(member)
            if source is None:  # pragma: no cover - isfile() members always have data
                continue
            target = destination.joinpath(*relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            with source, open(target, "wb") as out:
                shutil.copyfileobj(source, out)
            copied += 1
    if not (destination / "__init__.py").is_file():
        raise SdistUnavailable(f"{sdist.name} has no tests/mail package ({copied} files found)")
