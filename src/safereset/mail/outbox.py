"""The transactional outbox: queueing mail with a change, leasing it for delivery.

``queue`` runs inside the caller's transaction, so the mail is committed with
the state change that causes it or not at all. Workers lease due messages one
at a time. Each lease is a transition of the message machine, written as a
compare-and-set, so two workers never hold the same message at once.
"""

from __future__ import annotations

import json
import logging
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from automat import NoTransition
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session as DbSession

from safereset.crypto import Keyring
from safereset.logs import event
from safereset.machines._base import Verdict
from safereset.machines.outbox import MessageCore, RetryPolicy
from safereset.store import models
from safereset.store.records import MESSAGES, StaleRecord

log = logging.getLogger("safereset.outbox")

SEAL_PURPOSE = "outbox"
# How long a worker may hold a message before another may take it over. It
# must outlast one delivery attempt (the SMTP timeout is 30 s).
DEFAULT_LEASE = timedelta(seconds=120)
# How many due messages one lease call may find unleasable (each then dies)
# before it returns and lets the worker poll again.
LEASE_CANDIDATES = 20


@dataclass(frozen=True)
class LeasedMail:
    """A message this worker holds, with what is needed to compose it."""

    message_id: str
    version: int
    kind: str
    recipient: str
    values: dict[str, Any]
    secret: str | None
    attempt: int


@dataclass(frozen=True)
class MessageView:
    """An outbox message as operators see it: no recipient, no secret."""

    message_id: str
    kind: str
    state: str
    attempt: int
    user_id: int | None
    created_at: datetime
    due_at: datetime
    last_error: str | None


def queue(
    db: DbSession,
    keyring: Keyring,
    *,
    kind: str,
    recipient: str,
    user_id: int | None,
    values: dict[str, Any],
    now: datetime,
    secret: str | None = None,
) -> str:
    """Add a message to the outbox in the caller's transaction; return its id."""
    message_id = uuid.uuid4().hex
    core = MessageCore(message_id)
    MESSAGES.machine.create(core).queue()
    sealed = keyring.seal(SEAL_PURPOSE, secret, message_id) if secret is not None else None
    db.add(
        models.OutboxMessage(
            id=message_id,
            kind=kind,
            user_id=user_id,
            recipient=recipient,
            context=json.dumps(values),
            sealed_secret=sealed,
            created_at=now,
            **MESSAGES.initial_columns(core, now),
        )
    )
    event(log, "mail queued", message_id=message_id, kind=kind, user_id=user_id)
    return message_id


class Outbox:
    """Leasing and settling messages for delivery workers."""

    def __init__(
        self,
        engine: Engine,
        keyring: Keyring,
        clock: Callable[[], datetime],
        policy: RetryPolicy | None = None,
        lease: timedelta = DEFAULT_LEASE,
    ) -> None:
        self._engine = engine
        self._lease = lease
        self._keyring = keyring
        self._clock = clock
        self._policy = policy or RetryPolicy()

    def now(self) -> datetime:
        return self._clock()

    def lease_next(self, worker: str) -> LeasedMail | None:
        """Lease one due message for ``worker``, or return None when none is due.

        Each round locks one due row with ``FOR UPDATE SKIP LOCKED`` (on
        PostgreSQL; SQLite serialises writers instead), so concurrent workers
        take different messages without waiting for each other.
        """
        for _ in range(LEASE_CANDIDATES):
            now = self._clock()
            with DbSession(self._engine) as db, db.begin():
                row = db.scalar(
                    select(models.OutboxMessage)
                    .where(
                        models.OutboxMessage.state.in_(("pending", "retrying", "leased")),
                        models.OutboxMessage.due_at <= now,
                    )
                    .order_by(models.OutboxMessage.due_at)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                )
                if row is None:
                    return None
                core = MessageCore(row.id, self._policy)
                verdict = MESSAGES.restore(row, core).lease(worker, now, now + self._lease)
                MESSAGES.save(db, row, core, now)
                if verdict is Verdict.ACCEPTED:
                    event(log, "mail leased", message_id=row.id, worker=worker)
                    return self._leased(row, row.version + 1, core)
                if core.journal.last is not None:
                    event(log, "mail dead", message_id=row.id, state=core.journal.last.state)
        return None

    def _leased(self, row: models.OutboxMessage, version: int, core: MessageCore) -> LeasedMail:
        entered = core.journal.last
        assert entered is not None  # an accepted lease always enters "leased"
        secret = None
        if row.sealed_secret is not None:
            secret = self._keyring.unseal(SEAL_PURPOSE, row.sealed_secret, row.id)
        return LeasedMail(
            message_id=row.id,
            version=version,
            kind=row.kind,
            recipient=row.recipient,
            values=json.loads(row.context),
            secret=secret,
            attempt=entered.data.attempt,
        )

    def delivered(self, mail: LeasedMail) -> bool:
        """Record a delivery; False when the lease was lost to another worker first."""
        return self._settle(mail, lambda machine, now: machine.delivered(), "mail sent")

    def failed(self, mail: LeasedMail, error: str) -> bool:
        """Record a failed attempt; the machine schedules a retry or gives up."""
        jitter = secrets.SystemRandom().random()
        return self._settle(
            mail, lambda machine, now: machine.failed(now, jitter, error), "mail attempt failed"
        )

    def _settle(self, mail: LeasedMail, feed: Callable[[Any, datetime], None], what: str) -> bool:
        now = self._clock()
        with DbSession(self._engine) as db, db.begin():
            row = db.get(models.OutboxMessage, mail.message_id, with_for_update=True)
            if row is None or row.version != mail.version:
                log.warning(
                    "lease lost before the delivery report",
                    extra={"ids": {"message_id": mail.message_id}},
                )
                return False
            core = MessageCore(row.id, self._policy)
            feed(MESSAGES.restore(row, core), now)
            try:
                MESSAGES.save(db, row, core, now)
            except StaleRecord:
                return False
        state = core.journal.last.state if core.journal.last else row.state
        event(log, what, message_id=mail.message_id, attempt=mail.attempt, state=state)
        return True

    def list_messages(self, *, dead_only: bool = False, limit: int = 100) -> list[MessageView]:
        """Return the newest messages first, without their sealed secrets."""
        query = select(models.OutboxMessage).order_by(models.OutboxMessage.created_at.desc())
        if dead_only:
            query = query.where(models.OutboxMessage.state == "dead")
        with DbSession(self._engine) as db:
            return [
                MessageView(
                    row.id,
                    row.kind,
                    row.state,
                    row.attempt,
                    row.user_id,
                    row.created_at,
                    row.due_at,
                    row.last_error,
                )
                for row in db.scalars(query.limit(limit))
            ]

    def requeue(self, message_id: str) -> None:
        """Start a dead message over.

        Raises ``LookupError`` for an unknown id and ``ValueError`` when the
        message machine rejects the requeue (the message is not dead).
        """
        now = self._clock()
        with DbSession(self._engine) as db, db.begin():
            row = db.get(models.OutboxMessage, message_id, with_for_update=True)
            if row is None:
                raise LookupError(f"no outbox message {message_id}")
            core = MessageCore(row.id, self._policy)
            try:
                MESSAGES.restore(row, core).requeue()
            except NoTransition:
                raise ValueError(
                    f"outbox message {message_id} is {row.state}; only dead messages can be retried"
                ) from None
            MESSAGES.save(db, row, core, now)
        event(log, "mail requeued", message_id=message_id)
