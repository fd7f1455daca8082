"""Reading the PROVIDERS list (dicts and URLs) into ProviderConfig objects.

Private to ``conf.py``. Plain Python: the Django-only part, building a provider from
``settings.EMAIL_*``, stays in ``conf.py`` and calls :func:`read_provider` like the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from robust_mail import _conf_fields as f
from robust_mail.providers import (
    URL_QUERY_KEYS,
    ProviderConfig,
    ProviderURLError,
    default_name,
    default_port,
    mask_password,
    parse_provider_url,
)

PROVIDER_KEYS = (
    "NAME", "HOST", "PORT", "USERNAME", "PASSWORD", "USE_TLS", "USE_SSL", "TIMEOUT",
    "SSL_CAFILE", "SSL_CERTFILE", "SSL_KEYFILE", "FORCE_IPV4", "CHUNKING", "MAILER",
)  # fmt: skip


def read_providers(r: f.Reader, raw: object, force_ipv4: bool) -> tuple[ProviderConfig, ...]:
    """The PROVIDERS list (dicts and URLs), each checked, names unique.

    An empty list is the caller's to report: only it knows whether ``settings.EMAIL_*``
    may stand in.
    """
    path: tuple[str | int, ...] = (r.key("PROVIDERS"),)
    if not isinstance(raw, list | tuple):
        r.report(
            "E008",
            f"{r.label(*path)} must be a list of provider dicts or URLs, got {type(raw).__name__}.",
            "Wrap a single provider in a list: [ ... ].",
        )
        return ()
    providers: list[ProviderConfig] = []
    for index, entry in enumerate(raw):
        here = (*path, index)
        if isinstance(entry, str):
            try:
                parsed = parse_provider_url(entry, index=index)
            except ProviderURLError as exc:
                r.report(
                    "E004",
                    f"{r.label(*here)} is not a valid provider URL ({exc.url!r}): {exc.reason}.",
                    "Write smtp://, smtp+tls:// or smtps://user:password@host:port?name=...; "
                    "percent-encode special characters in the user name and password.",
                )
                continue
            url_label = f"{r.label(*here)} ({mask_password(entry)!r})"
            provider = read_provider(r, parsed, _url_labeler(url_label), force_ipv4)
        elif isinstance(entry, Mapping):
            given = r.mapping(entry, here, PROVIDER_KEYS)
            if given is None:
                continue
            provider = read_provider(r, given, _dict_labeler(r, here), force_ipv4)
        else:
            r.report(
                "E008",
                f"{r.label(*here)} must be a provider dict or URL string, "
                f"got {type(entry).__name__}.",
                "See the provider keys in docs/settings.md.",
            )
            continue
        if provider is not None:
            providers.append(provider)
    _check_unique_names(r, providers, path)
    return tuple(providers)


def _url_labeler(url_label: str) -> f.Labeler:
    def label(key: str) -> str:
        if key.lower() in URL_QUERY_KEYS:
            return f"{url_label} query {key.lower()!r}"
        # The host, port and credentials are in the URL itself, not in its query.
        return f"{url_label} {key.lower()}"

    return label


def _dict_labeler(r: f.Reader, path: tuple[str | int, ...]) -> f.Labeler:
    def label(key: str) -> str:
        return r.label(*path, r.key(key))

    return label


def read_provider(
    r: f.Reader,
    given: Mapping[str, object],
    label: f.Labeler,
    force_ipv4: bool,
    *,
    password_needs_user: bool = True,
) -> ProviderConfig | None:
    """One provider from a dict keyed by the upper-case provider keys, or None (reported).

    ``label(key)`` names a key in messages the way the user wrote it; ``force_ipv4`` is
    the global setting a provider's FORCE_IPV4 None defers to. ``password_needs_user``
    False keeps Django's own leniency for ``settings.EMAIL_*``, where a password without
    a user name is simply not used.
    """
    before = len(r.problems)
    out: dict[str, Any] = {}

    def take(key: str, convert: f.Converter) -> None:
        if key in given:
            r.take(given, key, label(key), convert, into=out)

    take("MAILER", f.optional(f.text))
    mailer = out.get("mailer")
    if mailer is not None:
        extra = [r.key(k) for k in given if k not in ("NAME", "MAILER")]
        if extra:
            r.report(
                "E008",
                f"{label('MAILER')} delegates to another mailer, so {', '.join(extra)} "
                "has no effect on it.",
                "A MAILER provider takes only NAME and MAILER; configure the other "
                "mailer in its own MAILERS entry.",
            )
    for key in ("HOST", "USERNAME", "PASSWORD", "USE_TLS", "USE_SSL", "PORT", "TIMEOUT"):
        take(key, f.PROVIDER_CONVERTERS[key])
    for key in ("SSL_CAFILE", "SSL_CERTFILE", "SSL_KEYFILE"):
        take(key, f.optional(f.text))
    take("FORCE_IPV4", f.optional(f.boolean))
    take("CHUNKING", f.boolean)
    if out.get("use_tls") and out.get("use_ssl"):
        r.report(
            "E002",
            f"{label('USE_TLS')} and {label('USE_SSL')} are both true.",
            "USE_TLS means STARTTLS on a plain connection (usually port 587), USE_SSL "
            "means implicit TLS (usually port 465); set only one of them.",
        )
    _check_credentials(r, out, label, password_needs_user=password_needs_user)
    if out.get("ssl_keyfile") and not out.get("ssl_certfile"):
        r.report(
            "E008",
            f"{label('SSL_KEYFILE')} is set without SSL_CERTFILE.",
            "A client key is only used with its certificate: set SSL_CERTFILE too.",
        )
    out.setdefault(
        "port",
        default_port(use_tls=bool(out.get("use_tls")), use_ssl=bool(out.get("use_ssl"))),
    )
    if out.get("force_ipv4") is None:
        out["force_ipv4"] = force_ipv4
    host = out.get("host", ProviderConfig.host)
    if out["force_ipv4"] and ":" in host:
        # Only an IPv6 literal has a colon (host() refused host:port). With IPv4 forced it
        # can never be reached: every send would fail at resolve with a permanent error.
        r.report(
            "E008",
            f"{label('HOST')} is an IPv6 address, but IPv4 is forced for this provider.",
            "Set this provider's FORCE_IPV4 to False (?force_ipv4=false in a URL; the "
            "global FORCE_IPV4 for settings.EMAIL_HOST), or give an IPv4 address or a "
            "host name.",
        )
    take("NAME", f.text)
    out.setdefault("name", default_name(host=host, mailer=mailer))
    if len(r.problems) > before:
        return None
    return ProviderConfig(**out)


def _check_credentials(
    r: f.Reader, out: Mapping[str, Any], label: f.Labeler, *, password_needs_user: bool
) -> None:
    # Both would pass unnoticed and fail every send: AUTH is skipped without a user name
    # (then 530 "authentication required"), and SMTP AUTH encodes credentials as ASCII.
    # The values are never shown: either may be a password.
    username, password = out.get("username", ""), out.get("password", "")
    if password and not username and password_needs_user:
        r.report(
            "E008",
            f"{label('PASSWORD')} is set without a user name: robust_mail logs in only "
            "with one, so the password would never be used.",
            "Set the user name too (user:password@host in a URL; some services take "
            "a fixed one such as 'apikey'), or remove the password.",
        )
    for key, value in (("USERNAME", username), ("PASSWORD", password)):
        if not value.isascii():
            r.report(
                "E008",
                f"{label(key)} has characters that are not ASCII, which SMTP AUTH cannot "
                "send (the value is not shown).",
                "Use ASCII credentials; ask the provider for an API key or an app password.",
            )


def _check_unique_names(
    r: f.Reader, providers: list[ProviderConfig], path: tuple[str | int, ...]
) -> None:
    seen: set[str] = set()
    for provider in providers:
        if provider.name in seen:
            r.report(
                "E007",
                f"{r.label(*path)} has two providers named {provider.name!r}.",
                "Give each provider a distinct NAME (or ?name= in a URL); a provider "
                "without one is named after its host.",
            )
        seen.add(provider.name)
