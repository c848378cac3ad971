"""Start a server process on loopback, wait until it responds, read its memory, stop it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

# A process using less than this share of one core between two checks is idle.
IDLE_CPU_SHARE = 0.05
IDLE_CHECK_SECONDS = 0.5
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Server:
    """One server process listening on 127.0.0.1, with its output in a log file."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path
        self.base_url = f"http://127.0.0.1:{port}"

    def peak_rss_mib(self) -> float:
        """Return the process's peak resident set size (VmHWM) so far, in MiB."""
        return self._memory_mib("VmHWM")

    def rss_mib(self) -> float:
        """Return the process's resident set size (VmRSS) now, in MiB."""
        return self._memory_mib("VmRSS")

    def _memory_mib(self, field: str) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text(encoding="ascii")
        for line in status.splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no {field} line in /proc/{self.process.pid}/status")

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Wait until any HTTP response comes back from ``/``; a 404 counts."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with status {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/", timeout=2):  # noqa: S310
                    return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"server did not respond within {timeout:g} s:\n{self.log_tail()}")

    def cpu_seconds(self) -> float:
        """Return the CPU time the process has used so far, user and system, in seconds."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text(encoding="ascii")
        # The command name in brackets may contain spaces; the fields after it don't.
        after_name = fields.rsplit(")", 1)[1].split()
        user, system = int(after_name[11]), int(after_name[12])
        return (user + system) / CLOCK_TICKS

    def wait_until_idle(self, timeout: float = 300.0) -> float:
        """Wait until the process has used almost no CPU for two checks in a row.

        wrk closes its connections at the end of a run, but the server goes on
        with the requests it had accepted (and safereset's worker with the mail
        they queued). Without this wait, that backlog would slow the next run.
        Returns the seconds waited.
        """
        started = time.monotonic()
        quiet = 0
        before = self.cpu_seconds()
        while quiet < 2:
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"server still busy after {timeout:g} s:\n{self.log_tail()}")
            time.sleep(IDLE_CHECK_SECONDS)
            after = self.cpu_seconds()
            busy = (after - before) / IDLE_CHECK_SECONDS
            quiet = quiet + 1 if busy < IDLE_CPU_SHARE else 0
            before = after
        return time.monotonic() - started

    def stop(self) -> None:
        stop_process(self.process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Ask ``process`` to stop with SIGTERM, and kill it if it still runs after 20 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running(
    command: list[str], environment: dict[str, str], port: int, log_path: Path
) -> Iterator[Server]:
    """Run ``command`` (which must listen on ``port``) until the block ends."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command,
            env={**os.environ, **environment},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(process, port, log_path)
    try:
        server.wait_until_serving()
        yield server
    finally:
        server.stop()
