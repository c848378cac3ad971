"""Races on one database, on SQLite and on PostgreSQL.

Each racer has its own engine, as separate instances of the service would.
A barrier releases the racers together, and every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.context import SpawnProcess
from pathlib import Path

import pytest

from safereset.errors import InvalidCredentials, InvalidSession
from safereset.mail.worker import Worker
from safereset.runtime import Runtime
from safereset.settings import Settings
from safereset.store.db import migrate
from tests.concurrency_support import (
    SUCCESS,
    WAIT_SECONDS,
    active_sessions,
    build_cheap,
    collect,
    complete_in_threads,
    deliver_due,
    end_processes,
    mailed_token,
    outbox_rows,
    outcome_of,
    ticket_states,
)
from tests.conftest import FakeClock, Mailbox, make_settings

EMAIL = "racer@example.com"
OLD_PASSWORD = "old password 0"
PROCESSES = 4
THREADS = 25
ROUNDS = 20
WORKERS = 4


@pytest.fixture
def runtimes() -> Iterator[Callable[[Settings], Runtime]]:
    """Build runtimes, each with its own engine, and dispose of the engines at teardown."""
    built: list[Runtime] = []

    def make(settings: Settings) -> Runtime:
        runtime = build_cheap(settings)
        built.append(runtime)
        return runtime

    yield make
    for runtime in built:
        runtime.service.engine.dispose()


@pytest.fixture
def children() -> Iterator[list[SpawnProcess]]:
    """Collect the child processes that the test starts, and end those still running at teardown."""
    started: list[SpawnProcess] = []
    yield started
    end_processes(started)


@pytest.mark.threat("T03")
@pytest.mark.e2e
def test_same_token_many_processes(
    database_url: str,
    tmp_path: Path,
    runtimes: Callable[[Settings], Runtime],
    children: list[SpawnProcess],
) -> None:
    # Every thread hashes its password at once; the hashing gate would turn
    # most away with 503, and this test is about the token race alone.
    settings = make_settings(tmp_path, database_url=database_url, max_concurrent_hashes=1024)
    runtime = runtimes(settings)
    migrate(runtime.service.engine)
    runtime.service.add_user(EMAIL, OLD_PASSWORD)
    runtime.service.request_recovery(EMAIL)
    assert deliver_due(runtime) == 1
    token = mailed_token(tmp_path / "mail", EMAIL)

    context = multiprocessing.get_context("spawn")
    start = context.Barrier(PROCESSES, timeout=WAIT_SECONDS)
    results = context.Queue()
    for number in range(PROCESSES):
        passwords = [f"new password {number}-{thread}" for thread in range(THREADS)]
        child = context.Process(
            target=complete_in_threads,
            args=(settings, token, passwords, start, results),
            daemon=True,
        )
        child.start()
        children.append(child)
    outcomes = dict(collect(results, children))

    assert len(outcomes) == PROCESSES * THREADS
    assert Counter(outcomes.values()) == {SUCCESS: 1, "InvalidToken": PROCESSES * THREADS - 1}
    [winner] = [password for password, outcome in outcomes.items() if outcome == SUCCESS]
    loser = next(password for password in outcomes if password != winner)
    runtime.service.log_in(EMAIL, winner)
    with pytest.raises(InvalidCredentials):
        runtime.service.log_in(EMAIL, loser)
    assert ticket_states(runtime.service.engine) == ["redeemed"]
    assert len(outbox_rows(runtime.service.engine, "password_changed")) == 1


def race(start: threading.Barrier, call: Callable[..., object], *arguments: object) -> str:
    """Wait at ``start`` with the other racers, then call and name the outcome."""
    start.wait()
    return outcome_of(lambda: call(*arguments))


@pytest.mark.threat("T03")
def test_logout_races_reset(
    database_url: str, tmp_path: Path, runtimes: Callable[[Settings], Runtime]
) -> None:
    settings = make_settings(tmp_path, database_url=database_url)
    resetting = runtimes(settings)
    logging_out = runtimes(settings)
    engine = resetting.service.engine
    migrate(engine)
    start = threading.Barrier(2, timeout=WAIT_SECONDS)

    with ThreadPoolExecutor(2) as pool:
        for number in range(ROUNDS):
            email = f"user{number}@example.com"
            new_password = f"new password {number}"
            user_id = resetting.service.add_user(email, OLD_PASSWORD)
            session = resetting.service.log_in(email, OLD_PASSWORD)
            resetting.service.request_recovery(email)
            deliver_due(resetting)
            token = mailed_token(tmp_path / "mail", email)

            logout = pool.submit(race, start, logging_out.service.log_out, session)
            reset = pool.submit(
                race, start, resetting.service.complete_recovery, token, new_password
            )

            assert reset.result(WAIT_SECONDS) == SUCCESS, f"round {number}"
            assert logout.result(WAIT_SECONDS) in (SUCCESS, "InvalidSession"), f"round {number}"
            assert active_sessions(engine, user_id) == 0, f"round {number}"
            with pytest.raises(InvalidSession):
                resetting.service.authenticate(session)
            resetting.service.log_in(email, new_password)
            notices = [
                row for row in outbox_rows(engine, "password_changed") if row.user_id == user_id
            ]
            assert len(notices) == 1, f"round {number}"


def deliver_after(start: threading.Barrier, worker: Worker) -> int:
    """Wait at ``start`` with the other workers, then deliver what is due."""
    start.wait()
    return asyncio.run(worker.deliver_due())


@pytest.mark.e2e
@pytest.mark.parametrize("mails", [1, 20])
def test_racing_workers_send_each_mail_once(
    database_url: str,
    tmp_path: Path,
    runtimes: Callable[[Settings], Runtime],
    smtp_server: Mailbox,
    mails: int,
) -> None:
    settings = make_settings(tmp_path, database_url=database_url, mail_url=smtp_server.url)
    setup = runtimes(settings)
    migrate(setup.service.engine)
    for number in range(mails):
        email = f"user{number}@example.com"
        setup.service.add_user(email)
        setup.service.request_recovery(email)
    workers = [runtimes(settings).worker() for _ in range(WORKERS)]
    start = threading.Barrier(WORKERS, timeout=WAIT_SECONDS)

    with ThreadPoolExecutor(WORKERS) as pool:
        running = [pool.submit(deliver_after, start, worker) for worker in workers]
        sent = [future.result(WAIT_SECONDS) for future in running]

    rows = outbox_rows(setup.service.engine)
    queued = {f"<{row.id}@reset.example.test>" for row in rows}
    arrived = Counter(str(message["Message-ID"]) for message in smtp_server.messages)
    assert [message_id for message_id, count in arrived.items() if count > 1] == []
    assert set(arrived) == queued
    assert sum(sent) == mails
    assert {row.state for row in rows} == {"sent"}
    assert {row.attempt for row in rows} == {1}


def test_takeover_records_lost_lease(runtime: Runtime, clock: FakeClock) -> None:
    runtime.service.add_user(EMAIL)
    runtime.service.request_recovery(EMAIL)
    runtime.service.process_recovery_requests()
    assert runtime.outbox.lease_next("crashed-worker") is not None
    clock.advance(seconds=runtime.settings.mail_lease_seconds)

    second_lease = runtime.outbox.lease_next("second-worker")

    assert second_lease is not None
    assert second_lease.attempt == 2
    [view] = runtime.outbox.list_messages()
    assert "crashed-worker" in (view.last_error or "")
