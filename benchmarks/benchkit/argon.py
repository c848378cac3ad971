"""The ceiling Argon2id sets: raw hashes per second with safereset's parameters."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

from safereset.passwords import Hasher


def hashes_per_second(threads: int, seconds: float) -> float:
    """Hash with ``threads`` threads for about ``seconds``; return the hashes per second.

    argon2-cffi releases the GIL while it hashes, so threads of one process
    use every core, as the server's thread pool does.
    """
    hasher = Hasher()
    hasher.hash("warm-up password")
    deadline = time.perf_counter() + seconds

    def work(_: int) -> int:
        count = 0
        while time.perf_counter() < deadline:
            hasher.hash("benchmark-password-1")
            count += 1
        return count

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(work, range(threads)))
    return total / (time.perf_counter() - started)


def measure(seconds: float) -> dict[str, float]:
    """Return raw hashes per second with one thread and with one thread per core."""
    cores = os.cpu_count() or 1
    figures = {"threads_1": hashes_per_second(1, seconds)}
    figures[f"threads_{cores}"] = hashes_per_second(cores, seconds)
    return figures
