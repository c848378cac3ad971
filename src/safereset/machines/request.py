"""Recovery request: what the request path records, for the worker to resolve.

Theory of operation
-------------------
``POST /api/recovery`` does the same work for every address: it records a
request (``new`` to ``pending``) and returns. The worker later looks the
address up, consults the account machine and the per-account limits, and feeds
the outcome: ``issue`` when a link or code went out, ``drop`` with a reason
when nothing did (no account, account disabled, mail limit reached). Either
way the request is resolved once; the store's compare-and-set keeps two
workers from resolving it twice.

Rejected: resolving a request twice (Automat raises NoTransition).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from automat import TypeMachineBuilder

from safereset.machines._base import Journal, MachineDefinition, entering


class Request(Protocol):
    def record(self) -> None:
        "The request path stored the request."

    def issue(self) -> None:
        "The worker issued a link or armed a code for the account."

    def drop(self, reason: str) -> None:
        "The worker sent nothing; ``reason`` is for the audit trail."


@dataclass
class RequestCore:
    request_id: str
    journal: Journal = field(default_factory=Journal)


@dataclass(frozen=True)
class Pending:
    """A request no worker has resolved yet."""


@dataclass(frozen=True)
class Issued:
    """A request that sent a link or a code."""


@dataclass(frozen=True)
class Dropped:
    reason: str


def _pending(core: RequestCore) -> Pending:
    return Pending()


def _issued(core: RequestCore) -> Issued:
    return Issued()


def _dropped(core: RequestCore, reason: str) -> Dropped:
    return Dropped(reason)


def _build() -> MachineDefinition[Request, RequestCore]:
    builder = TypeMachineBuilder(Request, RequestCore)
    new = builder.state("new")
    pending = builder.state("pending", entering("pending", _pending))
    issued = builder.state("issued", entering("issued", _issued))
    dropped = builder.state("dropped", entering("dropped", _dropped))

    new.upon(Request.record).to(pending).returns(None)
    pending.upon(Request.issue).to(issued).returns(None)
    pending.upon(Request.drop).to(dropped).returns(None)

    states = {s.name: s for s in (pending, issued, dropped)}
    return MachineDefinition("request", builder.build(), states, Request)


REQUEST = _build()
