"""Use cases: one method each, composed from the machines, the store and the outbox.

Every method runs in one database transaction. A machine decides each step;
the store writes each decision as a compare-and-set; mail is queued in the
same transaction. An exception anywhere rolls back the whole transaction, so
a failed call leaves no trace beyond what it meant to record.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar, cast

from sqlalchemy import CursorResult, Engine, select, update
from sqlalchemy.orm import Session as DbSession

from safereset import crypto
from safereset.addresses import parse_address
from safereset.errors import (
    InvalidCredentials,
    InvalidSession,
    InvalidToken,
    UserExists,
    UserNotFound,
)
from safereset.logs import event
from safereset.machines._base import Verdict
from safereset.machines.account import AccountCore
from safereset.machines.session import SessionCore
from safereset.machines.ticket import TicketCore
from safereset.mail import outbox
from safereset.passwords import Hasher, check_policy
from safereset.store import models
from safereset.store.records import ACCOUNTS, SESSIONS, TICKETS, StaleRecord

log = logging.getLogger("safereset.service")

TokenRowT = TypeVar("TokenRowT", models.Ticket, models.Session)

TICKET_PURPOSE = "ticket"
SESSION_PURPOSE = "session"


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class UserView:
    user_id: int
    email: str
    state: str
    has_password: bool
    created_at: datetime


class Service:
    """The use cases of safereset, over one database."""

    def __init__(
        self,
        engine: Engine,
        keyring: crypto.Keyring,
        *,
        public_url: str,
        token_ttl: timedelta,
        session_ttl: timedelta,
        hasher: Hasher | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.engine = engine
        self.keyring = keyring
        self.public_url = public_url
        self.token_ttl = token_ttl
        self.session_ttl = session_ttl
        self.hasher = hasher or Hasher()
        self.clock = clock

    def _transaction(self) -> DbSession:
        return DbSession(self.engine, expire_on_commit=False)

    # Users (operator commands)

    def add_user(self, email: str, password: str | None = None) -> int:
        """Create an active account; without a password the user must recover first."""
        address = parse_address(email)
        password_hash = None
        if password is not None:
            check_policy(password, address.normalized)
            password_hash = self.hasher.hash(password)
        now = self.clock()
        with self._transaction() as db, db.begin():
            if db.scalar(select(models.User.id).where(models.User.email_key == address.key)):
                raise UserExists(f"an account for {address.normalized} exists already")
            core = AccountCore(user_id=0)
            ACCOUNTS.machine.create(core).open()
            user = models.User(
                email=address.normalized,
                email_key=address.key,
                password_hash=password_hash,
                created_at=now,
                password_changed_at=now if password_hash else None,
                **ACCOUNTS.initial_columns(core, now),
            )
            db.add(user)
            db.flush()
            event(log, "user added", user_id=user.id)
            return user.id

    def list_users(self) -> list[UserView]:
        with self._transaction() as db:
            rows = db.scalars(select(models.User).order_by(models.User.id)).all()
            return [
                UserView(
                    row.id, row.email, row.state, row.password_hash is not None, row.created_at
                )
                for row in rows
            ]

    def disable_user(self, email: str) -> None:
        """Disable an account and end its sessions and recovery tickets."""
        self._set_standing(email, disable=True)

    def enable_user(self, email: str) -> None:
        self._set_standing(email, disable=False)

    def _set_standing(self, email: str, *, disable: bool) -> None:
        address = parse_address(email)
        now = self.clock()
        with self._transaction() as db, db.begin():
            user = db.scalar(
                select(models.User).where(models.User.email_key == address.key).with_for_update()
            )
            if user is None:
                raise UserNotFound(f"no account for {address.normalized}")
            core = AccountCore(user.id)
            account = ACCOUNTS.restore(user, core)
            if disable:
                account.disable()
            else:
                account.enable()
            if ACCOUNTS.save(db, user, core, now):
                event(log, f"user {core.journal.entries[-1].state}", user_id=user.id)
            if disable:
                self._end_everything(db, user.id, now)

    # Recovery by link

    def request_recovery(self, email: str) -> None:
        """Mail a recovery link to the account's stored address, if there is an account.

        Returns the same way whether or not the address has an account, and
        raises only for an address that is not valid at all.
        """
        address = parse_address(email)
        now = self.clock()
        with self._transaction() as db, db.begin():
            # FOR UPDATE: concurrent requests for one user take turns, so the
            # newest ticket supersedes every other and one ticket stays usable.
            user = db.scalar(
                select(models.User).where(models.User.email_key == address.key).with_for_update()
            )
            if user is None:
                log.info("recovery requested for an address without an account")
                return
            if ACCOUNTS.restore(user, AccountCore(user.id)).request_recovery() is Verdict.REJECTED:
                event(log, "recovery refused: account disabled", user_id=user.id)
                return
            self._end_tickets(db, user.id, now, supersede=True)
            token = crypto.new_token()
            ticket_id = self._issue_ticket(db, user.id, token, now)
            outbox.queue(
                db,
                self.keyring,
                kind="recovery_link",
                recipient=user.email,
                user_id=user.id,
                values={"ttl_minutes": int(self.token_ttl.total_seconds() // 60)},
                secret=token,
                now=now,
            )
            event(log, "ticket issued", user_id=user.id, ticket_id=ticket_id)

    def _issue_ticket(self, db: DbSession, user_id: int, token: str, now: datetime) -> str:
        ticket_id = uuid.uuid4().hex
        core = TicketCore(ticket_id)
        TICKETS.machine.create(core).issue(now, self.token_ttl)
        db.add(
            models.Ticket(
                id=ticket_id,
                user_id=user_id,
                digest=self.keyring.digest(TICKET_PURPOSE, token),
                created_at=now,
                **TICKETS.initial_columns(core, now),
            )
        )
        return ticket_id

    def check_ticket(self, token: str) -> None:
        """Raise ``InvalidToken`` unless the token could complete a reset now.

        Does not use the ticket: this backs the page that a mail link opens.
        """
        self._peek_ticket(token)

    def _peek_ticket(self, token: str) -> str:
        """Check a ticket without using it; return its owner's stored address."""
        now = self.clock()
        with self._transaction() as db, db.begin():
            row = self._find(db, models.Ticket, TICKET_PURPOSE, token)
            if row is None:
                raise InvalidToken
            core = TicketCore(row.id)
            verdict = TICKETS.restore(row, core).peek(now)
            TICKETS.save(db, row, core, now)
            user = db.get(models.User, row.user_id)
        if verdict is Verdict.REJECTED or user is None:
            raise InvalidToken
        return user.email

    def complete_recovery(self, token: str, password: str) -> None:
        """Set a new password with a recovery token.

        Redeems the ticket, ends every other ticket and every session of the
        user, and queues a notice. Raises ``InvalidToken`` for any unusable
        token and ``PasswordRejected`` for a password that fails the policy,
        in which case the ticket stays usable.
        """
        # Check token and policy first, so the slow hash happens outside the
        # write transaction and only for a token that works.
        email = self._peek_ticket(token)
        check_policy(password, email)
        password_hash = self.hasher.hash(password)

        now = self.clock()
        rejected = False
        with self._transaction() as db, db.begin():
            found = self._find(db, models.Ticket, TICKET_PURPOSE, token)
            if found is None:
                raise InvalidToken
            # Lock the user before the ticket: every use case locks in the
            # order user, tickets, sessions, so none waits on another in a cycle.
            user = db.get(models.User, found.user_id, with_for_update=True)
            row = self._find(db, models.Ticket, TICKET_PURPOSE, token, lock=True)
            if user is None or row is None:
                raise InvalidToken
            core = TicketCore(row.id)
            if ACCOUNTS.restore(user, AccountCore(user.id)).reset_password() is Verdict.REJECTED:
                rejected = True
            elif TICKETS.restore(row, core).redeem(now) is Verdict.REJECTED:
                rejected = True
                TICKETS.save(db, row, core, now)  # an expiry is recorded and committed
            else:
                try:
                    TICKETS.save(db, row, core, now)
                except StaleRecord:
                    raise InvalidToken from None
                self._set_password(db, user, password_hash, now)
                self._end_everything(db, user.id, now)
                outbox.queue(
                    db,
                    self.keyring,
                    kind="password_changed",
                    recipient=user.email,
                    user_id=user.id,
                    values={
                        "changed_at": now.strftime("%Y-%m-%d %H:%M"),
                        "forgot_url": f"{self.public_url}/forgot",
                    },
                    now=now,
                )
                event(log, "ticket redeemed", user_id=user.id, ticket_id=row.id)
        if rejected:
            event(log, "ticket rejected", ticket_id=row.id)
            raise InvalidToken

    def _set_password(
        self, db: DbSession, user: models.User, password_hash: str, now: datetime
    ) -> None:
        result = cast(
            CursorResult[object],
            db.execute(
                update(models.User)
                .where(models.User.id == user.id, models.User.version == user.version)
                .values(
                    password_hash=password_hash, password_changed_at=now, version=user.version + 1
                )
                .execution_options(synchronize_session=False)
            ),
        )
        if result.rowcount != 1:
            raise StaleRecord(f"user {user.id} changed concurrently")

    def _end_everything(self, db: DbSession, user_id: int, now: datetime) -> None:
        """Revoke every usable ticket and every active session of a user."""
        self._end_tickets(db, user_id, now, supersede=False)
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

    def _end_tickets(self, db: DbSession, user_id: int, now: datetime, *, supersede: bool) -> None:
        rows = db.scalars(
            select(models.Ticket)
            .where(models.Ticket.user_id == user_id, models.Ticket.state == "issued")
            .with_for_update()
        ).all()
        for row in rows:
            core = TicketCore(row.id)
            ticket = TICKETS.restore(row, core)
            if supersede:
                ticket.supersede()
            else:
                ticket.revoke()
            TICKETS.save(db, row, core, now)
            event(
                log, f"ticket {core.journal.entries[-1].state}", user_id=user_id, ticket_id=row.id
            )

    # Sessions

    def log_in(self, email: str, password: str) -> str:
        """Check the password and open a session; return its bearer token."""
        try:
            address = parse_address(email)
        except ValueError:
            raise InvalidCredentials from None
        with self._transaction() as db:
            user = db.scalar(select(models.User).where(models.User.email_key == address.key))
        stored_hash = user.password_hash if user else None
        # Verify even for an unknown user, so both cost one hash.
        if not self.hasher.verify(stored_hash, password) or user is None:
            log.info("login failed", extra={"ids": {"user_id": user.id if user else None}})
            raise InvalidCredentials
        now = self.clock()
        token = crypto.new_token()
        with self._transaction() as db, db.begin():
            current = db.get(models.User, user.id, with_for_update=True)
            if current is None or current.password_hash != stored_hash:
                raise InvalidCredentials  # the password changed while we were checking
            if ACCOUNTS.restore(current, AccountCore(current.id)).log_in() is Verdict.REJECTED:
                event(log, "login refused: account disabled", user_id=current.id)
                raise InvalidCredentials
            if stored_hash is not None and self.hasher.needs_rehash(stored_hash):
                self._set_password(
                    db, current, self.hasher.hash(password), current.password_changed_at or now
                )
            session_id = uuid.uuid4().hex
            core = SessionCore(session_id)
            SESSIONS.machine.create(core).open(now, self.session_ttl)
            db.add(
                models.Session(
                    id=session_id,
                    user_id=current.id,
                    digest=self.keyring.digest(SESSION_PURPOSE, token),
                    created_at=now,
                    **SESSIONS.initial_columns(core, now),
                )
            )
            event(log, "session opened", user_id=current.id, session_id=session_id)
        return token

    def authenticate(self, token: str) -> UserView:
        """Return the user behind a session token, or raise ``InvalidSession``."""
        now = self.clock()
        with self._transaction() as db, db.begin():
            row = self._find(db, models.Session, SESSION_PURPOSE, token)
            if row is None:
                raise InvalidSession
            core = SessionCore(row.id)
            verdict = SESSIONS.restore(row, core).authenticate(now)
            SESSIONS.save(db, row, core, now)
            user = db.get(models.User, row.user_id)
        if verdict is Verdict.REJECTED or user is None:
            raise InvalidSession
        return UserView(
            user.id, user.email, user.state, user.password_hash is not None, user.created_at
        )

    def log_out(self, token: str) -> None:
        """Revoke a session; raise ``InvalidSession`` if it was not usable."""
        self.authenticate(token)
        now = self.clock()
        with self._transaction() as db, db.begin():
            row = self._find(db, models.Session, SESSION_PURPOSE, token, lock=True)
            if row is None:
                raise InvalidSession
            core = SessionCore(row.id)
            SESSIONS.restore(row, core).revoke()
            try:
                changed = SESSIONS.save(db, row, core, now)
            except StaleRecord:
                raise InvalidSession from None
            if not changed:
                raise InvalidSession
            event(log, "session revoked", user_id=row.user_id, session_id=row.id)

    # Shared lookups

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
