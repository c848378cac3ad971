"""Login session: what a bearer token of ``POST /api/sessions`` stands for.

Theory of operation
-------------------
A session starts ``new`` and becomes ``active`` with an expiry time when the
user logs in. ``authenticate(now)`` returns ACCEPTED while the session is
active and unexpired. At or after the expiry it returns REJECTED and moves to
``expired``. ``revoke`` ends it: logout, a password reset, a disabled account.
Ended sessions return REJECTED to ``authenticate`` and ignore ``revoke``.

Rejected: any use after expiry or revocation. Out of scope: the token itself
(the store keeps only its keyed digest) and atomicity across processes (the
store writes every state change as a compare-and-set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from automat import TypeMachineBuilder

from safereset.machines._base import Journal, MachineDefinition, Verdict, entering


class Session(Protocol):
    def open(self, now: datetime, ttl: timedelta) -> None:
        "The user logged in with a correct password."

    def authenticate(self, now: datetime) -> Verdict:
        "A request presented this session's token."

    def revoke(self) -> None:
        "The user logged out, reset the password, or the account was disabled."


class _SessionInternals(Session, Protocol):
    def _lapse(self) -> None:
        "The token was presented at or after the session's expiry."


@dataclass
class SessionCore:
    session_id: str
    journal: Journal = field(default_factory=Journal)


@dataclass(frozen=True)
class Active:
    expires_at: datetime


@dataclass(frozen=True)
class Ended:
    """Data of every terminal state: there is nothing left to remember."""


def _active(core: SessionCore, now: datetime, ttl: timedelta) -> Active:
    if ttl <= timedelta(0):
        raise ValueError(f"session time to live must be positive, got {ttl}")
    return Active(expires_at=now + ttl)


def _ended(core: SessionCore) -> Ended:
    return Ended()


def _build() -> MachineDefinition[Session, SessionCore]:
    builder = TypeMachineBuilder(_SessionInternals, SessionCore)
    new = builder.state("new")
    active = builder.state("active", entering("active", _active))
    expired = builder.state("expired", entering("expired", _ended))
    revoked = builder.state("revoked", entering("revoked", _ended))

    new.upon(_SessionInternals.open).to(active).returns(None)

    @active.upon(_SessionInternals.authenticate).loop()
    def check_expiry(
        inputs: _SessionInternals, core: SessionCore, data: Active, now: datetime
    ) -> Verdict:
        if now < data.expires_at:
            return Verdict.ACCEPTED
        inputs._lapse()  # Automat runs this input after the current one returns.
        return Verdict.REJECTED

    active.upon(_SessionInternals._lapse).to(expired).returns(None)
    active.upon(_SessionInternals.revoke).to(revoked).returns(None)

    for state in (expired, revoked):
        state.upon(_SessionInternals.authenticate).loop().returns(Verdict.REJECTED)
        state.upon(_SessionInternals.revoke).loop().returns(None)

    states = {s.name: s for s in (active, expired, revoked)}
    return MachineDefinition("session", builder.build(), states, _SessionInternals)


SESSION = _build()
