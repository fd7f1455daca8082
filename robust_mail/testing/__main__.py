"""Run one test SMTP server in the foreground.

    python -m robust_mail.testing --port 2525 --mode accept [--tls starttls] [--name primary]

Prints where it listens (and the CA file to trust when TLS is on), then one
line per received message. Stops on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from robust_mail.testing.modes import Mode
from robust_mail.testing.received import ReceivedMessage
from robust_mail.testing.smtp import SMTPTestServer


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m robust_mail.testing",
        description="A fault-injecting SMTP server for trying robust_mail out. Local use only.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=2525, help="port to bind, 0 for any (2525)")
    parser.add_argument(
        "--mode", default=Mode.ACCEPT.value, choices=[mode.value for mode in Mode], metavar="MODE"
    )
    parser.add_argument("--tls", choices=["starttls", "implicit"], default=None)
    parser.add_argument("--name", default="", help="label printed with each message")
    parser.add_argument(
        "--auth",
        action="append",
        default=[],
        metavar="USER:PASSWORD",
        help="accept this login (repeatable); AUTH is then required",
    )
    parser.add_argument("--reply-delay", type=float, default=0.0, help="seconds, for --mode slow")
    args = parser.parse_args(argv)
    for entry in args.auth:
        if ":" not in entry:
            parser.error(f"--auth expects USER:PASSWORD, got {entry!r}")
    return args


def _print_message(label: str, message: ReceivedMessage) -> None:
    print(
        f"{label}from={message.mail_from} to={', '.join(message.rcpt_tos)} "
        f"subject={message.subject!r} tls={message.tls}",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    label = f"[{args.name}] " if args.name else ""
    auth = dict(entry.split(":", 1) for entry in args.auth) or None
    server = SMTPTestServer(
        args.mode,
        host=args.host,
        port=args.port,
        tls=args.tls,
        auth=auth,
        reply_delay=args.reply_delay,
        name=args.name,
        on_message=lambda message: _print_message(label, message),
    )
    stopping = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    with server:
        print(
            f"{label}SMTP test server on {server.host}:{server.port} "
            f"mode={server.mode.value} tls={server.tls or 'none'}",
            flush=True,
        )
        if server.certificates is not None:
            print(f"{label}CA certificate to trust: {server.certificates.ca_file}", flush=True)
        while not stopping.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
