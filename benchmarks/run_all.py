"""Run every benchmark and write docs/benchmarks.md.

    python benchmarks/run_all.py            # the full run, about 30 minutes
    python benchmarks/run_all.py --quick    # a few minutes, to check the set-up

`benchmarks/run` calls this after installing what it needs; see
benchmarks/README.md. The phases, in order:

1. Argon2id alone: raw hashes per second with safereset's parameters.
2. Load: safereset, Django and fastapi-users, each as one Uvicorn process on
   SQLite and on PostgreSQL, driven by wrk at several concurrency levels on
   three routes: ask for recovery, complete a reset, log in.
3. Growth: safereset's latency on the same routes with 10^3, 10^5 and 10^6
   accounts and as many outstanding tickets, on both databases, and the
   peers' latency of asking for recovery and logging in at the same sizes.
4. Timing uniformity of the recovery request (benchmarks/timing_uniformity.py).

Raw figures go to benchmarks/.results/results.json; the report is rendered
from that file, so `--report-only` rewrites it without measuring again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchkit import argon, databases, population, report
from benchkit.apps import (
    APPLICATIONS,
    PASSWORD,
    PEER_APPLICATIONS,
    PRODUCTS,
    Application,
    Safereset,
)
from benchkit.load import HttpRequest, LoadResult, run_wrk, write_requests, wrk_version
from benchkit.servers import Server

from safereset.passwords import Hasher
from safereset.store.db import migrate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / ".results" / "results.json"
REPORT = ROOT / "docs" / "benchmarks.md"

REQUEST_LEVELS = (1, 8, 32)
# Complete and login each cost one Argon2id computation of about 0.1 s, so
# beyond a few connections per core the extra ones only queue.
HASHING_LEVELS = (1, 2, 8)
# Each route uses its own range of account indexes, because the routes change
# accounts. A completed reset changes the password, so a login with the seeded
# one would fail. A login changes Django's reset tokens, which cover the last
# login time. A new recovery request supersedes safereset's earlier tickets.
LOGIN_ACCOUNTS = range(1000, 3000)
FLOOD_CONNECTIONS = 32
REQUEST_FIRST = 3000


@dataclass(frozen=True)
class Options:
    users: int
    seconds: float
    tokens_per_run: int
    sizes: tuple[int, ...]
    growth_seconds: float
    growth_tokens: int
    timing_requests: int
    argon_seconds: float


FULL = Options(
    users=10_000,
    seconds=10,
    tokens_per_run=300,
    sizes=(1_000, 100_000, 1_000_000),
    growth_seconds=6,
    growth_tokens=60,
    timing_requests=1000,
    argon_seconds=10,
)
QUICK = Options(
    users=4_000,
    seconds=3,
    tokens_per_run=40,
    sizes=(1_000, 10_000),
    growth_seconds=2,
    growth_tokens=15,
    timing_requests=200,
    argon_seconds=2,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs to check the set-up")
    parser.add_argument(
        "--backends",
        default=",".join(databases.BACKENDS),
        help="comma-separated: sqlite, postgresql (default both)",
    )
    parser.add_argument("--skip-growth", action="store_true", help="leave out phase 3")
    parser.add_argument("--report-only", action="store_true", help="render the last results")
    parser.add_argument("--output", type=Path, default=REPORT, help="where to write the report")
    arguments = parser.parse_args()

    if arguments.report_only:
        results = json.loads(RESULTS.read_text(encoding="utf-8"))
        report.write(results, arguments.output)
        print(f"wrote {arguments.output}")
        return

    options = QUICK if arguments.quick else FULL
    backends = [name.strip() for name in arguments.backends.split(",") if name.strip()]
    for backend in backends:
        if backend not in databases.BACKENDS:
            raise SystemExit(f"unknown backend {backend!r}; expected sqlite or postgresql")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed; run benchmarks/run, or apt-get install wrk")

    results: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/run_all.py", *sys.argv[1:]]),
        "options": asdict(options),
        "skipped": [],
        "failed": [],
        "load": [],
        "flood": [],
        "memory": [],
        "settle": [],
        "growth": [],
    }
    if "postgresql" in backends:
        problem = databases.postgres_problem()
        if problem is not None:
            results["skipped"].append(f"{problem}; the PostgreSQL figures are missing.")
            backends.remove("postgresql")

    print("preparing the peers' environments", flush=True)
    for application in APPLICATIONS:
        application.prepare()
    results["machine"] = describe_machine("postgresql" in backends)
    results["versions"] = {app.label: app.versions() for app in PRODUCTS}
    results["routes"] = {app.label: app.routes for app in PRODUCTS}

    print("phase 1: Argon2id alone", flush=True)
    results["argon2"] = argon.measure(options.argon_seconds)

    with tempfile.TemporaryDirectory(prefix="safereset-bench-") as folder:
        work = Path(folder)
        for backend in backends:
            for application in APPLICATIONS:
                title = f"load, {application.label} on {backend}"
                phase(results, title, load_phase, application, backend, options, work, results)
        if not arguments.skip_growth:
            for backend in backends:
                title = f"growth on {backend}"
                phase(results, title, growth_phase, backend, options, work, results)
            for backend in backends:
                for peer in PEER_APPLICATIONS:
                    title = f"growth of {peer.label} on {backend}"
                    phase(results, title, peer_growth_phase, peer, backend, options, work, results)

    print("timing uniformity", flush=True)
    results["timing"] = timing_uniformity(options.timing_requests)
    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    save(results)
    report.write(results, arguments.output)
    print(f"wrote {RESULTS} and {arguments.output}")
    if results["failed"]:
        raise SystemExit("some phases failed; the report lists them")


def phase(results: dict[str, Any], title: str, run: Any, *arguments: Any) -> None:
    """Run one phase; on failure note it in the report and go on with the next.

    The results so far are saved after every phase, so a run that stops
    halfway still leaves its figures for ``--report-only``.
    """
    print(title, flush=True)
    try:
        run(*arguments)
    except Exception as error:  # one broken phase must not lose the others
        message = f"{title}: {type(error).__name__}: {error}".splitlines()[0][:300]
        print(f"  failed: {message}", flush=True)
        results["failed"].append(message)
    save(results)


def save(results: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1), encoding="utf-8")


def record(
    results: dict[str, Any],
    section: str,
    outcome: LoadResult,
    success: int,
    route: str,
    labels: dict[str, Any],
) -> None:
    """Keep one run's figures and print them.

    wrk divides by the whole run time even when connections stopped early
    for lack of tokens, so such a run's rate is only a lower bound.
    """
    row = {
        **labels,
        "route": route,
        **asdict(outcome),
        "success": outcome.count([success]),
        "success_status": success,
        "tokens_ran_out": outcome.finished_connections > 0,
    }
    results[section].append(row)
    print(
        f"    {route:8} c={outcome.connections:<3} "
        f"{outcome.requests_per_second:8.1f} req/s  "
        f"{outcome.per_second([success]):8.1f} ok/s  "
        f"p50 {outcome.p50_ms:8.1f} ms  p99 {outcome.p99_ms:8.1f} ms  {outcome.statuses}"
        + ("  (tokens ran out)" if row["tokens_ran_out"] else ""),
        flush=True,
    )


def load_phase(
    application: Application,
    backend: str,
    options: Options,
    work: Path,
    results: dict[str, Any],
) -> None:
    """Seed a fresh database, start one server and drive each route at each level."""
    if options.users < REQUEST_FIRST + 1000:
        raise SystemExit(f"at least {REQUEST_FIRST + 1000} accounts are needed")
    tokens = options.tokens_per_run * len(HASHING_LEVELS)
    if tokens > LOGIN_ACCOUNTS.start:
        raise SystemExit(f"at most {LOGIN_ACCOUNTS.start} reset tokens fit below the logins")
    if "complete" not in application.measured:
        tokens = 0
    database = databases.fresh(backend, f"bench_{application.name}", work)
    try:
        completions = application.seed(database, options.users, tokens, work)
        with application.server(database, work) as server:
            run = LoadRun(application, database, server, options, work, results, backend)
            start_mib = server.rss_mib()
            warm_up = [
                application.recovery_request(f"warm-up{index}@bench.example")
                for index in range(200)
            ]
            run.replay("warm-up", warm_up, 2, once=False, polite=False)
            application.settle(database, work)
            if "request" in application.measured:
                run.drive_requests()
            if "complete" in application.measured:
                run.drive_completions(completions)
            if "login" in application.measured:
                run.drive_logins()
            results["memory"].append(
                {**run.labels, "start_mib": start_mib, "peak_mib": server.peak_rss_mib()}
            )
    finally:
        databases.drop(database)


class LoadRun:
    """The load runs against one running server."""

    def __init__(
        self,
        application: Application,
        database: databases.Database,
        server: Server,
        options: Options,
        work: Path,
        results: dict[str, Any],
        backend: str,
    ) -> None:
        self.application = application
        self.database = database
        self.server = server
        self.options = options
        self.work = work
        self.results = results
        self.labels = {"backend": backend, "app": application.label}
        self.files = work / "requests"
        self.files.mkdir(exist_ok=True)

    def replay(
        self, name: str, lines: list[HttpRequest], connections: int, once: bool, polite: bool
    ) -> LoadResult:
        """Run wrk over ``lines``, then wait until the server has no backlog left."""
        path = self.files / f"{name}.txt"
        write_requests(path, lines)
        outcome = run_wrk(
            self.server.base_url,
            path,
            connections=connections,
            seconds=self.options.seconds,
            once=once,
            honour_retry_after=polite,
        )
        self.server.wait_until_idle()
        return outcome

    def drive_requests(self) -> None:
        application = self.application
        requests = [
            application.recovery_request(population.email_of(index))
            for index in range(REQUEST_FIRST, self.options.users)
        ]
        for connections in REQUEST_LEVELS:
            outcome = self.replay("request", requests, connections, once=False, polite=False)
            record(
                self.results, "load", outcome, application.success.request, "request", self.labels
            )
            waited = application.settle(self.database, self.work)
            self.results["settle"].append(
                {**self.labels, "connections": connections, "seconds": waited}
            )

    def drive_completions(self, completions: list[HttpRequest]) -> None:
        per_run = self.options.tokens_per_run
        for number, connections in enumerate(HASHING_LEVELS):
            share = completions[number * per_run :][:per_run]
            outcome = self.replay("complete", share, connections, once=True, polite=True)
            record(
                self.results,
                "load",
                outcome,
                self.application.success.complete,
                "complete",
                self.labels,
            )
            self.application.settle(self.database, self.work)

    def drive_logins(self) -> None:
        application = self.application
        logins = [
            application.login_request(population.email_of(index), PASSWORD)
            for index in LOGIN_ACCOUNTS
        ]
        for connections in HASHING_LEVELS:
            outcome = self.replay("login", logins, connections, once=False, polite=True)
            record(self.results, "load", outcome, application.success.login, "login", self.labels)
        # A flood: clients that send again at once after a 503.
        outcome = self.replay("login", logins, FLOOD_CONNECTIONS, once=False, polite=False)
        record(self.results, "flood", outcome, application.success.login, "login", self.labels)


def growth_phase(backend: str, options: Options, work: Path, results: dict[str, Any]) -> None:
    """Measure safereset's routes one request at a time as accounts and tickets grow."""
    application = Safereset()
    database = databases.fresh(backend, "bench_growth", work)
    runtime = application.runtime(database, work)
    password_hash = Hasher().hash(PASSWORD)
    issued = 0
    try:
        migrate(runtime.service.engine)
        for size in options.sizes:
            populate_seconds = population.add_accounts(runtime.service.engine, size, password_hash)
            counts = population.count_rows(runtime.service.engine)
            print(
                f"  {counts['accounts']} accounts, {counts['outstanding_tickets']} "
                f"outstanding tickets (added in {populate_seconds:.1f} s)",
                flush=True,
            )
            completions = application.issue_links(
                runtime, range(issued, issued + options.growth_tokens)
            )
            issued += options.growth_tokens
            labels = {
                "backend": backend,
                "app": application.label,
                "populate_seconds": populate_seconds,
                **counts,
            }
            measure_growth(application, database, options, work, results, completions, labels)
    finally:
        runtime.service.engine.dispose()
        databases.drop(database)


