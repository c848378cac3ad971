"""Tables. Each machine's record carries its state name and a version counter.

The version makes every transition a compare-and-set: an update names the
version it read, so of two processes that race on one record, one wins and
the other updates no row.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python, naive UTC in the database (SQLite has no zones)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; pass an aware UTC datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC)


NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The address as the operator entered it; mail goes only here.
    email: Mapped[str] = mapped_column(String(320))
    # Case- and Unicode-folded address; lookups use only this.
    email_key: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    password_changed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Ticket(Base):
    __tablename__ = "tickets"
    __table_args__ = (Index("ix_tickets_user_state", "user_id", "state"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Session(Base):
    __tablename__ = "sessions"
    __table_args__ = (Index("ix_sessions_user_state", "user_id", "state"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class OutboxMessage(Base):
    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_state_due", "state", "due_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    recipient: Mapped[str] = mapped_column(String(320))
    # Template values that are not secret, as JSON.
    context: Mapped[str] = mapped_column(Text)
    # The token or code for the mail, encrypted with a key derived from the
    # secret key and bound to this row's id. It is erased once the mail is sent.
    sealed_secret: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer, default=1)
    # When a worker may lease the message next: now for pending, the next
    # attempt for retrying, the lease end for leased.
    due_at: Mapped[datetime] = mapped_column(UTCDateTime)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(128))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class RecoveryRequest(Base):
    """A recovery request recorded on the request path, resolved by a worker."""

    __tablename__ = "recovery_requests"
    __table_args__ = (Index("ix_recovery_requests_state", "state", "requested_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # The folded address as typed; erased once a worker resolves the request,
    # so addresses without an account are not kept.
    address_key: Mapped[str | None] = mapped_column(String(320))
    method: Mapped[str] = mapped_column(String(8))
    flow_id: Mapped[str | None] = mapped_column(String(32))
    # Keyed digest of the client address, for the audit trail.
    client_digest: Mapped[str] = mapped_column(String(64))
    # The HTTP request id, so the worker's log lines carry it too.
    trace_id: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer, default=1)
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    reason: Mapped[str | None] = mapped_column(String(64))


class Flow(Base):
    """A code-method recovery flow; one exists for every code request."""

    __tablename__ = "flows"
    __table_args__ = (Index("ix_flows_user_state", "user_id", "state"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # Set by the worker for an address with an account; NULL never matches.
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    code_digest: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    attempts_left: Mapped[int] = mapped_column(Integer)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Throttle(Base):
    """One GCRA bucket: its theoretical arrival time, in microseconds since the epoch."""

    __tablename__ = "throttles"
    __table_args__ = (Index("ix_throttles_tat", "tat"),)

    scope: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    tat: Mapped[int] = mapped_column(BigInteger)
    allowed: Mapped[bool] = mapped_column(Boolean)


class AuditEvent(Base):
    """One security-relevant event, written in the transaction of the change it records."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_user", "user_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    event: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[int | None] = mapped_column(Integer)
    # The ticket, flow, session, request or scope the event is about.
    subject: Mapped[str | None] = mapped_column(String(64))
    # The client address of the HTTP request, where there was one.
    client: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(String(255))
