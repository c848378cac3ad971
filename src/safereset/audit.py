"""The audit trail: who asked for what, what was issued, completed, rejected or throttled.

Events carry ids and the client address, never a token, code, password or
email address. Each is written in the transaction of the change it records,
so the trail and the state never disagree. A rate-limited request, whose own
transaction rolls back, is recorded in a transaction of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session as DbSession

from safereset.store import models

EVENTS = (
    "recovery_requested",
    "request_dropped",
    "ticket_issued",
    "code_armed",
    "operator_link_issued",
    "reset_completed",
    "reset_rejected",
    "sessions_revoked",
    "throttled",
    "user_disabled",
    "user_enabled",
)


@dataclass(frozen=True)
class AuditEntry:
    at: datetime
    event: str
    user_id: int | None
    subject: str | None
    client: str | None
    detail: str | None


def record(
    db: DbSession,
    event: str,
    at: datetime,
    *,
    user_id: int | None = None,
    subject: str | None = None,
    client: str | None = None,
    detail: str | None = None,
) -> None:
    """Add one event to the caller's transaction."""
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}")
    db.add(
        models.AuditEvent(
            at=at,
            event=event,
            user_id=user_id,
            subject=subject,
            client=client[:64] if client else None,
            detail=detail[:255] if detail else None,
        )
    )


def entries(engine: Engine, *, user_id: int | None = None, limit: int = 100) -> list[AuditEntry]:
    """Return the newest events first, optionally of one user."""
    query = select(models.AuditEvent).order_by(models.AuditEvent.id.desc()).limit(limit)
    if user_id is not None:
        query = query.where(models.AuditEvent.user_id == user_id)
    with DbSession(engine) as db:
        return [
            AuditEntry(row.at, row.event, row.user_id, row.subject, row.client, row.detail)
            for row in db.scalars(query)
        ]
