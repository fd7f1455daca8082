"""``make demo``'s runner: it starts the site, the SMTP servers and the worker, and stops
every one of them again. No browser needed: these check processes and ports.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from example_project.demo_process import DemoProcess, serving

linux_only = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")


def processes_using(data_dir: Path) -> list[int]:
    """Live processes whose environment points at ``data_dir`` (the demo's processes)."""
    marker = f"EXAMPLE_DATA_DIR={data_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # gone meanwhile, or not ours
        if marker in environ and state != "Z":
            found.append(int(entry.name))
    return found


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@linux_only
def test_ctrl_c_stops_the_site_the_smtp_servers_and_the_worker(tmp_path: Path) -> None:
    demo = DemoProcess(tmp_path / "demo").start()
    try:
        ports = [demo.port, *demo.smtp_ports.values()]
        assert all(serving(port) for port in ports)
        assert b"Delivery dashboard" in demo.get("/")
        assert len(processes_using(demo.data_dir)) == 3  # runner, web server, worker
    finally:
        code = demo.stop()
    assert code == 0, demo.log()
    assert processes_using(demo.data_dir) == []
    assert not any(serving(port) for port in ports)
    assert "stopped: sent 0" in demo.log()  # the worker finished cleanly


@linux_only
def test_children_die_with_a_killed_runner(tmp_path: Path) -> None:
    demo = DemoProcess(tmp_path / "demo").start()
    assert demo.process is not None
    try:
        os.kill(demo.process.pid, signal.SIGKILL)
        demo.process.wait()
        assert wait_until(lambda: processes_using(demo.data_dir) == []), demo.log()
    finally:
        for pid in processes_using(demo.data_dir):
            os.kill(pid, signal.SIGKILL)
        demo.process = None


def test_a_busy_port_is_reported_not_fought_over(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        demo = DemoProcess(tmp_path / "demo")
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "example_project.settings",
            "EXAMPLE_DATA_DIR": str(demo.data_dir),
            "EXAMPLE_SMTP_PRIMARY_PORT": str(demo.smtp_ports["primary"]),
            "EXAMPLE_SMTP_BACKUP_PORT": str(demo.smtp_ports["backup"]),
        }
        result = subprocess.run(
            [sys.executable, "-m", "example_project.demo", "--port", str(port)],
            cwd=Path(__file__).resolve().parents[2],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 1
    assert f"Port(s) {port} on 127.0.0.1 are in use" in result.stderr


@linux_only
def test_a_port_taken_before_the_demo_binds_it_means_new_ports_not_a_failure(
    tmp_path: Path,
) -> None:
    # Free when chosen, taken by someone else (another test's server) before the demo
    # starts: DemoProcess starts it again on other ports.
    demo = DemoProcess(tmp_path / "demo")
    chosen = demo.port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", chosen))
        taken.listen()
        demo.start()
    try:
        assert demo.port != chosen
        assert b"Delivery dashboard" in demo.get("/")
    finally:
        assert demo.stop() == 0, demo.log()
