"""Fill a safereset database with many accounts and outstanding tickets, fast.

Going through the service would hash every password (about 0.1 s each) and
take hours for a million accounts. These inserts write the same rows the
service writes. The account and ticket columns come from the machines' own
first states, and every account gets the same Argon2id hash of one password.
Each outstanding ticket gets a random digest, as if its link were still in an
inbox.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, func, insert, select, text

from safereset.addresses import parse_address
from safereset.machines.account import AccountCore
from safereset.machines.ticket import TicketCore
from safereset.store import models
from safereset.store.records import ACCOUNTS, TICKETS

BATCH = 20_000
TICKET_TTL = timedelta(hours=24)


def email_of(index: int) -> str:
    return f"user{index}@bench.example"


def _batches(first: int, stop: int) -> Iterator[range]:
    for start in range(first, stop, BATCH):
        yield range(start, min(start + BATCH, stop))


def account_count(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(select(func.count()).select_from(models.User)) or 0)


def add_accounts(engine: Engine, total: int, password_hash: str) -> float:
    """Add accounts ``user{i}@bench.example`` until there are ``total``; return the seconds.

    Account i gets id i + 1, so callers can name accounts by index. Each new
    account also gets one outstanding ticket.
    """
    started = time.perf_counter()
    first = account_count(engine)
    now = datetime.now(UTC)
    account_core = AccountCore(user_id=0)
    ACCOUNTS.machine.create(account_core).open()
    account_columns = ACCOUNTS.initial_columns(account_core, now)
    ticket_core = TicketCore("template")
    TICKETS.machine.create(ticket_core).issue(now, TICKET_TTL)
    ticket_columns = TICKETS.initial_columns(ticket_core, now)
    # The lookup key is the folded address. Checking the shortcut below against
    # the real parser once keeps the bulk rows equal to what the service writes.
    if parse_address(email_of(first)).key != email_of(first):
        raise RuntimeError("the benchmark addresses no longer fold to themselves")

    for indexes in _batches(first, total):
        accounts = [
            {
                "id": index + 1,
                "email": email_of(index),
                "email_key": email_of(index),
                "password_hash": password_hash,
                "created_at": now,
                "password_changed_at": now,
                **account_columns,
            }
            for index in indexes
        ]
        tickets = [
            {
                "id": uuid.uuid4().hex,
                "user_id": index + 1,
                "digest": secrets.token_hex(32),
                "created_at": now,
                **ticket_columns,
            }
            for index in indexes
        ]
        with engine.begin() as connection:
            connection.execute(insert(models.User), accounts)
            connection.execute(insert(models.Ticket), tickets)

    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            # The ids above were given explicitly, so move the sequence past them.
            connection.execute(
                text("SELECT setval(pg_get_serial_sequence('users', 'id'), :last)"),
                {"last": max(total, 1)},
            )
    analyze(engine)
    return time.perf_counter() - started


def analyze(engine: Engine) -> None:
    """Refresh the planner's statistics, as autovacuum would after a bulk load."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("ANALYZE"))
    else:
        with engine.begin() as connection:
            connection.execute(text("ANALYZE"))


def count_rows(engine: Engine) -> dict[str, int]:
    """Count accounts and tickets still issued, for the report."""
    with engine.connect() as connection:
        accounts = connection.scalar(select(func.count()).select_from(models.User))
        outstanding = connection.scalar(
            select(func.count()).select_from(models.Ticket).where(models.Ticket.state == "issued")
        )
    return {"accounts": int(accounts or 0), "outstanding_tickets": int(outstanding or 0)}
