"""The base of every use case: configuration, transactions, lookups, revocation.

Every use case runs in database transactions. A machine decides each step;
the store writes each decision as a compare-and-set; mail is queued in the
same transaction. An exception anywhere rolls back the whole transaction, so
a failed call leaves no trace beyond what it meant to record.

Locks are always taken in the order user, tickets, flows, sessions, so that no
two use cases wait on each other in a cycle.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar, cast

from sqlalchemy import CursorResult, Engine, select, update
from sqlalchemy.orm import Session as DbSession

from safereset import audit, crypto, throttle
from safereset.logs import event
from safereset.machines._base import HasJournal
from safereset.machines.flow import FlowCore
from safereset.machines.session import SessionCore
from safereset.machines.ticket import TicketCore
from safereset.passwords import Hasher, HashGate
from safereset.store import models
from safereset.store.records import FLOWS, SESSIONS, TICKETS, Binding, StaleRecord

log = logging.getLogger("safereset.service")

TokenRowT = TypeVar("TokenRowT", models.Ticket, models.Session)

TICKET_PURPOSE = "ticket"
SESSION_PURPOSE = "session"
CODE_PURPOSE = "code"
CLIENT_PURPOSE = "client"
# Recorded for requests that came with no client address (library calls).
NO_CLIENT = "none"
# Requests that may wait for a busy hashing slot, per slot, unless configured.
# Four keep the wait near half a second at about 0.1 s per hash.
WAITING_PER_SLOT = 4


def client_network(client: str | None) -> str | None:
    """Return the key of a client address: the address, or its /64 for IPv6."""
    if client is None:
        return None
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client  # not an IP address, for example a test client's name
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def utc_now() -> datetime:
    return datetime.now(UTC)


class ServiceBase:
    """Configuration and helpers of the use cases, over one database."""

    def __init__(
        self,
        engine: Engine,
        keyring: crypto.Keyring,
        *,
        public_url: str,
        token_ttl: timedelta,
        session_ttl: timedelta,
        code_ttl: timedelta = timedelta(minutes=10),
        limits: throttle.Limits | None = None,
        hasher: Hasher | None = None,
        hashing_slots: int | None = None,
        hashing_queue: int | None = None,
        hashing_wait: float = 2.0,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.engine = engine
        self.keyring = keyring
        self.public_url = public_url
        self.token_ttl = token_ttl
        self.session_ttl = session_ttl
        self.code_ttl = code_ttl
        self.limits = limits or throttle.Limits()
        self.hasher = hasher or Hasher()
        slots = hashing_slots or os.cpu_count() or 1
        waiting = WAITING_PER_SLOT * slots if hashing_queue is None else hashing_queue
        self.hash_gate = HashGate(slots, waiting, hashing_wait)
        self.clock = clock

    def _transaction(self) -> DbSession:
        return DbSession(self.engine, expire_on_commit=False)

    def _throttle(
        self, db: DbSession, scope: str, key: str | None, rate: throttle.Rate, now: datetime
    ) -> None:
        """Count one event; a per-client scope without a client address is not counted.

        Library callers that pass no client address would otherwise share one
        bucket, and the first busy minute would lock every user out.
        """
        if key is None:
            return
        throttle.check(db, self.keyring, scope, key, rate, now)

    def _throttle_client(
        self, db: DbSession, scope: str, client: str | None, rate: throttle.Rate, now: datetime
    ) -> None:
        """Count one event of a client address; IPv6 clients count per /64 network.

        One IPv6 host is usually given a whole /64 and could change its address
        for every request, so a single address would be no limit at all.
        """
        self._throttle(db, scope, client_network(client), rate, now)

    @contextlib.contextmanager
    def _audit_refusals(
        self,
        client: str | None,
        refused: type[Exception] | None = None,
        detail: str = "",
        subject: str | None = None,
    ) -> Iterator[None]:
        """Record a rate-limit refusal, or a ``refused`` error, once its transaction is over.

        Use it outside the ``with`` block of the transaction that raises: that
        transaction rolls back, and on SQLite a second writer would wait for it.
        """
        try:
            yield
        except throttle.RateLimited as error:
            self._audit_alone(
                "throttled", subject=error.scope, client=client, detail=f"key {error.key_digest}"
            )
            raise
        except Exception as error:
            if refused is None or not isinstance(error, refused):
                raise
            self._audit_alone(
                "reset_rejected",
                user_id=self._flow_owner(subject),
                subject=subject,
                client=client,
                detail=detail,
            )
            raise

    def _flow_owner(self, flow_id: str | None) -> int | None:
        """Return the account a code flow belongs to, so rejected codes show under it."""
        if flow_id is None:
            return None
        with self._transaction() as db:
            flow = db.get(models.Flow, flow_id)
            return flow.user_id if flow is not None else None

    def _audit_alone(self, event_name: str, **fields: Any) -> None:
        with self._transaction() as db, db.begin():
            audit.record(db, event_name, self.clock(), **fields)

    def _hash(self, password: str) -> str:
        with self.hash_gate.slot():
            return self.hasher.hash(password)

    def _verify(self, stored_hash: str | None, password: str) -> bool:
        with self.hash_gate.slot():
            return self.hasher.verify(stored_hash, password)

    def _find(
        self, db: DbSession, model: type[TokenRowT], purpose: str, token: str, *, lock: bool = False
    ) -> TokenRowT | None:
        """Find a record by the digest of its token; a malformed token finds nothing."""
        if not crypto.is_well_formed(token):
            return None
        query = select(model).where(model.digest.in_(self.keyring.digests(purpose, token)))
        if lock:
            query = query.with_for_update()
        return db.scalar(query)

    def _set_password(
        self, db: DbSession, user: models.User, password_hash: str, changed_at: datetime
    ) -> None:
        result = cast(
            CursorResult[object],
            db.execute(
                update(models.User)
                .where(models.User.id == user.id, models.User.version == user.version)
                .values(
                    password_hash=password_hash,
                    password_changed_at=changed_at,
                    version=user.version + 1,
                )
                .execution_options(synchronize_session=False)
            ),
        )
        if result.rowcount != 1:
            raise StaleRecord(f"user {user.id} changed concurrently")

    def _end_everything(self, db: DbSession, user_id: int, now: datetime) -> None:
        """Revoke every usable ticket and flow and every active session of a user."""
        self._end_credentials(db, user_id, now, supersede=False)
        sessions = db.scalars(
            select(models.Session)
            .where(models.Session.user_id == user_id, models.Session.state == "active")
            .with_for_update()
        ).all()
        for row in sessions:
            core = SessionCore(row.id)
            SESSIONS.restore(row, core).revoke()
            SESSIONS.save(db, row, core, now)
        if sessions:
            event(log, "sessions revoked", user_id=user_id, count=len(sessions))
            audit.record(
                db, "sessions_revoked", now, user_id=user_id, detail=f"{len(sessions)} session(s)"
            )

    def _end_credentials(
        self, db: DbSession, user_id: int, now: datetime, *, supersede: bool
    ) -> None:
        """Supersede or revoke the user's open tickets and code flows."""
        self._end_open(db, TICKETS, models.Ticket, "issued", TicketCore, user_id, now, supersede)
        self._end_open(db, FLOWS, models.Flow, "open", FlowCore, user_id, now, supersede)

    def _end_open(
        self,
        db: DbSession,
        binding: Binding[Any, Any, Any],
        model: type[models.Ticket] | type[models.Flow],
        open_state: str,
        make_core: Callable[[str], HasJournal],
        user_id: int,
        now: datetime,
        supersede: bool,
    ) -> None:
        # The state filter only narrows the query to rows that can still change;
        # the machine decides, and ended rows would ignore the input anyway.
        query = (
            select(model)
            .where(model.user_id == user_id, model.state == open_state)
            .with_for_update()
        )
        rows = cast(Sequence[models.Ticket | models.Flow], db.scalars(query).all())
        for row in rows:
            core = make_core(row.id)
            credential: Revocable = binding.restore(row, core)
            if supersede:
                credential.supersede()
            else:
                credential.revoke()
            binding.save(db, row, core, now)
            name = binding.machine.name
            event(
                log,
                f"{name} {core.journal.entries[-1].state}",
                user_id=user_id,
                **{f"{name}_id": row.id},
            )


class Revocable(Protocol):
    """A ticket or a code flow: a newer request or a password change ends it."""

    def supersede(self) -> None: ...

    def revoke(self) -> None: ...
