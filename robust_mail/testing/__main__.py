"""Run one test SMTP server in the foreground.

    python -m robust_mail.testing --port 2525 --mode accept [--tls starttls [--certs-dir DIR]]
        [--name primary] [--show-body]

Prints where it listens (and the CA file to trust when TLS is on), then one
line per received message. Stops on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import errno
import io
import ipaddress
import os
import signal
import sys
import threading
from collections.abc import Sequence
from email.message import EmailMessage
from pathlib import Path
from types import FrameType

from robust_mail.terminal import terminal_safe
from robust_mail.testing.certs import TestCertificates
from robust_mail.testing.modes import Mode
from robust_mail.testing.received import ReceivedMessage
from robust_mail.testing.smtp import SMTPTestServer

PROG = "python -m robust_mail.testing"


def _loopback_host(value: str) -> str:
    """An argparse type: the host, when it is a loopback address."""
    if value.lower() == "localhost":
        return value
    try:
        loopback = ipaddress.ip_address(value).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a loopback address; the test server listens on "
            "127.0.0.0/8, ::1 or localhost only"
        )
    return value


def _port(value: str) -> int:
    """An argparse type: a TCP port number, 0 for any free port."""
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        # Out of range it reached bind() and ended in an OverflowError traceback.
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (0-65535)")
    return port


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A fault-injecting SMTP server for trying robust_mail out. Local use only.",
    )
    parser.add_argument(
        "--host",
        type=_loopback_host,
        default="127.0.0.1",
        help="loopback address to bind: 127.0.0.0/8, ::1 or localhost (127.0.0.1)",
    )
    parser.add_argument("--port", type=_port, default=2525, help="port to bind, 0 for any (2525)")
    modes = [mode.value for mode in Mode]
    parser.add_argument(
        "--mode",
        default=Mode.ACCEPT.value,
        choices=modes,
        metavar="MODE",
        help=f"fault to inject, one of: {', '.join(modes)} (accept); see docs/testing.md",
    )
    parser.add_argument("--tls", choices=["starttls", "implicit"], default=None)
    parser.add_argument(
        "--certs-dir",
        type=Path,
        metavar="DIR",
        help="with --tls: keep the CA and server certificate in DIR, made on first use and "
        "reused afterwards, so SSL_CAFILE stays valid across restarts "
        "(default: a temporary CA, deleted on stop)",
    )
    parser.add_argument("--name", default="", help="label printed with each message")
    parser.add_argument(
        "--auth",
        action="append",
        default=[],
        metavar="USER:PASSWORD",
        help="accept this login (repeatable); AUTH is then required",
    )
    parser.add_argument("--reply-delay", type=float, default=0.0, help="seconds, for --mode slow")
    parser.add_argument(
        "--show-body",
        action="store_true",
        help="also print each message's text (the text/plain part, else the first text part)",
    )
    args = parser.parse_args(argv)
    for entry in args.auth:
        if ":" not in entry:
            parser.error(f"--auth expects USER:PASSWORD, got {entry!r}")
    if args.certs_dir is not None and args.tls is None:
        parser.error("--certs-dir is only used with --tls")
    return args


def _body_text(message: EmailMessage) -> str | None:
    """The text/plain body, decoded; else the first text part; None without text."""
    part = message.get_body(preferencelist=("plain",))
    if part is None:
        part = next((p for p in message.walk() if p.get_content_maintype() == "text"), None)
    if part is None:
        return None
    try:
        text = part.get_content()
    except LookupError:  # an unknown charset
        payload = part.get_payload(decode=True)
        text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    return str(text)


def _print_message(label: str, message: ReceivedMessage, show_body: bool) -> None:
    lines = [
        f"{label}from={message.mail_from} to={', '.join(message.rcpt_tos)} "
        f"subject={message.subject!r} tls={message.tls}"
    ]
    if show_body:
        text = _body_text(message.message)
        body = text.splitlines() if text is not None else ["(no text part)"]
        lines.extend(f"{label}  {terminal_safe(line)}" for line in body)
    print("\n".join(lines), flush=True)


def _silence_stdout() -> None:
    """Point stdout at /dev/null once its reader has gone (``| head``).

    Python flushes stdout again at exit; to a closed pipe that raises once more and
    prints a traceback, so the file descriptor itself is redirected.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        # A message in a script the terminal cannot show must not stop the server.
        sys.stdout.reconfigure(errors="backslashreplace")
    label = f"[{args.name}] " if args.name else ""
    auth = dict(entry.split(":", 1) for entry in args.auth) or None
    stopping = threading.Event()

    def print_message(message: ReceivedMessage) -> None:
        try:
            _print_message(label, message, args.show_body)
        except BrokenPipeError:
            # Whoever read our output is gone (``| head -1``): nothing left to do, like
            # any filter whose reader went away. The message itself was accepted.
            _silence_stdout()
            stopping.set()

    try:
        certificates = None
        if args.certs_dir is not None:
            certificates = TestCertificates(directory=args.certs_dir.expanduser())
        server = SMTPTestServer(
            args.mode,
            host=args.host,
            port=args.port,
            tls=args.tls,
            certificates=certificates,
            auth=auth,
            reply_delay=args.reply_delay,
            name=args.name,
            on_message=print_message,
        )
    except (ImportError, ValueError, OSError) as exc:
        return _fail(str(exc))

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        server.start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return _fail(f"port {args.port} on {args.host} is in use")
        return _fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    try:
        print(
            f"{label}SMTP test server on {server.host}:{server.port} "
            f"mode={server.mode.value} tls={server.tls or 'none'}",
            flush=True,
        )
        if server.certificates is not None:
            print(f"{label}CA certificate to trust: {server.certificates.ca_file}", flush=True)
        while not stopping.wait(0.5):
            pass
    except BrokenPipeError:
        _silence_stdout()  # the reader left before the banner; see print_message
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
