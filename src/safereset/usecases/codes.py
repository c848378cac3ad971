"""Recovery by code: complete a reset with the flow id and the mailed code."""

from __future__ import annotations

import re

from safereset import audit
from safereset.errors import InvalidCode
from safereset.logs import event
from safereset.machines._base import Verdict
from safereset.machines.account import AccountCore
from safereset.machines.flow import FlowCore
from safereset.passwords import check_policy
from safereset.store import models
from safereset.store.records import ACCOUNTS, FLOWS, StaleRecord
from safereset.usecases.base import CODE_PURPOSE, log
from safereset.usecases.resets import ResetBase

FLOW_ID = re.compile(r"[0-9a-f]{32}")
CODE = re.compile(r"[0-9]{8}")


def code_subject(flow_id: str, code: str) -> str:
    """Bind a code to its flow, so a code never works for another flow."""
    return f"{flow_id}:{code}"


class CodeRecovery(ResetBase):
    def complete_code_recovery(
        self, flow_id: str, code: str, password: str, client: str | None = None
    ) -> None:
        """Set a new password with a flow's mailed code.

        Raises ``InvalidCode`` for a wrong code and for an unknown, expired,
        locked or used flow, alike. A wrong code spends one of the flow's
        attempts. A password that fails the policy raises ``PasswordRejected``
        and spends nothing. Counts against the client's completion limit.
        When every hashing slot is taken, raises ``HashingBusy`` before
        counting or querying.
        """
        self.hash_gate.check_free()
        now = self.clock()
        subject = flow_id if FLOW_ID.fullmatch(flow_id) else None
        with self._audit_refusals(client, InvalidCode, "code", subject):
            with self._transaction() as db, db.begin():
                self._throttle_client(
                    db, "complete_client", client, self.limits.completion_per_client, now
                )
            # The length rules do not depend on the account, so flows with and
            # without one respond alike.
            check_policy(password, None)
            if subject is None:
                raise InvalidCode

            email = self._try_code(flow_id, code)
            password_hash = self._new_password_hash(password, email)
            self._complete(flow_id, code, password_hash, client)

    def _matches(self, row: models.Flow, code: str) -> bool:
        if row.code_digest is None or not CODE.fullmatch(code):
            return False
        return self.keyring.verify(CODE_PURPOSE, code_subject(row.id, code), row.code_digest)

    def _try_code(self, flow_id: str, code: str) -> str:
        """Present the code once; spend an attempt when it is wrong, else return the email.

        A correct code changes nothing yet: the reset itself presents it again
        after the slow hash, in a transaction of its own.
        """
        now = self.clock()
        # No begin() block: a wrong code commits, a correct one rolls back on close.
        with self._transaction() as db:
            row = db.get(models.Flow, flow_id, with_for_update=True)
            if row is None:
                raise InvalidCode
            core = FlowCore(row.id)
            if FLOWS.restore(row, core).present(now, self._matches(row, code)) is Verdict.REJECTED:
                FLOWS.save(db, row, core, now)
                db.commit()
                event(log, "code rejected", flow_id=row.id)
                raise InvalidCode
            user = db.get(models.User, row.user_id) if row.user_id is not None else None
            if user is None:
                raise InvalidCode
            return user.email

    def _complete(self, flow_id: str, code: str, password_hash: str, client: str | None) -> None:
        now = self.clock()
        with self._transaction() as db, db.begin():
            found = db.get(models.Flow, flow_id)
            if found is None or found.user_id is None:
                raise InvalidCode
            user = db.get(models.User, found.user_id, with_for_update=True)
            row = db.get(models.Flow, flow_id, with_for_update=True, populate_existing=True)
            if user is None or row is None:
                raise InvalidCode
            account = ACCOUNTS.restore(user, AccountCore(user.id))
            if account.reset_password() is Verdict.REJECTED:
                raise InvalidCode
            core = FlowCore(row.id)
            flow = FLOWS.restore(row, core)
            if flow.present(now, self._matches(row, code)) is Verdict.REJECTED:
                raise InvalidCode  # the flow ended between the two transactions
            flow.complete()
            try:
                FLOWS.save(db, row, core, now)
            except StaleRecord:
                raise InvalidCode from None
            self._finish_reset(db, user, password_hash, now)
            audit.record(db, "reset_completed", now, user_id=user.id, subject=row.id, client=client)
            event(log, "flow completed", user_id=user.id, flow_id=row.id)
