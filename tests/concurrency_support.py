"""Helpers for the concurrency and multi-instance tests.

Races between threads and processes on one database, `safereset` commands as
subprocesses, and an SMTP server that takes a message and never confirms it.
Every process and server here listens on or talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import signal
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier as ProcessBarrier
from pathlib import Path
from typing import Any, TypeVar

from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session as DbSession

from safereset.errors import InvalidSession, InvalidToken
from safereset.passwords import Hasher
from safereset.runtime import Runtime, build
from safereset.settings import Settings
from safereset.store import models
from tests.e2e_support import HOST, STOP_TIMEOUT_SECONDS, Deployment, console_script, recovery_link
from tests.e2e_support import token_of as token_of_link

ResultT = TypeVar("ResultT")

# Upper bound for any one wait in these tests: a barrier, a thread, a child process.
WAIT_SECONDS = 60.0
SUCCESS = "success"


def cheap_hasher() -> Hasher:
    """Return Argon2id with the cheapest parameters, like the `cheap_hasher` fixture.

    Child processes cannot use fixtures, so they build their hasher with this.
    """
    return Hasher(PasswordHasher.from_parameters(CHEAPEST))


def build_cheap(settings: Settings) -> Runtime:
    """Build a runtime with its own engine and the cheapest hasher."""
    return build(settings, hasher=cheap_hasher())


def outcome_of(call: Callable[[], object]) -> str:
    """Run ``call`` and return "success" or the class name of the exception it raised.

    The name of an unexpected exception comes with its message, so a failing test shows it.
    """
    try:
        call()
    except (InvalidToken, InvalidSession) as error:
        return type(error).__name__
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return SUCCESS


def run_in_thread(coroutine: Callable[[], Coroutine[Any, Any, ResultT]]) -> ResultT:
    """Run a coroutine to completion with ``asyncio.run`` in a new thread.

    This works even where the calling thread already runs an event loop, in
    which ``asyncio.run`` raises RuntimeError.
    """
    results: list[ResultT] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(asyncio.run(coroutine()))
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(WAIT_SECONDS)
    if thread.is_alive():
        raise AssertionError(f"timed out after {WAIT_SECONDS} s waiting for the coroutine")
    if errors:
        raise errors[0]
    return results[0]


def deliver_due(runtime: Runtime) -> int:
    """Deliver the due mail with the runtime's own worker and return how many were sent."""
    return run_in_thread(runtime.worker().deliver_due)


def folder_messages(folder: Path) -> list[EmailMessage]:
    """Read every message that a FolderTransport wrote to ``folder``."""
    messages = []
    for path in sorted(folder.glob("*.eml")):
        message = message_from_bytes(path.read_bytes(), policy=policy.default)
        assert isinstance(message, EmailMessage)
        messages.append(message)
    return messages


def mailed_token(folder: Path, recipient: str) -> str:
    """Return the token of the one recovery mail in ``folder`` addressed to ``recipient``."""
    links = [
        recovery_link(message)
        for message in folder_messages(folder)
        if message["To"] == recipient and message["Subject"] == "Reset your password"
    ]
    assert len(links) == 1, f"expected one recovery mail to {recipient}, found {len(links)}"
    return token_of_link(links[0])


def outbox_rows(engine: Engine, kind: str | None = None) -> list[models.OutboxMessage]:
    query = select(models.OutboxMessage).order_by(models.OutboxMessage.created_at)
    if kind is not None:
        query = query.where(models.OutboxMessage.kind == kind)
    with DbSession(engine) as db:
        return list(db.scalars(query).all())


def ticket_states(engine: Engine) -> list[str]:
    with DbSession(engine) as db:
        return list(db.scalars(select(models.Ticket.state)).all())


def active_sessions(engine: Engine, user_id: int) -> int:
    with DbSession(engine) as db:
        rows = db.scalars(
            select(models.Session.id).where(
                models.Session.user_id == user_id, models.Session.state == "active"
            )
        ).all()
        return len(rows)


# Many threads in several processes presenting one token


