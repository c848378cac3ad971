"""The applications under test: safereset and the two peers, behind one interface.

Each application can seed a fresh database with accounts and one-time reset
requests, start one server process on loopback, and form the three requests
the load runs send: ask for recovery, complete a reset, log in.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from benchkit import population
from benchkit.databases import Database
from benchkit.load import HttpRequest, form_post, json_post
from benchkit.servers import Server, free_port, running, stop_process
from sqlalchemy import func, select

from safereset.passwords import Hasher
from safereset.runtime import Runtime, build
from safereset.settings import Settings
from safereset.store import models
from safereset.store.db import migrate

BENCHMARKS = Path(__file__).resolve().parent.parent
PEERS = BENCHMARKS / "peers"
VENVS = BENCHMARKS / ".venvs"
PASSWORD = "benchmark-password-1"  # noqa: S105  # the password of every seeded account
NEW_PASSWORD = "benchmark-new-passphrase-2"  # noqa: S105  # set by each completed reset
SECRET_KEY = "benchmark-secret-key-0123456789abcdef-0123456789abcdef"  # noqa: S105
# Rate limits would reject most benchmark requests with 429, so a run would
# measure only the rejection. Every limit is lifted; the bucket upserts still run.
UNLIMITED = "1000000000/1d"
LIMITS = (
    "limit_recovery_per_client",
    "limit_recovery_per_address",
    "limit_completion_per_client",
    "limit_login_per_account",
    "limit_login_per_client",
    "limit_mail_per_account",
)
SETTLE_TIMEOUT = 300.0
SAFERESET_COMMAND = Path(sys.executable).with_name("safereset")


@dataclass(frozen=True)
class Statuses:
    """The status code of success for each route."""

    request: int
    complete: int
    login: int


class Application:
    name: str
    label: str
    success: Statuses
    routes: dict[str, str]
    # The routes the load phase drives; a variant may measure fewer.
    measured: tuple[str, ...] = ("request", "complete", "login")

    def prepare(self) -> None:
        """Install what the application needs to run."""

    def seed(self, database: Database, users: int, tokens: int, work: Path) -> list[HttpRequest]:
        """Add ``users`` accounts; return reset completions for the first ``tokens``."""
        raise NotImplementedError

    def server(self, database: Database, work: Path) -> contextlib.AbstractContextManager[Server]:
        raise NotImplementedError

    def recovery_request(self, email: str) -> HttpRequest:
        raise NotImplementedError

    def login_request(self, email: str, password: str) -> HttpRequest:
        raise NotImplementedError

    def versions(self) -> dict[str, str]:
        raise NotImplementedError

    def settle(self, database: Database, work: Path) -> float:
        """Wait until work queued by earlier requests is done; return the seconds waited."""
        return 0.0


class Safereset(Application):
    name = "safereset"
    label = "safereset"
    success = Statuses(request=202, complete=200, login=201)
    routes = {  # noqa: RUF012  # read-only description for the report
        "request": "POST /api/recovery (JSON)",
        "complete": "POST /api/recovery/complete (JSON)",
        "login": "POST /api/sessions (JSON)",
    }

    def settings(self, database: Database, work: Path, port: int = 8000) -> Settings:
        limits = {name: UNLIMITED for name in LIMITS}
        return Settings(
            data_dir=work / "safereset-data",
            database_url=database.sqlalchemy_url,
            secret_key=SECRET_KEY,
            public_url=f"http://127.0.0.1:{port}",
            log_level="WARNING",
            **limits,
        )

    def runtime(self, database: Database, work: Path) -> Runtime:
        return build(self.settings(database, work))

    def seed(self, database: Database, users: int, tokens: int, work: Path) -> list[HttpRequest]:
        runtime = self.runtime(database, work)
        try:
            migrate(runtime.service.engine)
            population.add_accounts(runtime.service.engine, users, Hasher().hash(PASSWORD))
            return self.issue_links(runtime, range(tokens))
        finally:
            runtime.service.engine.dispose()

    def issue_links(self, runtime: Runtime, indexes: Sequence[int]) -> list[HttpRequest]:
        """Start a recovery for each account through the service; return the completions."""
        completions = []
        for index in indexes:
            link = runtime.service.issue_operator_link(population.email_of(index))
            token = parse_qs(urlsplit(link).query)["token"][0]
            completions.append(
                json_post("/api/recovery/complete", {"token": token, "password": NEW_PASSWORD})
            )
        return completions

    def environment(self, database: Database, work: Path, port: int) -> dict[str, str]:
        settings = self.settings(database, work, port)
        return {
            f"SAFERESET_{name.upper()}": str(value)
            for name, value in settings.model_dump().items()
            if name in settings.model_fields_set
        }

    @contextlib.contextmanager
    def server(self, database: Database, work: Path) -> Iterator[Server]:
        port = free_port()
        command = [str(SAFERESET_COMMAND), "serve", "--port", str(port)]
        environment = self.environment(database, work, port)
        with running(command, environment, port, work / "safereset.log") as server:
            yield server

    def recovery_request(self, email: str) -> HttpRequest:
        return json_post("/api/recovery", {"email": email})

    def login_request(self, email: str, password: str) -> HttpRequest:
        return json_post("/api/sessions", {"email": email, "password": password})

    def versions(self) -> dict[str, str]:
        names = ("safereset", "fastapi", "starlette", "uvicorn", "sqlalchemy", "argon2-cffi")
        found = {name: importlib.metadata.version(name) for name in names}
        found["psycopg"] = importlib.metadata.version("psycopg")
        return found

    def settle(self, database: Database, work: Path) -> float:
        """Wait until the in-process worker has resolved every request and sent every mail."""
        runtime = self.runtime(database, work)
        started = time.perf_counter()
        try:
            while time.perf_counter() - started < SETTLE_TIMEOUT:
                with runtime.service.engine.connect() as connection:
                    pending = connection.scalar(
                        select(func.count())
                        .select_from(models.RecoveryRequest)
                        .where(models.RecoveryRequest.state == "pending")
                    )
                    unsent = connection.scalar(
                        select(func.count())
                        .select_from(models.OutboxMessage)
                        .where(models.OutboxMessage.state.in_(("pending", "leased", "retrying")))
                    )
                if not pending and not unsent:
                    break
                time.sleep(0.5)
            return time.perf_counter() - started
        finally:
            runtime.service.engine.dispose()


class SafeResetSeparateWorker(Safereset):
    """safereset with its worker in a second process: ``serve --no-worker`` and ``worker``.

    Only the request route is measured: it is the one whose work the worker
    does after the response.
    """

    name = "safereset_separate_worker"
    label = "safereset, separate worker"
    measured = ("request",)

    @contextlib.contextmanager
    def server(self, database: Database, work: Path) -> Iterator[Server]:
        port = free_port()
        environment = {**os.environ, **self.environment(database, work, port)}
        with (work / "safereset-worker.log").open("ab") as log:
            worker = subprocess.Popen(
                [str(SAFERESET_COMMAND), "worker"],
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            command = [str(SAFERESET_COMMAND), "serve", "--no-worker", "--port", str(port)]
            with running(command, environment, port, work / "safereset.log") as server:
                yield server
        finally:
            stop_process(worker)


class Peer(Application):
    """A peer application in ``benchmarks/peers/<name>``, with its own virtual environment."""

    interesting: tuple[str, ...] = ()

    @property
    def folder(self) -> Path:
        return PEERS / self.name

    @property
    def venv(self) -> Path:
        return VENVS / self.name

    def prepare(self) -> None:
        """Create the peer's virtual environment, again whenever its requirements change."""
        requirements = self.folder / "requirements.txt"
        digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
        marker = self.venv / "requirements.sha256"
        if marker.exists() and marker.read_text(encoding="ascii") == digest:
            return
        print(f"  installing {self.label} into {self.venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(self.venv)], check=True)
        pip = [str(self.venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, "-r", str(requirements)], check=True)
        marker.write_text(digest, encoding="ascii")

    def seed(self, database: Database, users: int, tokens: int, work: Path) -> list[HttpRequest]:
        out = work / f"{self.name}-completions.jsonl"
        command = [
            str(self.venv / "bin" / "python"),
            str(self.folder / "peer.py"),
            "seed",
            f"--database={database.url}",
            f"--users={users}",
            f"--tokens={tokens}",
            f"--password={PASSWORD}",
            f"--new-password={NEW_PASSWORD}",
            f"--out={out}",
        ]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise RuntimeError(f"{self.label} seed failed: {completed.stderr.strip()[-800:]}")
        lines = out.read_text(encoding="utf-8").splitlines()
        return [HttpRequest.from_json(line) for line in lines if line.strip()]

    @contextlib.contextmanager
    def server(self, database: Database, work: Path) -> Iterator[Server]:
        port = free_port()
        mail = work / f"{self.name}-mail"
        mail.mkdir(parents=True, exist_ok=True)
        environment = {"PEER_DATABASE_URL": database.url, "PEER_MAIL_DIR": str(mail)}
        command = [
            str(self.venv / "bin" / "uvicorn"),
            "app:app",
            f"--app-dir={self.folder}",
            "--host=127.0.0.1",
            f"--port={port}",
            "--no-access-log",
            "--log-level=warning",
        ]
        with running(command, environment, port, work / f"{self.name}.log") as server:
            yield server

    def versions(self) -> dict[str, str]:
        completed = subprocess.run(
            [str(self.venv / "bin" / "python"), "-m", "pip", "freeze"],
            capture_output=True,
            text=True,
            check=True,
        )
        found = {}
        for line in completed.stdout.splitlines():
            name, _, version = line.partition("==")
            if name.lower() in self.interesting:
                found[name.lower()] = version
        return found


class Django(Peer):
    name = "django_reset"
    label = "Django"
    success = Statuses(request=302, complete=302, login=302)
    routes = {  # noqa: RUF012  # read-only description for the report
        "request": "POST /password_reset/ (form)",
        "complete": "POST /reset/<uidb64>/set-password/ (form, session cookie)",
        "login": "POST /login/ (form)",
    }
    interesting = ("django", "uvicorn", "argon2-cffi", "psycopg", "psycopg-pool", "asgiref")

    def recovery_request(self, email: str) -> HttpRequest:
        return form_post("/password_reset/", f"email={quote(email)}")

    def login_request(self, email: str, password: str) -> HttpRequest:
        return form_post("/login/", f"username={quote(email)}&password={quote(password)}")


class FastapiUsers(Peer):
    name = "fastapi_users_reset"
    label = "fastapi-users"
    success = Statuses(request=202, complete=200, login=200)
    routes = {  # noqa: RUF012  # read-only description for the report
        "request": "POST /auth/forgot-password (JSON)",
        "complete": "POST /auth/reset-password (JSON)",
        "login": "POST /auth/jwt/login (form)",
    }
    interesting = (
        "fastapi-users",
        "fastapi-users-db-sqlalchemy",
        "fastapi",
        "starlette",
        "uvicorn",
        "sqlalchemy",
        "pwdlib",
        "argon2-cffi",
        "aiosqlite",
        "asyncpg",
        "pyjwt",
    )

    def recovery_request(self, email: str) -> HttpRequest:
        return json_post("/auth/forgot-password", {"email": email})

    def login_request(self, email: str, password: str) -> HttpRequest:
        return form_post("/auth/jwt/login", f"username={quote(email)}&password={quote(password)}")


PEER_APPLICATIONS: tuple[Application, ...] = (Django(), FastapiUsers())
# Each product once, for versions and routes in the report.
PRODUCTS: tuple[Application, ...] = (Safereset(), *PEER_APPLICATIONS)
APPLICATIONS: tuple[Application, ...] = (
    PRODUCTS[0],
    SafeResetSeparateWorker(),
    *PEER_APPLICATIONS,
)
