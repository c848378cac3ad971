"""Drive a server with wrk, replaying prepared requests, and read back its figures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

REPLAY_SCRIPT = Path(__file__).with_name("replay.lua")
# Keeps slow responses (a queue of Argon2id computations) in the latency figures
# instead of counting them as wrk timeouts, which have no latency.
WRK_TIMEOUT = "60s"
FORBIDDEN = ("\t", "\n", "\r", "\x1f")


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: str

    def line(self) -> str:
        """Encode the request as one line of the replay file that replay.lua reads."""
        pairs = [f"{name}: {value}" for name, value in self.headers.items()]
        for value in (self.method, self.path, self.body, *pairs):
            if any(character in value for character in FORBIDDEN):
                raise ValueError(f"a tab, newline or 0x1f byte cannot be replayed: {value!r}")
        return "\t".join((self.method, self.path, "\x1f".join(pairs), self.body))

    @classmethod
    def from_json(cls, text: str) -> HttpRequest:
        """Read a request that a peer's seed command wrote as one JSON object."""
        item = json.loads(text)
        return cls(item["method"], item["path"], dict(item["headers"]), item["body"])


def json_post(path: str, payload: dict[str, str]) -> HttpRequest:
    return HttpRequest("POST", path, {"Content-Type": "application/json"}, json.dumps(payload))


def form_post(path: str, body: str) -> HttpRequest:
    return HttpRequest("POST", path, {"Content-Type": "application/x-www-form-urlencoded"}, body)


@dataclass
class LoadResult:
    connections: int
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[str, int]
    socket_errors: dict[str, int] = field(default_factory=dict)
    # Connections that sent all their lines before the time was up ("once" only).
    finished_connections: int = 0

    def count(self, statuses: Iterable[int]) -> int:
        return sum(self.statuses.get(str(status), 0) for status in statuses)

    def per_second(self, statuses: Iterable[int]) -> float:
        return self.count(statuses) / self.seconds if self.seconds else 0.0

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk_version() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        return "not installed"
    # wrk prints its version in the usage text, on the first line, and exits 1.
    completed = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    return (completed.stdout or completed.stderr).splitlines()[0].strip()


def run_wrk(
    base_url: str,
    requests_file: Path,
    *,
    connections: int,
    seconds: float,
    once: bool,
    honour_retry_after: bool = False,
) -> LoadResult:
    """Send the requests of ``requests_file`` over ``connections`` keep-alive connections.

    With ``once`` every line is sent once, or again after a 503, and a
    connection stops after its share. Without it the lines repeat until
    ``seconds`` pass. With ``honour_retry_after`` a connection that gets 503
    waits for the time its Retry-After header gives.
    """
    command = [
        "wrk",
        f"--threads={connections}",
        f"--connections={connections}",
        f"--duration={max(1, round(seconds))}s",
        f"--timeout={WRK_TIMEOUT}",
        f"--script={REPLAY_SCRIPT}",
        base_url,
        "--",
        str(requests_file),
        str(connections),
        "once" if once else "loop",
    ]
    environment = {**os.environ, "REPLAY_HONOUR_RETRY_AFTER": "1" if honour_retry_after else "0"}
    completed = subprocess.run(
        command, capture_output=True, text=True, check=False, env=environment
    )
    for line in completed.stdout.splitlines():
        if line.startswith("WRK_RESULT "):
            figures = json.loads(line.removeprefix("WRK_RESULT "))
            break
    else:
        raise RuntimeError(
            f"wrk printed no result (exit status {completed.returncode}): "
            f"{(completed.stderr or completed.stdout).strip()[:500]}"
        )
    latency = figures["latency_us"]
    errors = {name: count for name, count in figures["errors"].items() if name != "status"}
    return LoadResult(
        connections=connections,
        requests=figures["requests"],
        seconds=figures["duration_us"] / 1e6,
        p50_ms=latency["p50"] / 1000,
        p90_ms=latency["p90"] / 1000,
        p99_ms=latency["p99"] / 1000,
        max_ms=latency["max"] / 1000,
        statuses=figures["statuses"],
        socket_errors={name: count for name, count in errors.items() if count},
        finished_connections=figures["finished_threads"],
    )


def write_requests(path: Path, requests: Iterable[HttpRequest]) -> int:
    """Write the replay file; return how many requests it holds."""
    lines = [request.line() for request in requests]
    if not lines:
        raise ValueError(f"no requests to write to {path}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)