def complete_in_threads(
    settings: Settings,
    token: str,
    passwords: list[str],
    start: ProcessBarrier,
    results: Queue[list[tuple[str, str]]],
) -> None:
    """Complete the recovery with ``token`` from one thread per password (in a child process).

    The threads wait for each other, then one of them waits at ``start`` for
    the other processes, and all go at once. Puts the (password, outcome)
    pairs on ``results``, or one pair with the error that stopped the set-up.
    """
    try:
        runtime = build_cheap(settings)
    except Exception as error:
        start.abort()  # the other processes stop waiting for this one
        results.put([("(set-up)", f"{type(error).__name__}: {error}")])
        return
    outcomes = ["did not finish"] * len(passwords)

    def wait_for_other_processes() -> None:
        start.wait(WAIT_SECONDS)

    ready = threading.Barrier(len(passwords), action=wait_for_other_processes, timeout=WAIT_SECONDS)

    def race(index: int) -> None:
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            outcomes[index] = "barrier broken"
            return
        outcomes[index] = outcome_of(
            lambda: runtime.service.complete_recovery(token, passwords[index])
        )

    threads = [threading.Thread(target=race, args=(index,)) for index in range(len(passwords))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + WAIT_SECONDS
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    results.put(list(zip(passwords, outcomes, strict=True)))
    runtime.service.engine.dispose()


def collect(
    results: Queue[list[tuple[str, str]]], processes: list[SpawnProcess]
) -> list[tuple[str, str]]:
    """Return the outcomes of every process, and fail as soon as one exits without them."""
    collected: list[tuple[str, str]] = []
    batches = 0
    deadline = time.monotonic() + WAIT_SECONDS
    while batches < len(processes):
        if time.monotonic() > deadline:
            missing = len(processes) - batches
            raise AssertionError(
                f"timed out after {WAIT_SECONDS} s: {missing} child process(es) sent no outcomes"
            )
        try:
            collected.extend(results.get(timeout=0.5))
            batches += 1
        except queue.Empty:
            exited = [p for p in processes if p.exitcode not in (None, 0)]
            if exited:
                codes = [p.exitcode for p in exited]
                raise AssertionError(
                    f"child process(es) exited with {codes} before sending outcomes"
                ) from None
    return collected


def end_processes(processes: Sequence[SpawnProcess]) -> None:
    """Wait up to STOP_TIMEOUT_SECONDS for child processes to exit, then end the rest.

    The rest get SIGTERM first, and SIGKILL when they still run after it.
    """
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(STOP_TIMEOUT_SECONDS)
        if process.is_alive():
            process.kill()
            process.join(STOP_TIMEOUT_SECONDS)


# `safereset` commands as subprocesses


@dataclass
class SharedDeployment(Deployment):
    """A deployment whose processes use one database that the test names."""

    database_url: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def environment(self) -> dict[str, str]:
        return {**super().environment(), "SAFERESET_DATABASE_URL": self.database_url, **self.extra}

    def on_port(self, port: int) -> SharedDeployment:
        return dataclasses.replace(self, port=port)

    def mailing_to(self, mail_url: str) -> SharedDeployment:
        return dataclasses.replace(self, mail_url=mail_url)


@dataclass
class CommandProcess:
    """One `safereset` subprocess whose output goes to a log file."""

    arguments: tuple[str, ...]
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait(self, timeout: float = WAIT_SECONDS) -> int:
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        """Kill the process with SIGKILL, so it cannot finish what it started."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=STOP_TIMEOUT_SECONDS)

    def stop(self) -> None:
        """Terminate the process, and kill it when it does not exit in time."""
        if self.process.poll() is not None:
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
class CommandLauncher:
    """The `safereset` subprocesses of one test, which the fixture stops at teardown."""

    log_folder: Path
    started: list[CommandProcess] = field(default_factory=list)

    def start(self, deployment: Deployment, *arguments: str) -> CommandProcess:
        log_path = self.log_folder / f"{arguments[0]}-{len(self.started) + 1}.log"
        # A file, not a pipe: a pipe that no one reads fills up and blocks the process.
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                [str(console_script()), *arguments],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                env=deployment.environment(),
            )
        command = CommandProcess(arguments, log_path, process)
        self.started.append(command)
        return command

    def stop_all(self) -> None:
        for command in self.started:
            command.stop()


# An SMTP server that stalls


class StallingSmtpServer:
    """An SMTP server on loopback that accepts a whole message and never replies to its end.

    A client waits for the reply until its own timeout. ``received`` is set
    once a message has arrived. The stall ends when the server stops.
    """

    def __init__(self) -> None:
        self.received = threading.Event()
        self.messages: list[bytes] = []
        self._release = threading.Event()
        owner = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                owner._converse(self.rfile, self.wfile)

        self._server = socketserver.ThreadingTCPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"smtp://{HOST}:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(STOP_TIMEOUT_SECONDS)

    def _converse(self, reader: Any, writer: Any) -> None:
        writer.write(b"220 stall.test ESMTP\r\n")
        while line := reader.readline():
            verb = line[:4].upper()
            if verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                return
            if verb != b"DATA":
                # EHLO, MAIL and RCPT get 250. The EHLO reply offers no STARTTLS.
                writer.write(b"250 stall.test\r\n")
                continue
            writer.write(b"354 go ahead\r\n")
            body = b""
            while (chunk := reader.readline()) and chunk != b".\r\n":
                body += chunk
            self.messages.append(body)
            self.received.set()
            self._release.wait(WAIT_SECONDS)
            return


def wait_until(condition: Callable[[], bool], timeout: float, description: str) -> None:
    """Poll ``condition`` every 20 ms until it returns True, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {description}")
        time.sleep(0.02)
