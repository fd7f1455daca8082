"""Value converters and the problem collector behind ``conf.py``.

Private to ``conf.py``; split out only to keep each module about one thing. A converter
takes a raw setting value and returns the typed value, or raises :class:`Invalid` with
what was expected; the :class:`Reader` turns that into a :class:`Problem` naming the
setting. Problems carry the check id (``"E008"``) that ``checks.py`` reports them under.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Converter = Callable[[Any], Any]
Labeler = Callable[[str], str]

#: Keys whose values are never shown in a message, not even their length.
SECRET_KEYS = frozenset({"PASSWORD", "SECRET"})

_RATE = re.compile(r"^\s*([1-9][0-9]*)\s*/\s*([smhd])\s*$")

#: The longest duration any setting takes: 100 years, as ``robust_mail_purge --older-than``
#: (36500 days). Beyond it a finite number still overflows ``now + timedelta(...)`` (past
#: the year 9999) at the first claim or send, instead of failing here with the setting named.
MAX_SECONDS = 36500 * 86400
_TOO_LONG = f"must be at most {MAX_SECONDS} seconds (100 years)"
_TOO_LONG_HINT = "Give a number of seconds under 100 years (a day is 86400)."


@dataclass(frozen=True)
class Problem:
    """One mistake in a configuration. ``code`` is the check id without its prefix."""

    code: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        return f"{self.message} {self.hint}" if self.hint else self.message


class Invalid(Exception):
    """Raised by a converter: ``expected`` completes "<setting> ..." in the message."""

    def __init__(
        self, expected: str, *, code: str = "E008", hint: str = "", shown: str | None = None
    ) -> None:
        super().__init__(expected)
        self.expected = expected
        self.code = code
        self.hint = hint
        #: What to say the value was, instead of the value itself (it may hold a secret).
        self.shown = shown


class Reader:
    """Collects problems while one configuration is read; knows the form's key case."""

    def __init__(self, root: str, *, lower: bool) -> None:
        self.root = root
        self.lower = lower
        self.problems: list[Problem] = []

    def key(self, canonical: str) -> str:
        """A key as the user writes it in this form."""
        return canonical.lower() if self.lower else canonical

    def label(self, *path: str | int) -> str:
        return self.root + "".join(f"[{p!r}]" for p in path)

    def report(self, code: str, message: str, hint: str = "") -> None:
        self.problems.append(Problem(code, message, hint))

    def mapping(
        self, raw: object, path: tuple[str | int, ...], valid: Iterable[str]
    ) -> dict[str, Any] | None:
        """``raw`` re-keyed by canonical (upper-case) names; unknown keys are reported."""
        if not isinstance(raw, Mapping):
            self.report(
                "E008",
                f"{self.label(*path)} must be a dict, got {type(raw).__name__}.",
                "See docs/settings.md for the keys it takes.",
            )
            return None
        valid = tuple(valid)
        spelled = [self.key(k) for k in valid]
        out: dict[str, Any] = {}
        for key, value in raw.items():
            canonical = key.upper() if isinstance(key, str) else ""
            if canonical in valid and key == self.key(canonical):
                out[canonical] = value
                continue
            guess = difflib.get_close_matches(canonical, valid, n=1)
            did_you_mean = f"Did you mean {self.key(guess[0])!r}? " if guess else ""
            self.report(
                "E003",
                f"{self.label(*path)} has an unknown key {key!r}.",
                f"{did_you_mean}Valid keys: {', '.join(spelled)}.",
            )
        return out

    def take(
        self,
        given: Mapping[str, Any],
        key: str,
        label: str,
        convert: Converter,
        *,
        into: dict[str, Any],
        attr: str | None = None,
    ) -> None:
        """Convert ``given[key]`` into ``into[attr]``; absent keys keep their default."""
        if key not in given:
            return
        value = given[key]
        try:
            into[attr or key.lower()] = convert(value)
        except Invalid as exc:
            shown = (
                f"a value of type {type(value).__name__}" if key in SECRET_KEYS else _show(value)
            )
            shown = exc.shown or shown
            hint = exc.hint or "Correct the value, or remove the key to use its default."
            self.report(exc.code, f"{label} {exc.expected}, got {shown}.", hint)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite_float(value: int | float) -> float:
    """``value`` as a float; an int too large for one (10**400) is too long, not a crash."""
    try:
        return float(value)
    except OverflowError:
        raise Invalid(_TOO_LONG, hint=_TOO_LONG_HINT, shown="an integer too large") from None


# --- converters -----------------------------------------------------------------------


def optional(convert: Converter) -> Converter:
    def convert_optional(value: object) -> Any:
        return None if value is None else convert(value)

    return convert_optional


