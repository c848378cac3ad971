"""Recovery requests: recorded on the request path, resolved by the worker.

The request path does the same work for every address: two rate-limit
updates and one insert (two with a code flow), never a lookup of the
account. Known and unknown addresses therefore cost the same by
construction, not by padding with sleeps. The worker resolves each request
off the request path: it looks the account up, consults the account machine
and the per-account mail limit, and issues a link or arms the code flow.
"""

from __future__ import annotations

import secrets
import time
import uuid
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session as DbSession

from safereset import audit, crypto, logs, throttle
from safereset.addresses import parse_address
from safereset.errors import AccountDisabled, UserNotFound
from safereset.logs import event
from safereset.machines._base import Verdict
from safereset.machines.account import AccountCore
from safereset.machines.flow import FlowCore
from safereset.machines.request import RequestCore
from safereset.machines.ticket import TicketCore
from safereset.mail import outbox
from safereset.store import models
from safereset.store.records import ACCOUNTS, FLOWS, REQUESTS, TICKETS
from safereset.throttle import RateLimited
from safereset.usecases.base import (
    CLIENT_PURPOSE,
    CODE_PURPOSE,
    NO_CLIENT,
    TICKET_PURPOSE,
    ServiceBase,
    log,
)
from safereset.usecases.codes import code_subject

METHODS = ("link", "code")
# How many requests one worker round resolves before it delivers mail.
REQUESTS_PER_ROUND = 50


