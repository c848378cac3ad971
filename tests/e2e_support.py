"""Helpers for the end-to-end tests: the real `safereset` command as subprocesses.

Every process here listens on or talks to 127.0.0.1 only.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import httpx2
import pytest

from tests.conftest import SECRET_KEY, text_body

HOST = "127.0.0.1"
STARTUP_TIMEOUT_SECONDS = 20.0
STOP_TIMEOUT_SECONDS = 10.0
COMMAND_TIMEOUT_SECONDS = 60.0
WORKER_POLL_SECONDS = "0.2"

_CSRF_FIELD = re.compile(r'<input type="hidden" name="csrf" value="([^"]+)">')
_RECOVERY_LINK = re.compile(r"\S+/recover\?token=\S+")


def console_script() -> Path:
    """Return the `safereset` script installed beside the running interpreter."""
    # The package has no __main__ module, so `python -m safereset` does not work.
    script = Path(sys.executable).with_name("safereset")
    if not script.is_file():
        pytest.fail(f"console script not found at {script}; install the package first")
    return script


@dataclass
class Deployment:
    """The settings that the server and the CLI commands of one test share."""

    data_dir: Path
    mail_url: str
    port: int

    @property
    def public_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def environment(self) -> dict[str, str]:
        """Return this process's environment with its SAFERESET_ variables replaced by ours."""
        inherited = {
            name: value for name, value in os.environ.items() if not name.startswith("SAFERESET_")
        }
        return {
            **inherited,
            "SAFERESET_DATA_DIR": str(self.data_dir),
            "SAFERESET_SECRET_KEY": SECRET_KEY,
            "SAFERESET_MAIL_URL": self.mail_url,
            "SAFERESET_PUBLIC_URL": self.public_url,
            "SAFERESET_WORKER_POLL_SECONDS": WORKER_POLL_SECONDS,
        }

    def run_command(self, *arguments: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        """Run `safereset ARGUMENTS` to completion and fail the test if it exits non-zero."""
        completed = subprocess.run(
            [str(console_script()), *arguments],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.environment(),
            timeout=COMMAND_TIMEOUT_SECONDS,
            check=False,
        )
        if completed.returncode != 0:
            pytest.fail(
                f"`safereset {' '.join(arguments)}` exited with {completed.returncode}:\n"
                f"{completed.stderr}"
            )
        return completed

    def add_user(self, email: str, password: str) -> None:
        self.run_command("user", "add", email, "--password-stdin", stdin=password + "\n")


@dataclass
class ServerProcess:
    """One `safereset serve` subprocess, whose output and log go to a file."""

    deployment: Deployment
    options: tuple[str, ...]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            str(console_script()),
            "serve",
            "--host",
            HOST,
            "--port",
            str(self.deployment.port),
            *self.options,
        ]
        # A pipe that the test does not read would fill up and block the server, so use a file.
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                env=self.deployment.environment(),
            )

    def wait_until_healthy(self, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
        """Poll GET /healthz until it returns 200, or fail the test with the server log."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        with httpx2.Client(base_url=self.deployment.public_url, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    pytest.fail(
                        f"server exited with {self.process.returncode} during start-up:\n"
                        f"{self.log()}"
                    )
                try:
                    if client.get("/healthz", timeout=1.0).status_code == 200:
                        return
                except httpx2.TransportError:
                    pass
                time.sleep(0.1)
        pytest.fail(f"server did not become healthy within {timeout} s:\n{self.log()}")

    def kill(self) -> None:
        """Kill the server with SIGKILL, so it cannot finish anything it started."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=STOP_TIMEOUT_SECONDS)

    def stop(self) -> None:
        """Terminate the server, and kill it when it does not exit in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_SECONDS)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@dataclass
class ServerLauncher:
    """The servers of one test, which the fixture stops at teardown."""

    deployment: Deployment
    log_folder: Path
    servers: list[ServerProcess] = field(default_factory=list)

    def start(self, *options: str) -> ServerProcess:
        """Start `safereset serve OPTIONS` and wait until it is healthy."""
        log_path = self.log_folder / f"server-{len(self.servers) + 1}.log"
        server = ServerProcess(self.deployment, options, log_path)
        self.servers.append(server)
        server.start()
        server.wait_until_healthy()
        return server

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


def csrf_token(page: str) -> str:
    """Return the value of the hidden CSRF field of a form page."""
    match = _CSRF_FIELD.search(page)
    if match is None:
        raise AssertionError(f"no CSRF field in the page:\n{page}")
    return match.group(1)


def recovery_link(message: EmailMessage) -> str:
    """Return the recovery link from the plain-text part of a mail."""
    match = _RECOVERY_LINK.search(text_body(message))
    if match is None:
        raise AssertionError(f"no recovery link in the mail:\n{text_body(message)}")
    return match.group(0)


def token_of(link: str) -> str:
    """Return the token in the query string of a recovery link."""
    return link.partition("?token=")[2]
