"""Recovery ticket: the one-time link a user receives by mail.

Theory of operation
-------------------
A ticket starts ``new`` and becomes ``issued`` with an expiry time computed
from the moment of issue and the time to live. The only way to use it is
``redeem(now)``: before the expiry it returns ACCEPTED and moves to
``redeemed``, so it accepts at most once. At or after the expiry it returns
REJECTED and moves to ``expired``. ``supersede`` (a newer request for
the same user) and ``revoke`` (password changed by another route, account
disabled, reset completed through another ticket) end an issued ticket.

``peek(now)`` checks a ticket without consuming it, because opening the link
page must not use the ticket: mail scanners fetch links before people do.

Every ended state returns REJECTED to ``redeem`` and ``peek`` and ignores
``supersede`` and ``revoke``, so ending a ticket twice is harmless.

Rejected: a second redemption, redemption at or after the expiry, any revival
of an ended ticket. Out of scope: finding the ticket (the store looks it up by
the token's digest) and atomicity across processes (the store writes every
state change as a compare-and-set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from automat import TypeMachineBuilder

from safereset.machines._base import Journal, MachineDefinition, Verdict, entering


class Ticket(Protocol):
    def issue(self, now: datetime, ttl: timedelta) -> None:
        "A user asked for a recovery link and this ticket was created for it."

    def peek(self, now: datetime) -> Verdict:
        "Someone opened the link page; check the ticket without using it."

    def redeem(self, now: datetime) -> Verdict:
        "Someone submitted a new password with this ticket's token."

    def supersede(self) -> None:
        "A newer ticket was issued to the same user."

    def revoke(self) -> None:
        "The user's password changed or the account was disabled."


class _TicketInternals(Ticket, Protocol):
    def _consume(self) -> None:
        "The redemption was in time."

    def _lapse(self) -> None:
        "The ticket was presented at or after its expiry."


@dataclass
class TicketCore:
    ticket_id: str
    journal: Journal = field(default_factory=Journal)


@dataclass(frozen=True)
class Issued:
    expires_at: datetime


@dataclass(frozen=True)
class Ended:
    """Data of every terminal state: there is nothing left to remember."""


def _issued(core: TicketCore, now: datetime, ttl: timedelta) -> Issued:
    if ttl <= timedelta(0):
        raise ValueError(f"ticket time to live must be positive, got {ttl}")
    return Issued(expires_at=now + ttl)


def _ended(core: TicketCore) -> Ended:
    return Ended()


def _build() -> MachineDefinition[Ticket, TicketCore]:
    builder = TypeMachineBuilder(_TicketInternals, TicketCore)
    new = builder.state("new")
    issued = builder.state("issued", entering("issued", _issued))
    redeemed = builder.state("redeemed", entering("redeemed", _ended))
    expired = builder.state("expired", entering("expired", _ended))
    superseded = builder.state("superseded", entering("superseded", _ended))
    revoked = builder.state("revoked", entering("revoked", _ended))
    ended = (redeemed, expired, superseded, revoked)

    new.upon(_TicketInternals.issue).to(issued).returns(None)

    @issued.upon(_TicketInternals.peek).loop()
    def check_expiry(
        inputs: _TicketInternals, core: TicketCore, data: Issued, now: datetime
    ) -> Verdict:
        if now < data.expires_at:
            return Verdict.ACCEPTED
        inputs._lapse()  # Automat runs this input after the current one returns.
        return Verdict.REJECTED

    @issued.upon(_TicketInternals.redeem).loop()
    def redeem_unless_expired(
        inputs: _TicketInternals, core: TicketCore, data: Issued, now: datetime
    ) -> Verdict:
        if now < data.expires_at:
            inputs._consume()
            return Verdict.ACCEPTED
        inputs._lapse()
        return Verdict.REJECTED

    issued.upon(_TicketInternals._consume).to(redeemed).returns(None)
    issued.upon(_TicketInternals._lapse).to(expired).returns(None)
    issued.upon(_TicketInternals.supersede).to(superseded).returns(None)
    issued.upon(_TicketInternals.revoke).to(revoked).returns(None)

    for state in ended:
        state.upon(_TicketInternals.peek).loop().returns(Verdict.REJECTED)
        state.upon(_TicketInternals.redeem).loop().returns(Verdict.REJECTED)
        state.upon(_TicketInternals.supersede).loop().returns(None)
        state.upon(_TicketInternals.revoke).loop().returns(None)

    return MachineDefinition(
        "ticket", builder.build(), {s.name: s for s in (issued, *ended)}, _TicketInternals
    )


TICKET = _build()
