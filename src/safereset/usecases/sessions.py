"""Login sessions: log in, authenticate a bearer token, log out."""

from __future__ import annotations

import uuid

from sqlalchemy import select

from safereset import crypto
from safereset.addresses import parse_address
from safereset.errors import InvalidCredentials, InvalidSession
from safereset.logs import event
from safereset.machines._base import Verdict
from safereset.machines.account import AccountCore
from safereset.machines.session import SessionCore
from safereset.store import models
from safereset.store.records import ACCOUNTS, SESSIONS, StaleRecord
from safereset.usecases.base import SESSION_PURPOSE, ServiceBase, log
from safereset.usecases.users import UserView


class Sessions(ServiceBase):
    def log_in(self, email: str, password: str, client: str | None = None) -> str:
        """Check the password and open a session; return its bearer token.

        Counts against the login limits of the client and of the address,
        whether or not the address has an account. When every hashing slot
        is taken, raises ``HashingBusy`` before counting or querying.
        """
        try:
            address = parse_address(email)
        except ValueError:
            raise InvalidCredentials from None
        self.hash_gate.check_free()
        now = self.clock()
        with self._audit_refusals(client), self._transaction() as db, db.begin():
            self._throttle_client(db, "login_client", client, self.limits.login_per_client, now)
            self._throttle(db, "login_account", address.key, self.limits.login_per_account, now)
        with self._transaction() as db:
            user = db.scalar(select(models.User).where(models.User.email_key == address.key))
        stored_hash = user.password_hash if user else None
        # Verify even for an unknown user, so both cost one hash.
        if not self._verify(stored_hash, password) or user is None:
            log.info("login failed", extra={"ids": {"user_id": user.id if user else None}})
            raise InvalidCredentials

        token = crypto.new_token()
        with self._transaction() as db, db.begin():
            current = db.get(models.User, user.id, with_for_update=True)
            if current is None or current.password_hash != stored_hash:
                raise InvalidCredentials  # the password changed while we were checking
            if ACCOUNTS.restore(current, AccountCore(current.id)).log_in() is Verdict.REJECTED:
                event(log, "login refused: account disabled", user_id=current.id)
                raise InvalidCredentials
            if stored_hash is not None and self.hasher.needs_rehash(stored_hash):
                changed_at = current.password_changed_at or now
                self._set_password(db, current, self._hash(password), changed_at)
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
        return UserView.of(user)

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
