"""Restoring machines from rows and writing their transitions as compare-and-set.

A machine's journal records which state it entered and with what data. ``save``
turns that into one ``UPDATE ... WHERE id = :id AND version = :version``; when
another process changed the row first, no row matches and ``StaleRecord`` is
raised, so the caller's transaction rolls back and nothing is half-written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar, cast

from sqlalchemy import CursorResult, update
from sqlalchemy.orm import Session as DbSession

from safereset.machines import account, flow, outbox, request, session, ticket
from safereset.machines._base import HasJournal, MachineDefinition
from safereset.store import models


class StaleRecord(Exception):
    """Another process changed the record between our read and our write."""


class VersionedRow(Protocol):
    id: Any
    state: str
    version: int


InputsT = TypeVar("InputsT")
CoreT = TypeVar("CoreT", bound=HasJournal)
RowT = TypeVar("RowT", bound=VersionedRow)


@dataclass(frozen=True)
class Binding(Generic[InputsT, CoreT, RowT]):
    """The mapping of one machine's states and data onto the columns of one table."""

    machine: MachineDefinition[InputsT, CoreT]
    model: type[RowT]
    data_of: Callable[[RowT], object]
    columns_of: Callable[[object, datetime], dict[str, Any]]

    def restore(self, row: RowT, core: CoreT) -> InputsT:
        return self.machine.restore(core, row.state, self.data_of(row))

    def save(self, db: DbSession, row: RowT, core: CoreT, now: datetime) -> bool:
        """Write the state the machine ended in; return False when it entered none.

        The columns of every state entered on the way are applied in order, so
        a pass through one state (a lapsed lease through ``retrying``) leaves
        what only it records (the lease's error) beside the final state's data.
        """
        entered = core.journal.last
        if entered is None:
            return False
        values: dict[str, Any] = {}
        for step in core.journal.entries:
            values.update(self.columns_of(step.data, now))
        values["state"] = entered.state
        table: Any = self.model
        result = cast(
            CursorResult[object],
            db.execute(
                update(table)
                .where(table.id == row.id, table.version == row.version)
                .values(version=table.version + 1, **values)
                .execution_options(synchronize_session=False)
            ),
        )
        if result.rowcount != 1:
            raise StaleRecord(f"{self.machine.name} {row.id} changed concurrently")
        return True

    def initial_columns(self, core: CoreT, now: datetime) -> dict[str, Any]:
        """Columns for the insert that creates the record, from its first entered state."""
        entered = core.journal.last
        if entered is None:
            raise ValueError(f"the {self.machine.name} machine entered no state to insert")
        return {"state": entered.state, "version": 1, **self.columns_of(entered.data, now)}


def _ticket_data(row: models.Ticket) -> object:
    return ticket.Issued(row.expires_at) if row.state == "issued" else ticket.Ended()


def _ticket_columns(data: object, now: datetime) -> dict[str, Any]:
    match data:
        case ticket.Issued(expires_at):
            return {"expires_at": expires_at}
        case ticket.Ended():
            return {"ended_at": now}
    raise TypeError(f"unexpected ticket state data {data!r}")


def _session_data(row: models.Session) -> object:
    return session.Active(row.expires_at) if row.state == "active" else session.Ended()


def _session_columns(data: object, now: datetime) -> dict[str, Any]:
    match data:
        case session.Active(expires_at):
            return {"expires_at": expires_at}
        case session.Ended():
            return {"ended_at": now}
    raise TypeError(f"unexpected session state data {data!r}")


def _account_data(row: models.User) -> object:
    return account.Standing()


def _account_columns(data: object, now: datetime) -> dict[str, Any]:
    return {}


def _message_data(row: models.OutboxMessage) -> object:
    match row.state:
        case "pending":
            return outbox.Pending()
        case "leased":
            return outbox.Leased(row.worker or "", row.due_at, row.attempt)
        case "retrying":
            return outbox.Retrying(row.attempt, row.due_at, row.last_error or "")
        case "sent":
            return outbox.Sent()
        case "dead":
            return outbox.Dead(row.attempt, row.last_error or "")
    raise ValueError(f"outbox message {row.id} has unknown state {row.state!r}")


def _message_columns(data: object, now: datetime) -> dict[str, Any]:
    match data:
        case outbox.Pending():
            return {"due_at": now, "worker": None, "attempt": 0}
        case outbox.Leased(worker, until, attempt):
            return {"worker": worker, "due_at": until, "attempt": attempt}
        case outbox.Retrying(attempt, next_at, error):
            return {"worker": None, "due_at": next_at, "attempt": attempt, "last_error": error}
        case outbox.Sent():
            # The sealed token is needed only until delivery. A finished
            # message's due time is when it finished, not its lapsed lease.
            return {"worker": None, "sent_at": now, "sealed_secret": None, "due_at": now}
        case outbox.Dead(attempts, error):
            return {"worker": None, "attempt": attempts, "last_error": error, "due_at": now}
    raise TypeError(f"unexpected outbox state data {data!r}")


def _flow_data(row: models.Flow) -> object:
    if row.state == "open":
        return flow.Open(row.expires_at, row.attempts_left)
    return flow.Ended()


def _flow_columns(data: object, now: datetime) -> dict[str, Any]:
    match data:
        case flow.Open(expires_at, attempts_left):
            return {"expires_at": expires_at, "attempts_left": attempts_left}
        case flow.Ended():
            # A code is needed only while the flow is open.
            return {"ended_at": now, "code_digest": None}
    raise TypeError(f"unexpected flow state data {data!r}")


def _request_data(row: models.RecoveryRequest) -> object:
    match row.state:
        case "pending":
            return request.Pending()
        case "issued":
            return request.Issued()
        case "dropped":
            return request.Dropped(row.reason or "")
    raise ValueError(f"recovery request {row.id} has unknown state {row.state!r}")


def _request_columns(data: object, now: datetime) -> dict[str, Any]:
    match data:
        case request.Pending():
            return {}
        case request.Issued():
            return {"resolved_at": now, "address_key": None}
        case request.Dropped(reason):
            return {"resolved_at": now, "address_key": None, "reason": reason}
    raise TypeError(f"unexpected request state data {data!r}")


TICKETS = Binding(ticket.TICKET, models.Ticket, _ticket_data, _ticket_columns)
SESSIONS = Binding(session.SESSION, models.Session, _session_data, _session_columns)
ACCOUNTS = Binding(account.ACCOUNT, models.User, _account_data, _account_columns)
MESSAGES = Binding(outbox.MESSAGE, models.OutboxMessage, _message_data, _message_columns)
FLOWS = Binding(flow.FLOW, models.Flow, _flow_data, _flow_columns)
REQUESTS = Binding(request.REQUEST, models.RecoveryRequest, _request_data, _request_columns)
