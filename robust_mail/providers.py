"""One SMTP provider's settings, and the provider URL syntax.

Plain Python, no Django: the transport and pool layers key on :class:`ProviderConfig`.

Provider URLs::

    smtp://host[:port]                    plain SMTP, default port 25
    smtp+tls://user:pass@host[:port]      STARTTLS required, default port 587
    smtps://user:pass@host[:port]         implicit TLS, default port 465
    smtp://[::1]:2525?name=local&timeout=5&force_ipv4=false

User and password are percent-decoded. Query keys are the lower-case provider keys
listed in :data:`URL_QUERY_KEYS`. A provider without a name is named after its host
(or, for a ``MAILER`` entry, after the mailer alias); see :func:`default_name`.

Error messages never contain the password: URLs are shown through :func:`mask_password`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

#: scheme -> (use_tls, use_ssl, default port)
SCHEMES: dict[str, tuple[bool, bool, int]] = {
    "smtp": (False, False, 25),
    "smtp+tls": (True, False, 587),
    "smtps": (False, True, 465),
}

#: Query keys a provider URL may carry (the lower-case provider dict keys).
URL_QUERY_KEYS = (
    "name", "timeout", "ssl_cafile", "ssl_certfile", "ssl_keyfile", "force_ipv4", "chunking",
)  # fmt: skip

_HOST_PORT = re.compile(r"[\w.\-]+(:\d*)?|\[[0-9A-Fa-f:.]+\](:\d*)?")

_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


@dataclass(frozen=True)
class ProviderConfig:
    """Everything needed to open one SMTP session with one provider.

    Hashable: the pool keys its connections on the whole object, so two providers that
    differ in any setting never share a connection. Breakers and metrics use ``name``.
    """

    name: str
    host: str = "localhost"
    port: int = 25
    username: str = ""
    password: str = field(default="", repr=False)  # never printed
    use_tls: bool = False  # STARTTLS required
    use_ssl: bool = False  # implicit TLS
    timeout: float = 10.0  # seconds, per network step, never None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    force_ipv4: bool = True  # already resolved against the global FORCE_IPV4
    chunking: bool = True  # send runs with BDAT when the server offers CHUNKING
    mailer: str | None = None  # Django 6.1: name of another MAILERS alias to delegate to

    @property
    def safe_url(self) -> str:
        """The provider as a URL without its password, for logs and status output."""
        if self.mailer is not None:
            return f"mailer:{self.mailer}"
        scheme = "smtps" if self.use_ssl else "smtp+tls" if self.use_tls else "smtp"
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{host}:{self.port}"


class ProviderURLError(ValueError):
    """A provider URL could not be parsed. The message never contains the password."""

    def __init__(self, url: str, reason: str, *, index: int) -> None:
        self.index = index
        #: The URL with its password replaced by ``***``.
        self.url = mask_password(url)
        self.reason = reason
        super().__init__(f"provider URL #{index} {self.url!r}: {reason}")


def default_port(*, use_tls: bool, use_ssl: bool) -> int:
    """The conventional port for a TLS mode: 465 implicit TLS, 587 STARTTLS, else 25."""
    if use_ssl:
        return 465
    return 587 if use_tls else 25


def default_name(*, host: str, mailer: str | None = None) -> str:
    """The name of a provider that has none: its mailer alias, else its host.

    The one naming rule for dicts and URLs alike. Two unnamed providers on the same host
    therefore collide, which configuration reports as a duplicate name.
    """
    return mailer if mailer else host


def parse_bool(text: str) -> bool:
    """Parse ``true/false/1/0/yes/no`` (any case). Anything else is a ValueError."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected true/false/1/0/yes/no, got {text!r}")


def mask_password(url: str) -> str:
    """Return ``url`` with the password of its user info replaced by ``***``.

    Deliberately cruder than ``urlsplit``: an unencoded ``/``, ``?`` or ``#`` inside a
    password confuses a real URL parser, and a leaked fragment is still a leak. Everything
    between the first ``:`` after ``//`` and the *last* ``@`` is masked, which can hide
    more than the password but never less. Without ``//`` the masking starts at the first
    ``:``, so a scheme-less ``user:pw@host`` is covered as well.
    """
    start = url.find("//")
    start = 0 if start < 0 else start + 2  # "user:pw@host" without a scheme is masked too
    at = url.rfind("@")
    if at < start:
        return url
    colon = url.find(":", start, at)
    if colon < 0:
        return url
    return f"{url[: colon + 1]}***{url[at:]}"


