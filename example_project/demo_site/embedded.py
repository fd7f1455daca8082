"""The local SMTP servers the demo sends to, run inside the web server process.

They live here, in one process-wide registry, so that the site can show what each
received (the mailbox page) and take each one down and back up (the switches). The
worker is another process: it reaches them over TCP like any provider. Tests register
servers of their own with :func:`register`.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Mapping

from robust_mail.testing import Mode, SMTPTestServer

logger = logging.getLogger("example_project")

#: The behaviours a person can pick for a server, in the order the page lists them.
MODES: dict[str, str] = {
    Mode.ACCEPT.value: "up: accepts every message",
    Mode.REFUSE.value: "down: refuses connections",
    Mode.GREETING_421.value: "busy: answers 421 to every connection",
    Mode.DATA_451.value: "failing: 451 after the message data",
    Mode.BLACKHOLE.value: "black hole: connects but never answers",
    Mode.RCPT_550.value: "rejects every recipient (550)",
}

_lock = threading.Lock()
_servers: dict[str, SMTPTestServer] = {}


def start(ports: Mapping[str, int], host: str = "127.0.0.1") -> list[SMTPTestServer]:
    """Start one accepting server per ``name: port`` and register it; stopped at exit."""
    started = []
    for name, port in ports.items():
        server = SMTPTestServer(Mode.ACCEPT, host=host, port=port, name=name)
        try:
            server.start()
        except OSError as exc:
            for other in started:
                other.stop()
            raise RuntimeError(
                f"cannot listen on {host}:{port} for the {name} demo SMTP server ({exc}); "
                f"set EXAMPLE_SMTP_{name.upper()}_PORT to a free port"
            ) from exc
        started.append(server)
    for server in started:
        register(server)
    atexit.register(stop_all)
    logger.info("demo SMTP servers: %s", ", ".join(f"{s.name} {s.host}:{s.port}" for s in started))
    return started


def register(server: SMTPTestServer) -> None:
    """Make ``server`` known to the site under ``server.name``."""
    with _lock:
        _servers[server.name] = server


def unregister(name: str) -> None:
    with _lock:
        _servers.pop(name, None)


def servers() -> list[SMTPTestServer]:
    """The registered servers, in registration order (primary first)."""
    with _lock:
        return list(_servers.values())


def get(name: str) -> SMTPTestServer | None:
    with _lock:
        return _servers.get(name)


def stop_all() -> None:
    with _lock:
        running = list(_servers.values())
        _servers.clear()
    for server in running:
        server.stop()
