"""A loopback TCP proxy that adds a fixed one-way delay, to stand in for a distant provider.

    python -m benchmarks.latency_proxy --target-port 2525 [--delay 0.02] [--port 0]

Listens on 127.0.0.1 and forwards every connection to 127.0.0.1:TARGET. Each chunk read
from either side is written to the other side ``delay`` seconds after it was read, in the
order it was read, so a request/reply exchange costs one round trip of ``2 * delay``.
End of stream travels with the same delay.

A new connection is only forwarded to the target ``3 * delay`` after it was accepted: over a
real network the server's greeting reaches the client two round trips after ``connect()``
starts (SYN, SYN-ACK, ACK, then the greeting), and that is what a client connecting through
this proxy sees too (3 * delay of holding + 1 * delay for the greeting).

Prints ``{"port": N}`` on one line once listening; stops on SIGTERM/SIGINT or when its
standard input closes. Only ever binds and connects to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys

HOST = "127.0.0.1"
CHUNK = 64 * 1024


async def _forward(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay`` seconds late, order preserved."""
    loop = asyncio.get_running_loop()
    pending: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                pending.put_nowait((loop.time() + delay, data))
                if not data:
                    return
        except (ConnectionError, OSError):
            pending.put_nowait((loop.time() + delay, b""))

    async def write() -> None:
        while True:
            due, data = await pending.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError, RuntimeError):
                    if writer.can_write_eof():
                        writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    reading = asyncio.ensure_future(read())
    try:
        await write()
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading


class LatencyProxy:
    """The proxy itself, on the running asyncio loop."""

    def __init__(self, target_port: int, *, delay: float = 0.02, port: int = 0) -> None:
        self.target_port = target_port
        self.delay = delay
        self.port = port
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, HOST, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        upstream_w: asyncio.StreamWriter | None = None
        try:
            # The TCP handshake a real network would charge before the greeting (see above).
            await asyncio.sleep(3 * self.delay)
            upstream_r, upstream_w = await asyncio.open_connection(HOST, self.target_port)
            await asyncio.gather(
                _forward(client_r, upstream_w, self.delay),
                _forward(upstream_r, client_w, self.delay),
            )
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # Stopping: end quietly (asyncio's stream server reports a cancelled handler
            # task as an error in 3.11).
            pass
        finally:
            for w in (client_w, upstream_w):
                if w is not None:
                    w.close()
                    with contextlib.suppress(Exception):
                        await w.wait_closed()
            self._tasks.discard(task)


async def _main(args: argparse.Namespace) -> None:
    proxy = LatencyProxy(args.target_port, delay=args.delay, port=args.port)
    port = await proxy.start()
    print(json.dumps({"port": port}), flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # Standard input closing (the parent went away) stops the proxy too.
    stdin = sys.stdin.fileno()

    def on_stdin() -> None:
        if not os.read(stdin, 4096):
            stop.set()

    loop.add_reader(stdin, on_stdin)
    await stop.wait()
    loop.remove_reader(stdin)
    await proxy.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency_proxy")
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.02, help="one-way delay, seconds")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any)")
    args = parser.parse_args(argv)
    asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
