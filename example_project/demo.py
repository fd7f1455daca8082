"""``make demo``: run the example site with two local SMTP servers and an outbox worker.

    python -m example_project.demo [--port 8000]    # the web demo
    python -m example_project.demo --terminal       # the scripted failover tour, no browser

The web demo migrates the SQLite database in ``.demo/``, creates the staff user
``demo@example.com`` (once), then starts two processes:

- the site (``manage.py runserver --noreload``), which also runs the primary and backup
  SMTP servers on 127.0.0.1 (``EXAMPLE_EMBEDDED_SMTP=1``) so its pages can show their
  mail and switch them down and up;
- ``manage.py robust_mail_worker``, which delivers the outbox (background mail, sign-in
  codes, and anything no provider took) over TCP to those servers.

Ctrl-C (SIGINT), SIGTERM or SIGHUP stops both and waits for them. The children run in
their own process group, so each gets exactly one signal from here (the worker then
finishes what it is sending); on Linux they also die with this process if it is killed.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"  # the demo never listens anywhere else
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stop(Exception):
    """Raised in the main loop by the signal handler."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m example_project.demo", description=__doc__)
    parser.add_argument("--port", type=int, default=int(os.environ.get("EXAMPLE_PORT", "8000")))
    parser.add_argument(
        "--terminal", action="store_true", help="run the scripted terminal demo instead"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")
    if args.terminal:
        from example_project.terminal_demo import main as terminal_main

        terminal_main()
        return 0
    return run_site(args.port)


def run_site(port: int) -> int:
    # Only the web server runs the SMTP servers; this process and the worker must not.
    os.environ.pop("EXAMPLE_EMBEDDED_SMTP", None)
    smtp_ports = prepare()
    busy = [p for p in (port, *smtp_ports.values()) if _listening(p)]
    if busy:
        print(f"Port(s) {', '.join(map(str, busy))} on {HOST} are in use. Stop what uses them, "
              "or choose others: EXAMPLE_PORT, EXAMPLE_SMTP_PRIMARY_PORT, "
              "EXAMPLE_SMTP_BACKUP_PORT.", file=sys.stderr)  # fmt: skip
        return 1
    previous = {s: signal.signal(s, _raise_stop) for s in STOP_SIGNALS}
    children: list[subprocess.Popen[bytes]] = []
    try:
        # Signals wait while a child starts, so none can be left out of `children`.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            web = _spawn(["runserver", "--noreload", f"{HOST}:{port}"], EXAMPLE_EMBEDDED_SMTP="1")
            children.append(web)
            worker = _spawn(["robust_mail_worker", "--sleep", "1"])
            children.append(worker)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        url = f"http://{HOST}:{port}/"
        _wait_until_serving(url + "status/live/", children)
        _banner(url, smtp_ports, worker.pid)
        while all(child.poll() is None for child in children):
            time.sleep(0.2)
        print("A demo process stopped on its own; stopping the rest.", file=sys.stderr)
        return 1
    except Stop:
        print("\nStopping the demo...", flush=True)
        return 0
    finally:
        # No more interruptions while the children are stopped: no orphans.
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        _stop(children)
        for s, handler in previous.items():
            signal.signal(s, handler)


def prepare() -> dict[str, int]:
    """Migrate, create the demo user, start from closed breakers; the SMTP ports."""
    import django
    from django.conf import settings
    from django.core.cache import caches
    from django.core.management import call_command
    from django.db import connections

    django.setup()
    print(f"Preparing the database in {settings.DATABASES['default']['NAME']}", flush=True)
    call_command("migrate", verbosity=0)
    call_command("demo_user")
    # Breakers, counters and the delivery list of an earlier run would confuse: start clean.
    # Only the demo's own file cache is cleared, never a Redis the user pointed us at.
    if settings.CACHES["default"]["BACKEND"].endswith("FileBasedCache"):
        caches["default"].clear()
    connections.close_all()
    return dict(settings.EXAMPLE_SMTP_PORTS)


def _spawn(command: list[str], **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # our own interpreter and manage.py
        [sys.executable, str(ROOT / "manage.py"), *command],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_in_child,  # safe: this process runs no threads
    )


def _in_child() -> None:
    # The mask is inherited across exec: let the child hear signals again.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    # Linux: the child gets SIGTERM if this process dies, even by SIGKILL.
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _raise_stop(signum: int, frame: types.FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((HOST, port)) == 0


def _wait_until_serving(url: str, children: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(child.poll() is not None for child in children):
            raise SystemExit("The demo could not start (see the messages above).")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # 127.0.0.1 only
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"The site did not answer at {url} within 60 s.")


def _banner(url: str, smtp_ports: dict[str, int], worker_pid: int) -> None:
    servers = ", ".join(f"{name} {HOST}:{port}" for name, port in smtp_ports.items())
    print(
        f"""
robust_mail demo is running at {url}

  Sign in:   {url}signin/ as demo@example.com with a code sent by email;
             the code arrives on the Mailboxes page, {url}mailbox/
  Dashboard: {url} (take the primary down, send, watch the failover)
  Admin:     {url}admin/ (staff sign in with a code too)
  SMTP:      {servers}, inside the web server
  Worker:    delivering the outbox (pid {worker_pid})

Press Ctrl-C to stop everything.
""",
        flush=True,
    )


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    """SIGINT each child (what Ctrl-C would do), then SIGKILL what is left after 10 s."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 10
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


if __name__ == "__main__":
    sys.exit(main())
