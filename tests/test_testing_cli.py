"""``python -m robust_mail.testing``, run as a user runs it: a subprocess on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import smtplib
import socket
import ssl
import stat
import subprocess
import sys
import threading
from email.message import EmailMessage
from pathlib import Path

import pytest

from robust_mail.testing import Mode, SMTPTestServer, TestCertificates
from robust_mail.testing.__main__ import _parse_args

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "robust_mail.testing"]
# trustme cannot be uninstalled here, so the CLI runs with its import made to fail.
WITHOUT_TRUSTME = [
    sys.executable,
    "-c",
    "import runpy, sys; sys.modules['trustme'] = None; "
    "runpy.run_module('robust_mail.testing', run_name='__main__', alter_sys=True)",
]
BANNER = re.compile(r"SMTP test server on (\S+):(\d+) ")


class Server:
    """A CLI server process; ``stop()`` sends SIGINT and returns what it printed after the
    banner lines."""

    def __init__(self, *args: str, command: list[str] = CLI) -> None:
        self.process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", "0", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        )
        assert self.process.stdout is not None
        self.banner = self.process.stdout.readline()
        match = BANNER.search(self.banner)
        if match is None:
            self.stop()
            pytest.fail(f"no banner: {self.banner!r}, stderr: {self.stderr!r}")
        self.port = int(match.group(2))
        self.ca_file: str | None = None
        if "--tls" in args:
            line = self.process.stdout.readline()
            assert line.startswith("CA certificate to trust: "), line
            self.ca_file = line.removeprefix("CA certificate to trust: ").strip()

    def stop(self) -> str:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGINT)
        stdout, self.stderr = self.process.communicate(timeout=30)
        assert self.process.returncode == 0, self.stderr
        return stdout


def run(*args: str, command: list[str] = CLI) -> subprocess.CompletedProcess[str]:
    """Run the CLI expecting it to exit by itself."""
    return subprocess.run(
        [*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
    )


def starttls_noop(port: int, ca_file: str) -> int:
    context = ssl.create_default_context(cafile=ca_file)
    with smtplib.SMTP("localhost", port, timeout=5) as client:
        client.starttls(context=context)
        return client.noop()[0]


# -- 1. --certs-dir ---------------------------------------------------------------------------


def test_certs_dir_keeps_one_ca_across_restarts_while_the_default_ca_is_temporary(
    tmp_path: Path,
) -> None:
    server = Server("--tls", "starttls")
    assert server.ca_file is not None and os.path.exists(server.ca_file)
    server.stop()
    assert not os.path.exists(server.ca_file)

    certs_dir = tmp_path / "certs"
    first = Server("--tls", "starttls", "--certs-dir", str(certs_dir))
    try:
        assert first.ca_file == str(certs_dir / "ca.pem")
        assert stat.S_IMODE((certs_dir / "server.key").stat().st_mode) == 0o600
        ca_pem = (certs_dir / "ca.pem").read_bytes()
        assert starttls_noop(first.port, first.ca_file) == 250
    finally:
        first.stop()
    assert (certs_dir / "ca.pem").read_bytes() == ca_pem

    again = Server("--tls", "implicit", "--certs-dir", str(certs_dir))
    try:
        assert again.ca_file == first.ca_file
        assert (certs_dir / "ca.pem").read_bytes() == ca_pem
        context = ssl.create_default_context(cafile=again.ca_file)
        with smtplib.SMTP_SSL("localhost", again.port, timeout=5, context=context) as client:
            assert client.noop()[0] == 250
    finally:
        again.stop()


def test_certificates_made_together_in_one_directory_form_one_set(tmp_path: Path) -> None:
    # Two servers started at once on a fresh directory must not each write half a set.
    made: list[TestCertificates] = []
    start = threading.Barrier(6)

    def make() -> None:
        start.wait()
        made.append(TestCertificates(directory=tmp_path))

    threads = [threading.Thread(target=make) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(made) == 6
    context = ssl.create_default_context(cafile=tmp_path / "ca.pem")
    for certificates in made:
        with (
            SMTPTestServer(tls="implicit", certificates=certificates) as server,
            smtplib.SMTP_SSL("localhost", server.port, timeout=5, context=context) as client,
        ):
            assert client.noop()[0] == 250


def test_certs_dir_reused_for_other_names_is_refused(tmp_path: Path) -> None:
    TestCertificates(directory=tmp_path)
    with pytest.raises(ValueError, match="holds certificates for localhost"):
        TestCertificates(names=["smtp.internal"], directory=tmp_path)


def test_certs_dir_without_tls_is_refused(tmp_path: Path) -> None:
    result = run("--certs-dir", str(tmp_path))
    assert result.returncode == 2
    assert "--certs-dir is only used with --tls" in result.stderr


# -- 2. --mode ----------------------------------------------------------------------------------


def test_mode_help_lists_every_mode_and_an_unknown_mode_is_refused() -> None:
    help_text = " ".join(run("--help").stdout.split())  # argparse wraps lines
    for mode in Mode:
        assert mode.value in help_text

    result = run("--mode", "flaky")
    assert result.returncode == 2
    assert "argument --mode: invalid choice: 'flaky'" in result.stderr


# -- 3. port in use -----------------------------------------------------------------------------


def test_port_in_use_is_a_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 1
    assert result.stderr == (
        f"python -m robust_mail.testing: error: port {port} on 127.0.0.1 is in use\n"
    )


# -- 4. loopback only -----------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1"])
def test_a_host_that_is_not_loopback_is_refused(host: str) -> None:
    result = run("--host", host, "--port", "0")
    assert result.returncode == 2
    assert f"argument --host: {host!r} is not a loopback address" in result.stderr


def test_only_loopback_hosts_are_accepted_and_names_are_not_resolved(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for host in ["127.0.0.1", "127.0.0.2", "::1", "localhost", "LOCALHOST"]:
        assert _parse_args(["--host", host]).host == host
    for host in ["::", "10.0.0.1", "mail.example.com"]:
        with pytest.raises(SystemExit) as exc:
            _parse_args(["--host", host])
        assert exc.value.code == 2
        assert f"{host!r} is not a loopback address" in capsys.readouterr().err


# -- 5. without trustme ---------------------------------------------------------------------------


def test_a_plain_server_runs_without_trustme() -> None:
    server = Server(command=WITHOUT_TRUSTME)
    try:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=5) as client:
            assert client.noop()[0] == 250
    finally:
        server.stop()


def test_tls_without_trustme_names_the_extra_to_install() -> None:
    result = run("--port", "0", "--tls", "starttls", command=WITHOUT_TRUSTME)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "pip install 'robust-mail[testing]'" in result.stderr


# -- 6. --show-body -------------------------------------------------------------------------------


def _message(subject: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "noreply@example.com"
    message["To"] = "new@example.com"
    message["Subject"] = subject
    return message


def test_show_body_prints_the_decoded_text_part() -> None:
    alternative = _message("Your code")
    alternative.set_content("Votre code : 482913\nValable 10 minutes — merci.\n", cte="base64")
    alternative.add_alternative("<p>HTML code 482913</p>", subtype="html")
    html_only = _message("HTML only")
    html_only.set_content("<p>Code\x1b[2J 771204</p>", subtype="html")
    server = Server("--show-body", "--name", "primary")
    try:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=5) as client:
            client.send_message(alternative)
            client.send_message(html_only)
    finally:
        output = server.stop()
    assert output.splitlines() == [
        "[primary] from=noreply@example.com to=new@example.com subject='Your code' tls=False",
        "[primary]   Votre code : 482913",
        "[primary]   Valable 10 minutes — merci.",
        "[primary] from=noreply@example.com to=new@example.com subject='HTML only' tls=False",
        "[primary]   <p>Code\\x1b[2J 771204</p>",
    ]


def test_without_aiosmtpd_the_error_names_the_extra_to_install() -> None:
    import subprocess
    import sys

    script = "import sys; sys.modules['aiosmtpd'] = None; import robust_mail.testing"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)

    assert done.returncode != 0
    assert "pip install 'robust-mail[testing]'" in done.stderr


def test_a_reader_that_goes_away_stops_the_server_quietly_after_accepting_the_message() -> None:
    # `... | head -1`: printing the message line hits a closed pipe. That used to escape
    # the callback as a 451 for a message already recorded (so a client sent it again),
    # and end in a traceback.
    server = Server()
    assert server.process.stdout is not None
    server.process.stdout.close()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=5) as client:
        assert (
            client.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nhi\r\n") == {}
        )
        with contextlib.suppress(smtplib.SMTPServerDisconnected):
            client.quit()  # the server may be gone already
    assert server.process.wait(timeout=30) == 0
    assert server.process.stderr is not None
    assert server.process.stderr.read() == ""
    server.process.stderr.close()


@pytest.mark.parametrize("port", ["70000", "-1", "65536", "http"])
def test_a_port_out_of_range_is_a_usage_error(port: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        _parse_args(["--port", port])
    assert exit_.value.code == 2


def test_port_bounds_are_accepted() -> None:
    assert _parse_args(["--port", "0"]).port == 0
    assert _parse_args(["--port", "65535"]).port == 65535
