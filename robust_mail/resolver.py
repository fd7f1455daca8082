"""Host name resolution for SMTP connections, with IPv4 forcing and stale answers.

The transport connects to the addresses this module returns and keeps the
configured host name for SNI and certificate checks, so forcing IPv4 needs no
patching of ``socket.getaddrinfo``: with ``ipv4_only`` only A records are
asked for, and an IPv6 address is never returned.

A resolver that is down (timeout, no nameserver reachable, SERVFAIL) must not
stop mail that could reach a provider whose address has not changed, so the
last good answer for a name is kept and served, with a warning, for up to
``stale_ttl`` seconds. A definite "no such name / no such record" answer is
believed at once and never papered over with old data.

Imports nothing from Django.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence

import dns.exception
import dns.name
import dns.resolver

from robust_mail.exceptions import DeadlineReached, ResolutionError, Step
from robust_mail.forks import renew_lock_after_fork

logger = logging.getLogger("robust_mail.resolver")

HOSTS_FILE = "/etc/hosts"

_LOCALHOST_V4 = ["127.0.0.1"]
_LOCALHOST_ALL = ["::1", "127.0.0.1"]


class _Unreachable(Exception):
    """The resolver gave no verdict (timeout, no nameserver, SERVFAIL).

    ``cut``: it was still asking when the caller's deadline ran out.
    """

    def __init__(self, reason: str, *, cut: bool = False) -> None:
        super().__init__(reason)
        self.cut = cut


class Resolver:
    """Resolve SMTP host names to the addresses to try, in order.

    ``nameservers=None`` uses the system configuration (``/etc/resolv.conf``);
    otherwise the given nameservers are asked on ``port``. ``timeout`` bounds
    one DNS lookup (one record type). ``clock`` is injectable so tests can age
    stale answers without sleeping. Safe to share between threads.
    """

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        port: int = 53,
        timeout: float = 2.0,
        stale_ttl: float = 86400.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        hosts_file: str = HOSTS_FILE,
    ) -> None:
        self.nameservers = tuple(nameservers) if nameservers is not None else None
        self.port = port
        self.timeout = timeout
        self.stale_ttl = stale_ttl
        self.clock = clock
        self.hosts_file = hosts_file
        self._lock = threading.Lock()
        self._dns: dns.resolver.Resolver | None = None
        # (name, ipv4_only) -> (addresses, clock() when resolved)
        self._last_good: dict[tuple[str, bool], tuple[list[str], float]] = {}
        self._hosts: dict[str, list[str]] = {}
        self._hosts_stamp: tuple[int, int] | None = None
        renew_lock_after_fork(self)  # a fresh lock in a forked child

    def resolve(self, host: str, *, ipv4_only: bool, deadline: float | None = None) -> list[str]:
        """Return the addresses for ``host``, IPv6 first unless ``ipv4_only``.

        Raises :class:`ResolutionError`; ``permanent=True`` when the name is
        malformed (an empty label, a label over 63 octets), when the name or the
        record type does not exist (NXDOMAIN / no answer) or when an IPv6
        literal is given with ``ipv4_only``. ``deadline`` (absolute
        ``time.monotonic()``) cuts every query short of ``timeout`` when it comes
        first; a lookup cut short uses the last good answer if there is one, else
        raises :class:`DeadlineReached` (the caller's time, not the resolver's fault).
        """
        literal = _ip_literal(host)
        if literal is not None:
            if ipv4_only and literal.version == 6:
                raise ResolutionError(host, "IPv6 address given but IPv4 is forced", permanent=True)
            return [str(literal)]

        name = host.rstrip(".").lower()
        if not name:
            raise ResolutionError(host, "empty host name", permanent=True)
        from_hosts = self._from_hosts_file(name, ipv4_only)
        if from_hosts:
            return from_hosts

        key = (name, ipv4_only)
        try:
            addresses, complete = self._query(name, ipv4_only, deadline)
        except _Unreachable as exc:
            return self._stale(host, key, str(exc), cut=exc.cut)
        except ResolutionError:
            # The name is gone or has no such record: old data must not keep it alive.
            with self._lock:
                self._last_good.pop(key, None)
            raise
        if complete:
            # Half an answer (one family timed out, or the deadline cut it) is used now but
            # must not replace a whole one kept for when DNS is down.
            with self._lock:
                self._last_good[key] = (addresses, self.clock())
        return addresses

    # --- DNS ------------------------------------------------------------------------

    def _query(self, name: str, ipv4_only: bool, deadline: float | None) -> tuple[list[str], bool]:
        """The addresses, and whether every family asked for was answered."""
        try:
            qname = dns.name.from_text(name)  # absolute: no search list for provider hosts
        except dns.exception.DNSException as exc:
            # EmptyLabel ("smtp..example.com"), LabelTooLong, NameTooLong, IDNA errors: a
            # typo in HOST, which no retry and no nameserver will ever fix.
            raise ResolutionError(name, f"not a valid host name ({exc})", permanent=True) from exc
        resolver = self._dns_resolver()
        rdtypes = ("A",) if ipv4_only else ("AAAA", "A")
        addresses: list[str] = []
        unreachable: str | None = None
        cut = False
        for rdtype in rdtypes:
            lifetime = self.timeout
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    unreachable, cut = "the delivery deadline was reached before DNS answered", True
                    break
                lifetime = min(lifetime, left)
            try:
                answer = resolver.resolve(qname, rdtype, search=False, lifetime=lifetime)
            except dns.resolver.NXDOMAIN as exc:
                raise ResolutionError(name, "no such domain (NXDOMAIN)", permanent=True) from exc
            except dns.resolver.NoAnswer:
                continue
            except dns.exception.Timeout:
                if lifetime < self.timeout:
                    unreachable, cut = "the delivery deadline was reached before DNS answered", True
                else:
                    unreachable = f"DNS timeout after {self.timeout}s"
                continue
            except dns.resolver.NoNameservers as exc:
                unreachable = f"no nameserver answered ({exc})"
                continue
            except dns.exception.DNSException as exc:
                unreachable = f"{type(exc).__name__}: {exc}"
                continue
            addresses.extend(rr.to_text() for rr in answer)
        if addresses:
            # One family answering is enough: the transport tries each address in turn.
            return list(dict.fromkeys(addresses)), unreachable is None
        if unreachable is not None:
            raise _Unreachable(unreachable, cut=cut)
        wanted = "A" if ipv4_only else "A or AAAA"
        raise ResolutionError(name, f"no {wanted} record", permanent=True)

    def _dns_resolver(self) -> dns.resolver.Resolver:
        with self._lock:
            if self._dns is None:
                try:
                    resolver = dns.resolver.Resolver(configure=self.nameservers is None)
                except dns.resolver.NoResolverConfiguration as exc:
                    raise _Unreachable(f"no system resolver configuration ({exc})") from exc
                if self.nameservers is not None:
                    try:
                        resolver.nameservers = list(self.nameservers)
                    except ValueError as exc:
                        # Not an IP address (checks report it as E008). A resolution
                        # failure, not a bad message: the next provider may not need DNS.
                        raise _Unreachable(f"bad nameserver setting ({exc})") from exc
                    resolver.port = self.port
                resolver.timeout = self.timeout
                resolver.lifetime = self.timeout
                self._dns = resolver
            return self._dns

    def _stale(self, host: str, key: tuple[str, bool], reason: str, *, cut: bool) -> list[str]:
        with self._lock:
            entry = self._last_good.get(key)
        if entry is not None:
            addresses, resolved_at = entry
            age = self.clock() - resolved_at
            if age < self.stale_ttl:
                logger.warning(
                    "DNS lookup of %s failed (%s); using the answer from %.0fs ago: %s",
                    host,
                    reason,
                    age,
                    ", ".join(addresses),
                )
                return list(addresses)
        if cut:
            # The caller ran out of time: that says nothing about DNS or the provider.
            raise DeadlineReached(f"the delivery deadline was reached during {Step.RESOLVE}")
        raise ResolutionError(host, reason)

    # --- /etc/hosts -------------------------------------------------------------------

    def _from_hosts_file(self, name: str, ipv4_only: bool) -> list[str]:
        with self._lock:
            self._reload_hosts()
            found = self._hosts.get(name, [])
        if ipv4_only:
            found = [a for a in found if ":" not in a]
        else:
            # Same order as the DNS path: IPv6 first, like getaddrinfo.
            found = [a for a in found if ":" in a] + [a for a in found if ":" not in a]
        if not found and name == "localhost":
            # RFC 6761: localhost is always the loopback, whatever the hosts file says.
            return list(_LOCALHOST_V4 if ipv4_only else _LOCALHOST_ALL)
        return found

    def _reload_hosts(self) -> None:
        """Re-read the hosts file when it changed. Caller holds the lock."""
        try:
            st = os.stat(self.hosts_file)
        except OSError:
            self._hosts, self._hosts_stamp = {}, None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._hosts_stamp:
            return
        try:
            with open(self.hosts_file, encoding="utf-8", errors="replace") as f:
                self._hosts = _parse_hosts(f.read())
        except OSError:
            self._hosts = {}
        self._hosts_stamp = stamp


def _parse_hosts(text: str) -> dict[str, list[str]]:
    hosts: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        address = _ip_literal(fields[0])
        if address is None:
            continue
        for alias in fields[1:]:
            entries = hosts.setdefault(alias.rstrip(".").lower(), [])
            if str(address) not in entries:
                entries.append(str(address))
    return hosts


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    candidate = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(candidate)
    except ValueError:
        return None


__all__ = ["HOSTS_FILE", "Resolver"]