def parse_provider_url(url: str, *, index: int) -> dict[str, object]:
    """Parse a provider URL into a provider dict with the upper-case setting keys.

    The result always has NAME, HOST, PORT, USERNAME, PASSWORD, USE_TLS and USE_SSL,
    plus any of TIMEOUT, SSL_CAFILE, SSL_CERTFILE, SSL_KEYFILE, FORCE_IPV4 given in the
    query. Values have their Python types; range checks (timeout > 0 ...) are left to
    the configuration layer, which checks dict and URL providers the same way.

    Raises :class:`ProviderURLError` (a ValueError) naming ``index`` and the masked URL.
    """

    def fail(reason: str) -> ProviderURLError:
        unencoded = _unencoded_in_credentials(url)
        if unencoded is not None:
            # The real cause of whatever failed (a "port" that is half a password, a
            # "query" that ends in @host): say it, without echoing the password.
            code = {"/": "%2F", "?": "%3F", "#": "%23"}[unencoded]
            reason = f"unencoded {unencoded!r} in the user or password; percent-encode it ({code})"
        return ProviderURLError(url, reason, index=index)

    if "://" not in url:
        raise fail("not a URL; expected smtp://, smtp+tls:// or smtps://")
    scheme = url.split("://", 1)[0].strip().lower()
    if scheme not in SCHEMES:
        raise fail(f"unknown scheme {scheme!r}; use smtp://, smtp+tls:// or smtps://")
    try:
        parts = urlsplit(url)
    except ValueError:
        # Only malformed IPv6 brackets get here; urllib's own message may quote the URL.
        raise fail("malformed host; write IPv6 addresses in brackets, e.g. [::1]") from None
    if parts.fragment:
        raise fail("unexpected '#'; percent-encode it in the user or password (%23)")
    if parts.path not in ("", "/"):
        raise fail("unexpected path; percent-encode '/' in the user or password (%2F)")
    host = parts.hostname or ""
    if not host or any(ch.isspace() for ch in host):
        raise fail("no host name")
    try:
        explicit_port = parts.port
    except ValueError:
        explicit_port = -1  # not a number / out of range; never echo it: it may be a password
    if explicit_port is not None and not 1 <= explicit_port <= 65535:
        raise fail("port must be a number from 1 to 65535")
    use_tls, use_ssl, port = SCHEMES[scheme]
    result: dict[str, object] = {
        "HOST": host,
        "PORT": explicit_port if explicit_port is not None else port,
        "USERNAME": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "USE_TLS": use_tls,
        "USE_SSL": use_ssl,
    }
    result.update(_parse_query(parts.query, fail))
    result.setdefault("NAME", default_name(host=host))
    return {"NAME": result.pop("NAME"), **result}


def _unencoded_in_credentials(url: str) -> str | None:
    """The '/', '?' or '#' that cut the user or password short, if that is what happened.

    Such a character ends the URL's authority early, so the '@' before the host lands in
    the path, query or fragment and the authority itself has none.
    """
    rest = url.split("://", 1)[-1]
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=-1)
    if cut < 0 or "@" in rest[:cut] or "@" not in rest[cut:]:
        return None
    # What follows the '@' must look like host[:port]: an '@' inside a query value
    # (?ssl_cafile=/certs/a@b.pem) is not a credential separator.
    after = re.split(r"[/?#]", rest.rsplit("@", 1)[1], maxsplit=1)[0]
    return rest[cut] if _HOST_PORT.fullmatch(after) else None


def _parse_query(query: str, fail: Callable[[str], ProviderURLError]) -> dict[str, object]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise fail("malformed query string; expected key=value pairs joined by '&'") from None
    out: dict[str, object] = {}
    for key, value in pairs:
        if key not in URL_QUERY_KEYS:
            raise fail(f"unknown query key {key!r}; valid keys: {', '.join(URL_QUERY_KEYS)}")
        upper = key.upper()
        if upper in out:
            raise fail(f"query key {key!r} given twice")
        if key == "timeout":
            try:
                seconds = float(value)
            except ValueError:
                raise fail(f"timeout must be a number of seconds, got {value!r}") from None
            if not math.isfinite(seconds):
                raise fail(f"timeout must be a finite number of seconds, got {value!r}")
            out[upper] = seconds
        elif key in ("force_ipv4", "chunking"):
            try:
                out[upper] = parse_bool(value)
            except ValueError as exc:
                raise fail(f"{key}: {exc}") from None
        else:
            if not value:
                raise fail(f"query key {key!r} has an empty value")
            out[upper] = value
    return out
