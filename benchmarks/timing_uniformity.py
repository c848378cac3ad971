"""Measure whether POST /api/recovery takes as long for unknown addresses as for known ones.

Starts a real `safereset serve` on a free loopback port with a fresh SQLite
database (or the one SAFERESET_DATABASE_URL names) and adds the known users.
Then one keep-alive client sends known and unknown addresses in one shuffled
sequence. The script prints both latency distributions, the difference of
their medians and the two-sample Kolmogorov-Smirnov statistic with its
asymptotic p-value.

    python benchmarks/timing_uniformity.py [--requests 1000] [--seed 7]

A large p-value means the test finds no difference between the two
distributions; it does not prove there is none.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2

UNLIMITED = "100000000/1s"
LIMIT_VARIABLES = (
    "SAFERESET_LIMIT_RECOVERY_PER_CLIENT",
    "SAFERESET_LIMIT_RECOVERY_PER_ADDRESS",
    "SAFERESET_LIMIT_MAIL_PER_ACCOUNT",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def ks_two_sample(first: list[float], second: list[float]) -> tuple[float, float]:
    """Return the Kolmogorov-Smirnov statistic D and its asymptotic p-value."""
    a, b = sorted(first), sorted(second)
    i = j = 0
    d = 0.0
    while i < len(a) and j < len(b):
        value = min(a[i], b[j])
        while i < len(a) and a[i] <= value:
            i += 1
        while j < len(b) and b[j] <= value:
            j += 1
        d = max(d, abs(i / len(a) - j / len(b)))
    effective = len(a) * len(b) / (len(a) + len(b))
    root = math.sqrt(effective)
    return d, kolmogorov_q((root + 0.12 + 0.11 / root) * d)


def kolmogorov_q(x: float) -> float:
    """Survival function of the Kolmogorov distribution: 2 sum (-1)^(k-1) exp(-2 k^2 x^2)."""
    if x < 1e-3:
        return 1.0
    total = 0.0
    for k in range(1, 101):
        term = 2 * (-1) ** (k - 1) * math.exp(-2 * k * k * x * x)
        total += term
        if abs(term) < 1e-12:
            break
    return min(1.0, max(0.0, total))


def describe(name: str, samples: list[float]) -> str:
    ordered = sorted(samples)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return (
        f"{name:8} n={len(samples):5}  median={statistics.median(samples) * 1000:7.3f} ms  "
        f"p10={quantile(0.10):7.3f}  p90={quantile(0.90):7.3f}  p99={quantile(0.99):7.3f}  "
        f"mean={statistics.fmean(samples) * 1000:7.3f}"
    )


def add_users(environment: dict[str, str], count: int) -> list[str]:
    """Create ``count`` accounts (without passwords, so no hashing) in the database."""
    os.environ.update(environment)
    from safereset.runtime import build
    from safereset.settings import load_settings
    from safereset.store.db import migrate

    runtime = build(load_settings())
    migrate(runtime.service.engine)
    addresses = [f"user{index}@example.com" for index in range(count)]
    for address in addresses:
        runtime.service.add_user(address)
    runtime.service.engine.dispose()
    return addresses


def wait_healthy(base: str, server: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode}")
        try:
            if httpx2.get(f"{base}/healthz", timeout=1.0, trust_env=False).status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not become healthy in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per group")
    parser.add_argument("--seed", type=int, default=7, help="seed of the shuffled order")
    parser.add_argument("--warmup", type=int, default=100, help="requests before measuring")
    arguments = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="safereset-timing-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    environment = {
        "SAFERESET_DATA_DIR": str(folder),
        "SAFERESET_SECRET_KEY": "timing-benchmark-secret-key-0123456789abcdef",
        "SAFERESET_PUBLIC_URL": base,
        "SAFERESET_LOG_LEVEL": "WARNING",
        **{variable: UNLIMITED for variable in LIMIT_VARIABLES},
    }
    known = add_users(environment, arguments.requests)
    unknown = [f"nobody{index}@example.com" for index in range(arguments.requests)]
    order = [("known", address) for address in known] + [("unknown", a) for a in unknown]
    random.Random(arguments.seed).shuffle(order)

    script = Path(sys.executable).with_name("safereset")
    server = subprocess.Popen(
        [str(script), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **environment},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_healthy(base, server)
        timings: dict[str, list[float]] = {"known": [], "unknown": []}
        with httpx2.Client(base_url=base, timeout=10.0, trust_env=False) as client:
            for index in range(arguments.warmup):
                client.post("/api/recovery", json={"email": f"warmup{index}@example.com"})
            for group, address in order:
                started = time.perf_counter()
                response = client.post("/api/recovery", json={"email": address})
                elapsed = time.perf_counter() - started
                if response.status_code != 202:
                    raise SystemExit(f"unexpected {response.status_code}: {response.text}")
                timings[group].append(elapsed)
    finally:
        server.terminate()
        server.wait(timeout=15)
        shutil.rmtree(folder, ignore_errors=True)

    statistic, p_value = ks_two_sample(timings["known"], timings["unknown"])
    difference = statistics.median(timings["known"]) - statistics.median(timings["unknown"])
    print(
        f"POST /api/recovery, {arguments.requests} known and {arguments.requests} unknown, "
        f"interleaved (seed {arguments.seed}), SQLite, one client over loopback"
    )
    print(describe("known", timings["known"]))
    print(describe("unknown", timings["unknown"]))
    print(f"median difference (known - unknown): {difference * 1000:+.3f} ms")
    print(f"Kolmogorov-Smirnov D = {statistic:.4f}, p = {p_value:.4f}")


if __name__ == "__main__":
    main()
