"""Free loopback ports for the servers the tests start themselves.

A port found free can be taken by another process before our server binds it (the suite's
own servers start all the time), so every caller retries on a new port when its bind fails:
see ``PostgresServer.start``, ``RedisServer.start`` and ``limited_server``.
"""

from __future__ import annotations

import socket

BIND_ATTEMPTS = 5


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
