"""Outbox message: one mail on its way from a committed change to the wire.

Theory of operation
-------------------
A message starts ``new`` and is ``queue``d as ``pending`` in the same
transaction as the change that causes it. A worker requests a ``lease`` on
it. The machine grants the lease (ACCEPTED) and moves to ``leased`` with the
worker's id, the lease end and the attempt number. The worker then reports
``delivered`` (to ``sent``) or ``failed``: the message moves to ``retrying``
with the time of the next attempt, or to ``dead`` after the last attempt.

Special cases:
- A lease that ends without a report means the worker died. Another worker's
  ``lease`` at or after the lease end takes the message over. The lost lease
  counts as a failed attempt, so a message that kills every worker still dies.
- ``retrying`` grants a lease only once its next attempt is due.
- An operator may ``requeue`` a dead message, which starts it over.

Rejected: leasing a message that is leased and unexpired, not yet due, sent or
dead. Delivery reports outside ``leased`` are caller errors (Automat raises
NoTransition), because the store's compare-and-set drops a report from a
worker that lost its lease before it reaches the machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from automat import TypeMachineBuilder

from safereset.machines._base import Journal, MachineDefinition, Verdict, entering


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how far apart a message is tried.

    Six attempts spaced 30 s, 1, 2, 4 and 8 minutes apart span about a quarter
    of an hour, half the default link lifetime. A mail that has not gone out
    by then would carry a link the user can barely use.
    """

    max_attempts: int = 6
    first_delay: timedelta = timedelta(seconds=30)
    max_delay: timedelta = timedelta(hours=1)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.first_delay <= timedelta(0) or self.max_delay < self.first_delay:
            raise ValueError("delays must be positive and max_delay at least first_delay")

    def delay(self, attempt: int, jitter: float) -> timedelta:
        """Back off exponentially; ``jitter`` in [0, 1] spreads workers apart.

        The wait is between half and all of the exponential delay, so workers
        that failed together do not retry together.
        """
        if not 0.0 <= jitter <= 1.0:
            raise ValueError(f"jitter must be within [0, 1], got {jitter}")
        exponential: timedelta = min(self.first_delay * 2 ** (attempt - 1), self.max_delay)
        return exponential * (0.5 + jitter / 2)


class Message(Protocol):
    def queue(self) -> None:
        "The change that causes this mail was committed with it."

    def lease(self, worker: str, now: datetime, until: datetime) -> Verdict:
        "A worker asks to deliver the message until the lease ends."

    def delivered(self) -> None:
        "The transport accepted the message."

    def failed(self, now: datetime, jitter: float, error: str) -> None:
        "The transport failed; ``jitter`` in [0, 1] is drawn by the caller."

    def requeue(self) -> None:
        "An operator asks to try a dead message again."


class _MessageInternals(Message, Protocol):
    def _take(self, worker: str, until: datetime, attempt: int) -> None:
        "The lease was granted."

    def _retry(self, attempt: int, next_at: datetime, error: str) -> None:
        "An attempt failed and another one is left."

    def _give_up(self, attempts: int, error: str) -> None:
        "The last attempt failed."


@dataclass
class MessageCore:
    message_id: str
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    journal: Journal = field(default_factory=Journal)


@dataclass(frozen=True)
class Pending:
    """A message no worker has tried yet."""


@dataclass(frozen=True)
class Leased:
    worker: str
    until: datetime
    attempt: int


@dataclass(frozen=True)
class Retrying:
    attempt: int
    next_at: datetime
    error: str


@dataclass(frozen=True)
class Sent:
    """A message the transport accepted."""


@dataclass(frozen=True)
class Dead:
    attempts: int
    error: str


def _pending(core: MessageCore) -> Pending:
    return Pending()


def _leased(core: MessageCore, worker: str, until: datetime, attempt: int) -> Leased:
    return Leased(worker, until, attempt)


def _retrying(core: MessageCore, attempt: int, next_at: datetime, error: str) -> Retrying:
    return Retrying(attempt, next_at, error)


def _sent(core: MessageCore) -> Sent:
    return Sent()


def _dead(core: MessageCore, attempts: int, error: str) -> Dead:
    return Dead(attempts, error)


def _build() -> MachineDefinition[Message, MessageCore]:
    builder = TypeMachineBuilder(_MessageInternals, MessageCore)
    M = _MessageInternals
    new = builder.state("new")
    pending = builder.state("pending", entering("pending", _pending))
    leased = builder.state("leased", entering("leased", _leased))
    retrying = builder.state("retrying", entering("retrying", _retrying))
    sent = builder.state("sent", entering("sent", _sent))
    dead = builder.state("dead", entering("dead", _dead))

    new.upon(M.queue).to(pending).returns(None)

    @pending.upon(M.lease).loop()
    def grant(
        inputs: _MessageInternals,
        core: MessageCore,
        data: Pending,
        worker: str,
        now: datetime,
        until: datetime,
    ) -> Verdict:
        inputs._take(worker, until, 1)  # Automat runs this input after the current one returns.
        return Verdict.ACCEPTED

    @retrying.upon(M.lease).loop()
    def grant_when_due(
        inputs: _MessageInternals,
        core: MessageCore,
        data: Retrying,
        worker: str,
        now: datetime,
        until: datetime,
    ) -> Verdict:
        if now < data.next_at:
            return Verdict.REJECTED
        inputs._take(worker, until, data.attempt + 1)
        return Verdict.ACCEPTED

    @leased.upon(M.lease).loop()
    def take_over(
        inputs: _MessageInternals,
        core: MessageCore,
        data: Leased,
        worker: str,
        now: datetime,
        until: datetime,
    ) -> Verdict:
        if now < data.until:
            return Verdict.REJECTED
        error = f"lease of worker {data.worker} ended without a report"
        if data.attempt >= core.policy.max_attempts:
            inputs._give_up(data.attempt, error)
            return Verdict.REJECTED
        inputs._retry(data.attempt, now, error)
        inputs._take(worker, until, data.attempt + 1)
        return Verdict.ACCEPTED

    @leased.upon(M.failed).loop()
    def schedule(
        inputs: _MessageInternals,
        core: MessageCore,
        data: Leased,
        now: datetime,
        jitter: float,
        error: str,
    ) -> None:
        if data.attempt >= core.policy.max_attempts:
            inputs._give_up(data.attempt, error)
        else:
            next_at = now + core.policy.delay(data.attempt, jitter)
            inputs._retry(data.attempt, next_at, error)

    pending.upon(M._take).to(leased).returns(None)
    retrying.upon(M._take).to(leased).returns(None)
    leased.upon(M._retry).to(retrying).returns(None)
    leased.upon(M._give_up).to(dead).returns(None)
    leased.upon(M.delivered).to(sent).returns(None)
    dead.upon(M.requeue).to(pending).returns(None)

    for final in (sent, dead):
        final.upon(M.lease).loop().returns(Verdict.REJECTED)

    states = {s.name: s for s in (pending, leased, retrying, sent, dead)}
    return MachineDefinition("message", builder.build(), states, _MessageInternals)


MESSAGE = _build()
