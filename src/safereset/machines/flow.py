"""Recovery flow: the code method, for people who read mail on another device.

Theory of operation
-------------------
A flow starts ``new`` and ``open``s on the request path with an expiry and an
attempt budget, for every address, whether or not it has an account. The
worker later mails a code for a real account; the flow's state does not
change when it does, so nothing an attacker can observe distinguishes the two.

``arm(now)`` asks, before the worker mails a code, whether the flow is still
open: a flow can lock or expire before the worker reaches its request.

``present(now, correct)`` is one try of a code. The caller has already
compared the code's digest with the stored one (a flow without an account
has no stored digest and never matches):
- at or after the expiry: REJECTED, and the flow moves to ``expired``;
- a correct code: ACCEPTED, and the flow moves to ``verified``;
- a wrong code: REJECTED, one attempt is spent, and the last one spent
  moves the flow to ``locked`` for good.
A ``verified`` flow is ``complete``d in the same transaction that sets the
password. A newer request ``supersede``s an open flow; a password change or a
disabled account ``revoke``s it. Ended states answer every try with REJECTED
and spend nothing.

Special case, marked where it sits: a wrong code changes the data of the
``open`` state without leaving it, so that output records the new attempt
count in the journal itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from automat import TypeMachineBuilder

from safereset.machines._base import Journal, MachineDefinition, Verdict, entering

# Five tries of an 8-digit code give an attacker a 5 in 100,000,000 chance per
# flow. A new flow needs a new request, which the per-address limit throttles.
ATTEMPTS = 5


class Flow(Protocol):
    def open(self, now: datetime, ttl: timedelta) -> None:
        "Someone asked for a recovery code for an address."

    def arm(self, now: datetime) -> Verdict:
        "The worker is about to mail a code for this flow; is it still open?"

    def present(self, now: datetime, correct: bool) -> Verdict:
        "Someone tried a code; ``correct`` says whether its digest matched."

    def complete(self) -> None:
        "The new password was set in the same transaction."

    def supersede(self) -> None:
        "A newer request for the same account was recorded."

    def revoke(self) -> None:
        "The password changed by another route or the account was disabled."


class _FlowInternals(Flow, Protocol):
    def _verify(self) -> None:
        "The code was correct and in time."

    def _lapse(self) -> None:
        "A code was tried at or after the expiry."

    def _lock(self) -> None:
        "The last attempt was spent on a wrong code."


@dataclass
class FlowCore:
    flow_id: str
    journal: Journal = field(default_factory=Journal)


@dataclass
class Open:
    """Mutable on purpose: a wrong code lowers ``attempts_left`` in place."""

    expires_at: datetime
    attempts_left: int


@dataclass(frozen=True)
class Ended:
    """Data of every state after ``open``: nothing left to count."""


def _open(core: FlowCore, now: datetime, ttl: timedelta) -> Open:
    if ttl <= timedelta(0):
        raise ValueError(f"flow time to live must be positive, got {ttl}")
    return Open(expires_at=now + ttl, attempts_left=ATTEMPTS)


def _ended(core: FlowCore) -> Ended:
    return Ended()


def _build() -> MachineDefinition[Flow, FlowCore]:
    builder = TypeMachineBuilder(_FlowInternals, FlowCore)
    F = _FlowInternals
    new = builder.state("new")
    opened = builder.state("open", entering("open", _open))
    verified = builder.state("verified", entering("verified", _ended))
    completed = builder.state("completed", entering("completed", _ended))
    expired = builder.state("expired", entering("expired", _ended))
    locked = builder.state("locked", entering("locked", _ended))
    superseded = builder.state("superseded", entering("superseded", _ended))
    revoked = builder.state("revoked", entering("revoked", _ended))

    new.upon(F.open).to(opened).returns(None)

    @opened.upon(F.present).loop()
    def try_code(
        inputs: _FlowInternals, core: FlowCore, data: Open, now: datetime, correct: bool
    ) -> Verdict:
        if now >= data.expires_at:
            inputs._lapse()  # Automat runs this input after the current one returns.
            return Verdict.REJECTED
        if correct:
            inputs._verify()
            return Verdict.ACCEPTED
        if data.attempts_left <= 1:
            inputs._lock()
            return Verdict.REJECTED
        # Special case: the state stays, its data changes, so record it here.
        data.attempts_left -= 1
        core.journal.record("open", data)
        return Verdict.REJECTED

    @opened.upon(F.arm).loop()
    def check_expiry(inputs: _FlowInternals, core: FlowCore, data: Open, now: datetime) -> Verdict:
        if now < data.expires_at:
            return Verdict.ACCEPTED
        inputs._lapse()
        return Verdict.REJECTED

    opened.upon(F._verify).to(verified).returns(None)
    opened.upon(F._lapse).to(expired).returns(None)
    opened.upon(F._lock).to(locked).returns(None)
    opened.upon(F.supersede).to(superseded).returns(None)
    opened.upon(F.revoke).to(revoked).returns(None)
    verified.upon(F.complete).to(completed).returns(None)

    for state in (completed, expired, locked, superseded, revoked):
        state.upon(F.arm).loop().returns(Verdict.REJECTED)
        state.upon(F.present).loop().returns(Verdict.REJECTED)
        state.upon(F.supersede).loop().returns(None)
        state.upon(F.revoke).loop().returns(None)

    states = {
        s.name: s for s in (opened, verified, completed, expired, locked, superseded, revoked)
    }
    return MachineDefinition("flow", builder.build(), states, _FlowInternals)


FLOW = _build()