def measure_growth(
    application: Safereset,
    database: databases.Database,
    options: Options,
    work: Path,
    results: dict[str, Any],
    completions: list[HttpRequest],
    labels: dict[str, Any],
) -> None:
    logins, requests = growth_requests(application, labels["accounts"])
    warm_up = [application.recovery_request(f"warm-up{index}@bench.example") for index in range(50)]
    files = work / "growth"
    files.mkdir(exist_ok=True)
    with application.server(database, work) as server:
        runs = (
            ("warm-up", warm_up, False, None),
            ("complete", completions, True, application.success.complete),
            ("login", logins, False, application.success.login),
            ("request", requests, False, application.success.request),
        )
        for route, lines, once, success in runs:
            path = files / f"{route}.txt"
            write_requests(path, lines)
            seconds = options.growth_seconds * (3 if once else 1)
            outcome = run_wrk(server.base_url, path, connections=1, seconds=seconds, once=once)
            server.wait_until_idle()
            if success is not None:
                record(results, "growth", outcome, success, route, labels)
        application.settle(database, work)


def peer_growth_phase(
    application: Application,
    backend: str,
    options: Options,
    work: Path,
    results: dict[str, Any],
) -> None:
    """Measure a peer's request and login routes, one at a time, at each size.

    Completing a reset is left out: the peers' tokens are stateless, so no
    table of outstanding tickets grows.
    """
    for size in options.sizes:
        database = databases.fresh(backend, f"bench_growth_{application.name}", work)
        try:
            started = time.perf_counter()
            application.seed(database, size, 0, work)
            labels = {
                "backend": backend,
                "app": application.label,
                "accounts": size,
                "outstanding_tickets": 0,
                "populate_seconds": time.perf_counter() - started,
            }
            print(f"  {size} accounts (seeded in {labels['populate_seconds']:.1f} s)", flush=True)
            logins, requests = growth_requests(application, size)
            runs = (
                ("login", logins, application.success.login),
                ("request", requests, application.success.request),
            )
            with application.server(database, work) as server:
                for route, lines, success in runs:
                    path = work / f"peer-growth-{route}.txt"
                    write_requests(path, lines)
                    outcome = run_wrk(
                        server.base_url,
                        path,
                        connections=1,
                        seconds=options.growth_seconds,
                        once=False,
                    )
                    server.wait_until_idle()
                    record(results, "growth", outcome, success, route, labels)
        finally:
            databases.drop(database)


def growth_requests(
    application: Application, size: int
) -> tuple[list[HttpRequest], list[HttpRequest]]:
    """Return the logins and recovery requests of a growth step with ``size`` accounts.

    The newest accounts log in, because no reset has changed their password.
    """
    logins = [
        application.login_request(population.email_of(index), PASSWORD)
        for index in range(max(size - 500, 0), size)
    ]
    requests = [
        application.recovery_request(population.email_of(index))
        for index in range(size // 2, min(size // 2 + 1000, size))
    ]
    return logins, requests


def timing_uniformity(requests: int) -> str:
    script = ROOT / "benchmarks" / "timing_uniformity.py"
    completed = subprocess.run(
        [sys.executable, str(script), "--requests", str(requests)],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        return f"timing_uniformity.py failed: {completed.stderr.strip()[-800:]}"
    return completed.stdout.strip()


def describe_machine(with_postgres: bool) -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kib = 0
    for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": f"{memory_kib / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": databases.sqlite_version(),
        "postgresql": databases.postgres_version() if with_postgres else "not used",
        "wrk": wrk_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


if __name__ == "__main__":
    main()