class Intake(ServiceBase):
    def request_recovery(
        self, email: str, client: str | None = None, method: str = "link"
    ) -> str | None:
        """Record a recovery request; return the flow id for the code method.

        Returns alike for every valid address. Raises ``InvalidAddress`` for
        an address that is not valid at all and ``RateLimited`` over a limit.
        """
        address = parse_address(email)
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        now = self.clock()
        request_id = uuid.uuid4().hex
        flow_id = uuid.uuid4().hex if method == "code" else None
        with self._audit_refusals(client), self._transaction() as db, db.begin():
            self._throttle_client(
                db, "recover_client", client, self.limits.recovery_per_client, now
            )
            self._throttle(
                db, "recover_address", address.key, self.limits.recovery_per_address, now
            )
            detail = method if flow_id is None else f"code flow {flow_id}"
            audit.record(
                db, "recovery_requested", now, subject=request_id, client=client, detail=detail
            )
            core = RequestCore(request_id)
            REQUESTS.machine.create(core).record()
            db.add(
                models.RecoveryRequest(
                    id=request_id,
                    address_key=address.key,
                    method=method,
                    flow_id=flow_id,
                    client_digest=self.keyring.digest(CLIENT_PURPOSE, client or NO_CLIENT),
                    trace_id=logs.request_id.get(),
                    requested_at=now,
                    **REQUESTS.initial_columns(core, now),
                )
            )
            if flow_id is not None:
                flow_core = FlowCore(flow_id)
                FLOWS.machine.create(flow_core).open(now, self.code_ttl)
                db.add(
                    models.Flow(
                        id=flow_id,
                        user_id=None,
                        code_digest=None,
                        created_at=now,
                        **FLOWS.initial_columns(flow_core, now),
                    )
                )
        event(log, "recovery requested", recovery_id=request_id, method=method, flow_id=flow_id)
        return flow_id

    def process_recovery_requests(self) -> int:
        """Resolve pending requests, oldest first; return how many were resolved.

        Each request is resolved in its own transaction, so a crash loses at
        most the one in progress, which stays pending for the next round.
        """
        resolved = 0
        for _ in range(REQUESTS_PER_ROUND):
            now = self.clock()
            with self._transaction() as db, db.begin():
                row = db.scalar(
                    select(models.RecoveryRequest)
                    .where(models.RecoveryRequest.state == "pending")
                    .order_by(models.RecoveryRequest.requested_at)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                )
                if row is None:
                    break
                # Log the worker's state changes under the HTTP request's id.
                trace = logs.request_id.set(row.trace_id)
                try:
                    self._resolve(db, row, now)
                finally:
                    logs.request_id.reset(trace)
            resolved += 1
            # Let a thread that waits for the connection take it first:
            # otherwise this loop takes it back at once, and on SQLite, with
            # one connection, an HTTP request could wait for the whole round.
            time.sleep(0)
        with self._transaction() as db, db.begin():
            # A bucket whose TAT has passed is full again, the same as no row.
            now_us = throttle.to_microseconds(self.clock())
            db.execute(delete(models.Throttle).where(models.Throttle.tat < now_us))
        return resolved

    def _resolve(self, db: DbSession, row: models.RecoveryRequest, now: datetime) -> None:
        core = RequestCore(row.id)
        request = REQUESTS.restore(row, core)
        user = db.scalar(
            select(models.User).where(models.User.email_key == row.address_key).with_for_update()
        )
        reason = None
        if user is None:
            reason = "no_account"
        elif ACCOUNTS.restore(user, AccountCore(user.id)).request_recovery() is Verdict.REJECTED:
            reason = "account_disabled"
        elif row.flow_id is not None and not self._flow_still_open(db, row.flow_id, now):
            reason = "flow_ended"
        else:
            try:
                self._throttle(db, "mail_account", str(user.id), self.limits.mail_per_account, now)
            except RateLimited:
                reason = "mail_limit"
        if reason is not None or user is None:
            request.drop(reason or "no_account")
            REQUESTS.save(db, row, core, now)
            audit.record(
                db,
                "request_dropped",
                now,
                user_id=user.id if user else None,
                subject=row.id,
                detail=reason,
            )
            event(log, "recovery request dropped", recovery_id=row.id, reason=reason)
            return

        # Supersede before arming the new flow, whose row has no user yet.
        self._end_credentials(db, user.id, now, supersede=True)
        if row.flow_id is None:
            self._issue_link(db, user, now)
        else:
            self._arm_flow(db, user, row.flow_id, now)
        request.issue()
        REQUESTS.save(db, row, core, now)

    def issue_operator_link(self, email: str) -> str:
        """Start a recovery for an account and return its one-time link, mailing nothing.

        For an operator to hand over, for example when the user's mailbox is
        lost. The operator never sees or chooses the password. Raises
        ``UserNotFound``, or ``AccountDisabled`` for a disabled account.
        """
        address = parse_address(email)
        now = self.clock()
        token = crypto.new_token()
        with self._transaction() as db, db.begin():
            user = db.scalar(
                select(models.User).where(models.User.email_key == address.key).with_for_update()
            )
            if user is None:
                raise UserNotFound(f"no account for {address.normalized}")
            if ACCOUNTS.restore(user, AccountCore(user.id)).request_recovery() is Verdict.REJECTED:
                raise AccountDisabled(f"the account for {address.normalized} is disabled")
            self._end_credentials(db, user.id, now, supersede=True)
            ticket_id = self._add_ticket(db, user, token, now)
            audit.record(db, "operator_link_issued", now, user_id=user.id, subject=ticket_id)
        event(log, "operator link issued", user_id=user.id, ticket_id=ticket_id)
        return f"{self.public_url}/recover?token={token}"

    def _add_ticket(self, db: DbSession, user: models.User, token: str, now: datetime) -> str:
        ticket_id = uuid.uuid4().hex
        core = TicketCore(ticket_id)
        TICKETS.machine.create(core).issue(now, self.token_ttl)
        db.add(
            models.Ticket(
                id=ticket_id,
                user_id=user.id,
                digest=self.keyring.digest(TICKET_PURPOSE, token),
                created_at=now,
                **TICKETS.initial_columns(core, now),
            )
        )
        return ticket_id

    def _issue_link(self, db: DbSession, user: models.User, now: datetime) -> None:
        token = crypto.new_token()
        ticket_id = self._add_ticket(db, user, token, now)
        self._mail_secret(db, user, "recovery_link", token, self.token_ttl, now)
        audit.record(db, "ticket_issued", now, user_id=user.id, subject=ticket_id)
        event(log, "ticket issued", user_id=user.id, ticket_id=ticket_id)

    def _flow_still_open(self, db: DbSession, flow_id: str, now: datetime) -> bool:
        """Ask the flow machine whether a code may still be mailed for it.

        A flow can lock (five wrong tries) or expire before the worker gets to
        its request; then no code goes out.
        """
        flow = self._locked_flow(db, flow_id)
        core = FlowCore(flow.id)
        verdict = FLOWS.restore(flow, core).arm(now)
        FLOWS.save(db, flow, core, now)  # an expiry found here is recorded
        return verdict is Verdict.ACCEPTED

    def _arm_flow(self, db: DbSession, user: models.User, flow_id: str, now: datetime) -> None:
        """Bind the flow to the account and mail its code; the flow's state stays ``open``."""
        flow = self._locked_flow(db, flow_id)
        code = f"{secrets.randbelow(10**8):08d}"
        flow.user_id = user.id
        flow.code_digest = self.keyring.digest(CODE_PURPOSE, code_subject(flow_id, code))
        self._mail_secret(db, user, "recovery_code", code, self.code_ttl, now)
        audit.record(db, "code_armed", now, user_id=user.id, subject=flow_id)
        event(log, "code armed", user_id=user.id, flow_id=flow_id)

    def _locked_flow(self, db: DbSession, flow_id: str) -> models.Flow:
        flow = db.get(models.Flow, flow_id, with_for_update=True)
        if flow is None:
            raise LookupError(f"recovery flow {flow_id} of a pending request is missing")
        return flow

    def _mail_secret(
        self,
        db: DbSession,
        user: models.User,
        kind: str,
        secret: str,
        lifetime: timedelta,
        now: datetime,
    ) -> None:
        """Queue a link or code mail to the account's stored address, sealed in the outbox."""
        outbox.queue(
            db,
            self.keyring,
            kind=kind,
            recipient=user.email,
            user_id=user.id,
            values={"ttl_minutes": int(lifetime.total_seconds() // 60)},
            secret=secret,
            now=now,
        )
