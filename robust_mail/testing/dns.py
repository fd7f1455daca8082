"""A tiny authoritative UDP DNS server for tests.

It answers A and AAAA questions from a dict, so resolver and transport tests
can exercise real DNS traffic on 127.0.0.1: IPv4 forcing, NXDOMAIN, a
resolver that stops answering (``silent``) or fails (``servfail``).

    with DNSTestServer({"mail.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]}}) as dns_server:
        resolver = Resolver(nameservers=["127.0.0.1"], port=dns_server.port)

Run one from a shell (Ctrl-C stops it):

    python -m robust_mail.testing.dns --port 5353 mail.test=A:127.0.0.1 mail.test=AAAA:::1

Imports nothing from Django.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import selectors
import socket
import threading
from collections.abc import Mapping
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

log = logging.getLogger("robust_mail.testing")

#: TTL of every answer; the resolver under test never caches, so it only shows in dig output.
TTL = 60


def _normalize(name: str) -> str:
    return name.rstrip(".").lower()


def _checked(records: Mapping[str, Mapping[str, list[str]]]) -> dict[str, dict[str, list[str]]]:
    """``records`` normalised, every value parsed once so that a bad one fails here.

    Found only when answering, it used to kill the server thread mid-test.
    """
    checked: dict[str, dict[str, list[str]]] = {}
    for name, types in records.items():
        entry = checked.setdefault(_normalize(name), {})
        for rdtype, values in types.items():
            for value in values:
                try:
                    dns.rdata.from_text(dns.rdataclass.IN, rdtype, value)
                except (dns.exception.DNSException, ValueError) as error:
                    raise ValueError(
                        f"bad DNS record {name} {rdtype} {value!r}: {error or type(error).__name__}"
                    ) from error
            entry[rdtype.upper()] = list(values)
    return checked


class DNSTestServer:
    """Answer A/AAAA from ``records`` in a background thread until ``stop()``.

    ``records`` maps a host name (any case, trailing dot optional) to
    ``{"A": [...], "AAAA": [...]}``. A known name without the asked type gets
    NOERROR with an empty answer; an unknown name gets NXDOMAIN. Set
    ``silent = True`` to drop queries (the client times out), ``silent_types``
    (e.g. ``{"A"}``) to drop only queries of those types, or
    ``servfail = True`` to answer SERVFAIL. ``queries`` records every question
    received, as ``(name, rdtype)`` with the name lower-cased and without the
    trailing dot, including dropped ones. A value that is not valid for its type
    raises ``ValueError`` here. Questions of a class other than IN get REFUSED;
    anything that goes wrong while answering is logged and answered SERVFAIL.
    """

    def __init__(
        self,
        records: Mapping[str, Mapping[str, list[str]]],
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.records = _checked(records)
        self.host = host
        self.port = port
        self.silent = False
        self.silent_types: set[str] = set()
        self.servfail = False
        self.queries: list[tuple[str, str]] = []
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> DNSTestServer:
        """Bind the UDP socket and start answering; ``port`` is then the bound port."""
        if self._sock is not None:
            return self
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._serve, args=(sock,), name=f"DNSTestServer:{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering and close the socket. Safe to call twice."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> DNSTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def clear(self) -> None:
        """Forget the recorded queries."""
        self.queries.clear()

    # --- serving ------------------------------------------------------------------------

    def _serve(self, sock: socket.socket) -> None:
        # A short select timeout lets stop() end the loop without closing the socket
        # under a thread that is still reading from it.
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ)
            while not self._stopping.is_set():
                if not selector.select(timeout=0.05):
                    continue
                try:
                    data, client = sock.recvfrom(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    return
                try:
                    reply = self._answer(data)
                except Exception:
                    # Not even SERVFAIL could be built; stay up for the next query.
                    log.exception("DNS test server failed to answer %r", data)
                    continue
                if reply is not None:
                    # A client that went away has nothing left to hear.
                    with contextlib.suppress(OSError):
                        sock.sendto(reply, client)

    def _answer(self, data: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None  # not DNS: ignore, like a real server would
        for question in query.question:
            name = _normalize(question.name.to_text())
            self.queries.append((name, dns.rdatatype.to_text(question.rdtype)))
        if self.silent:
            return None
        asked = {dns.rdatatype.to_text(question.rdtype) for question in query.question}
        if asked & {rdtype.upper() for rdtype in self.silent_types}:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        try:
            self._fill(query, response)
            return response.to_wire()
        except Exception:
            # An error must not end the thread: every later query would time out.
            log.exception("DNS test server failed to answer %s", query.question)
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()

    def _fill(self, query: dns.message.Message, response: dns.message.Message) -> None:
        if any(question.rdclass != dns.rdataclass.IN for question in query.question):
            response.set_rcode(dns.rcode.REFUSED)  # the records are Internet-class only
            return
        for question in query.question:
            types = self.records.get(_normalize(question.name.to_text()))
            if types is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
                continue
            values = types.get(dns.rdatatype.to_text(question.rdtype), [])
            if values:
                response.answer.append(
                    dns.rrset.from_text_list(
                        question.name, TTL, question.rdclass, question.rdtype, values
                    )
                )


def main(argv: list[str] | None = None) -> None:
    """Run a server from the shell: ``NAME=TYPE:ADDRESS`` arguments."""
    parser = argparse.ArgumentParser(description="Tiny authoritative DNS server for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5353)
    parser.add_argument("records", nargs="*", metavar="NAME=TYPE:ADDRESS")
    args = parser.parse_args(argv)
    records: dict[str, dict[str, list[str]]] = {}
    for item in args.records:
        name, _, rest = item.partition("=")
        rdtype, _, address = rest.partition(":")
        records.setdefault(name, {}).setdefault(rdtype.upper(), []).append(address)
    try:
        server = DNSTestServer(records, host=args.host, port=args.port)
    except ValueError as error:
        parser.error(str(error))
    with server:
        print(f"DNS test server on {server.host}:{server.port}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
