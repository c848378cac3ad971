"""Recovery by link: open the link page, complete the reset with the link's token."""

from __future__ import annotations

from sqlalchemy.orm import Session as DbSession

from safereset import audit
from safereset.errors import InvalidToken
from safereset.logs import event
from safereset.machines._base import Verdict
from safereset.machines.account import AccountCore
from safereset.machines.ticket import TicketCore
from safereset.store import models
from safereset.store.records import ACCOUNTS, TICKETS, StaleRecord
from safereset.usecases.base import TICKET_PURPOSE, log
from safereset.usecases.resets import ResetBase


class LinkRecovery(ResetBase):
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

    def complete_recovery(self, token: str, password: str, client: str | None = None) -> None:
        """Set a new password with a recovery token.

        Redeems the ticket, ends every other ticket, flow and session of the
        user, and queues a notice. Raises ``InvalidToken`` for any unusable
        token and ``PasswordRejected`` for a password that fails the policy,
        in which case the ticket stays usable. Counts against the client's
        completion limit. When every hashing slot is taken, raises
        ``HashingBusy`` before counting or querying.
        """
        self.hash_gate.check_free()
        now = self.clock()
        with self._audit_refusals(client, InvalidToken, "link"):
            with self._transaction() as db, db.begin():
                self._throttle_client(
                    db, "complete_client", client, self.limits.completion_per_client, now
                )
            # Check token and policy first, so the slow hash happens outside the
            # write transaction and only for a token that works.
            email = self._peek_ticket(token)
            password_hash = self._new_password_hash(password, email)

            with self._transaction() as db, db.begin():
                ticket_id = self._redeem(db, token, password_hash, client)
            if ticket_id is not None:
                event(log, "ticket rejected", ticket_id=ticket_id)
                raise InvalidToken

    def _redeem(
        self, db: DbSession, token: str, password_hash: str, client: str | None
    ) -> str | None:
        """Redeem and finish the reset; return the ticket id when the ticket was rejected."""
        now = self.clock()
        found = self._find(db, models.Ticket, TICKET_PURPOSE, token)
        if found is None:
            raise InvalidToken
        user = db.get(models.User, found.user_id, with_for_update=True)
        row = self._find(db, models.Ticket, TICKET_PURPOSE, token, lock=True)
        if user is None or row is None:
            raise InvalidToken
        core = TicketCore(row.id)
        if ACCOUNTS.restore(user, AccountCore(user.id)).reset_password() is Verdict.REJECTED:
            return row.id
        if TICKETS.restore(row, core).redeem(now) is Verdict.REJECTED:
            TICKETS.save(db, row, core, now)  # an expiry is recorded and committed
            return row.id
        try:
            TICKETS.save(db, row, core, now)
        except StaleRecord:
            raise InvalidToken from None
        self._finish_reset(db, user, password_hash, now)
        audit.record(db, "reset_completed", now, user_id=user.id, subject=row.id, client=client)
        event(log, "ticket redeemed", user_id=user.id, ticket_id=row.id)
        return None
