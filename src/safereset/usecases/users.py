"""Operator use cases: adding, listing, disabling and enabling accounts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from safereset import audit
from safereset.addresses import parse_address
from safereset.errors import UserExists, UserNotFound
from safereset.logs import event
from safereset.machines.account import AccountCore
from safereset.passwords import check_policy
from safereset.store import models
from safereset.store.records import ACCOUNTS
from safereset.usecases.base import ServiceBase, log


@dataclass(frozen=True)
class UserView:
    user_id: int
    email: str
    state: str
    has_password: bool
    created_at: datetime

    @classmethod
    def of(cls, row: models.User) -> UserView:
        return cls(row.id, row.email, row.state, row.password_hash is not None, row.created_at)


class UserAdmin(ServiceBase):
    def add_user(self, email: str, password: str | None = None) -> int:
        """Create an active account; without a password the user must recover first."""
        address = parse_address(email)
        password_hash = None
        if password is not None:
            check_policy(password, address.normalized)
            password_hash = self._hash(password)
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

    def find_user(self, email: str) -> UserView:
        """Return the account for ``email``, or raise ``UserNotFound``."""
        address = parse_address(email)
        with self._transaction() as db:
            row = db.scalar(select(models.User).where(models.User.email_key == address.key))
            if row is None:
                raise UserNotFound(f"no account for {address.normalized}")
            return UserView.of(row)

    def list_users(self) -> list[UserView]:
        with self._transaction() as db:
            rows = db.scalars(select(models.User).order_by(models.User.id)).all()
            return [UserView.of(row) for row in rows]

    def disable_user(self, email: str) -> None:
        """Disable an account and end its sessions, links and code flows."""
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
                change = "disabled" if disable else "enabled"
                audit.record(db, f"user_{change}", now, user_id=user.id)
                event(log, f"user {change}", user_id=user.id)
            if disable:
                self._end_everything(db, user.id, now)
