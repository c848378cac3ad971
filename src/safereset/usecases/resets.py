"""The steps both recovery methods share once a link or code is accepted."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session as DbSession

from safereset.mail import outbox
from safereset.passwords import check_policy
from safereset.store import models
from safereset.usecases.base import ServiceBase


class ResetBase(ServiceBase):
    def _new_password_hash(self, password: str, email: str) -> str:
        """Check the policy, then hash; raises ``PasswordRejected`` or ``HashingBusy``."""
        check_policy(password, email)
        return self._hash(password)

    def _finish_reset(
        self, db: DbSession, user: models.User, password_hash: str, now: datetime
    ) -> None:
        """Set the password, end every credential and session, queue the notice."""
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