def integer(minimum: int, maximum: int | None = None) -> Converter:
    expected = (
        f"must be an integer from {minimum} to {maximum}"
        if maximum is not None
        else f"must be an integer ≥ {minimum}"
    )

    def convert_integer(value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise Invalid(expected)
        if value < minimum or (maximum is not None and value > maximum):
            raise Invalid(expected)
        return value

    return convert_integer


def seconds(*, zero: bool = False) -> Converter:
    expected = f"must be a number of seconds {'≥' if zero else '>'} 0"

    def convert_seconds(value: object) -> float:
        if not _is_number(value):
            raise Invalid(expected)
        number = _finite_float(value)  # type: ignore[arg-type]
        if not math.isfinite(number) or number < 0 or (number == 0 and not zero):
            raise Invalid(expected)
        if number > MAX_SECONDS:
            raise Invalid(_TOO_LONG, hint=_TOO_LONG_HINT)
        return number

    return convert_seconds


def timeout(value: object) -> float:
    """A provider timeout: a positive number. None or ≤ 0 is E005 (unbounded waits)."""
    hint = "Set a timeout in seconds such as 10: a send must never wait forever."
    if value is None:
        raise Invalid("must be a number of seconds > 0", code="E005", hint=hint)
    if not _is_number(value):
        raise Invalid("must be a number of seconds > 0")
    number = _finite_float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        raise Invalid("must be a number of seconds > 0")
    if number <= 0:
        raise Invalid("must be a number of seconds > 0", code="E005", hint=hint)
    if number > MAX_SECONDS:
        raise Invalid(_TOO_LONG, hint=_TOO_LONG_HINT)
    return number


def port(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise Invalid(
            "must be an integer from 1 to 65535",
            hint="Ports read from the environment are strings: convert them with int().",
        )
    return value


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise Invalid("must be True or False")
    return value


def text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid("must be a non-empty string")
    return value


def any_text(value: object) -> str:
    """A string that may be empty; None counts as empty (user name, password)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise Invalid("must be a string")
    return value


def host(value: object) -> str:
    if not isinstance(value, str) or not value.strip("[] ") or " " in value.strip():
        raise Invalid("must be a host name or IP address")
    name = value.strip().strip("[]")  # "[::1]" as in URLs is accepted
    hint = (
        "Give the host alone (smtp.example.com), the port in PORT and credentials in "
        "USERNAME / PASSWORD; or the whole URL as a PROVIDERS entry (a string)."
    )
    if "@" in name or "/" in name:
        # A URL or user@host here would make the provider's name, its metric labels and
        # its log lines carry the credentials: refused, and not repeated in the message.
        raise Invalid(
            "must be a host name or IP address, not a URL or user@host",
            hint=hint,
            shown="a URL or user@host (not shown: it may contain a password)",
        )
    if name.count(":") == 1:  # "host:587"; IPv6 addresses have two or more
        raise Invalid("must be a host name or IP address, without a port", hint=hint)
    if ":" not in name:
        _check_labels(name)
        return name
    try:  # two colons or more: an IPv6 address, or one with a port ("[::1]:25")
        ipaddress.IPv6Address(name)
    except ValueError:
        raise Invalid("must be a host name or IP address, without a port", hint=hint) from None
    return name


def _check_labels(name: str) -> None:
    # What DNS cannot hold fails here, with the setting named, not at the first send.
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    if any(not label for label in labels):
        raise Invalid("must be a host name: it has an empty label (two dots, or a leading dot)")
    if any(len(label) > 63 for label in labels) or len(name.rstrip(".")) > 253:
        raise Invalid("must be a host name: a label over 63 characters, or over 253 in all")


def choice(*choices: object, code: str = "E008") -> Converter:
    shown = ", ".join(repr(c) for c in choices)

    def convert_choice(value: object) -> Any:
        if not any(value == c and type(value) is type(c) for c in choices):
            raise Invalid(f"must be one of {shown}", code=code, hint=f"Use one of {shown}.")
        return value

    return convert_choice


def rate(value: object) -> str:
    if not isinstance(value, str) or _RATE.match(value) is None:
        raise Invalid(
            "must be a rate such as '100/h'",
            hint="Write N/s, N/m, N/h or N/d with N ≥ 1, or None for no limit.",
        )
    return value.replace(" ", "")


def nameservers(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise Invalid(
            "must be a non-empty list of IP addresses",
            hint='Write ["192.0.2.53"], not "192.0.2.53"; None uses the system resolvers.',
        )
    hint = (
        'List nameservers by IP address ("192.0.2.53", "2001:db8::53"), without a '
        "port (the port goes in DNS PORT): the resolver cannot look up a nameserver's "
        "own name."
    )
    for entry in value:
        if not isinstance(entry, str):
            raise Invalid("must contain only IP address strings", hint=hint)
        try:
            ipaddress.ip_address(entry)
        except ValueError:
            # dnspython refuses anything else at the first send, for every message.
            raise Invalid("must contain only IP addresses, without a port", hint=hint) from None
    return tuple(value)


def schedule(value: object) -> tuple[float, ...]:
    if (
        not isinstance(value, list | tuple)
        or not value
        or not all(_is_number(v) and v > 0 for v in value)
    ):
        raise Invalid(
            "must be a non-empty list of delays in seconds, each > 0",
            hint="For example [60, 300, 1800]: the waits before the 2nd, 3rd, 4th... try.",
        )
    # Compared before any float(): an int too large for a float (10**400) is too long, not
    # an OverflowError. NaN failed "> 0" above; infinity fails here.
    if any(v > MAX_SECONDS for v in value):
        raise Invalid(f"must have each delay at most {MAX_SECONDS} seconds (100 years)")
    return tuple(float(v) for v in value)


PROVIDER_CONVERTERS: dict[str, Converter] = {
    "HOST": host,
    "USERNAME": any_text,
    "PASSWORD": any_text,
    "USE_TLS": boolean,
    "USE_SSL": boolean,
    "PORT": port,
    "TIMEOUT": timeout,
}
