"""Account: whether a user may log in, recover access and change the password.

Theory of operation
-------------------
An account starts ``new`` and becomes ``active`` when an operator or the
embedding application creates the user. An operator may ``disable`` it and
``enable`` it again. Each gated action is an input that returns a verdict:
ACCEPTED for an active account, REJECTED for a disabled one. The
verdicts change no state, so the caller's transaction decides what follows.

Disabling also ends the account's sessions and tickets, but those are other
records: the service revokes them in the same transaction as this change.

Rejected: logging in, requesting recovery and completing a reset while
disabled. Disabling a disabled account and enabling an active one are
accepted and change nothing, so operators can repeat a command safely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from automat import TypeMachineBuilder

from safereset.machines._base import Journal, MachineDefinition, Verdict, entering


class Account(Protocol):
    def open(self) -> None:
        "The user was created."

    def disable(self) -> None:
        "An operator disabled the account."

    def enable(self) -> None:
        "An operator enabled the account again."

    def log_in(self) -> Verdict:
        "The user presented a correct password."

    def request_recovery(self) -> Verdict:
        "Someone asked for a recovery mail for this account."

    def reset_password(self) -> Verdict:
        "Someone presented a valid recovery ticket and a new password."


@dataclass
class AccountCore:
    user_id: int
    journal: Journal = field(default_factory=Journal)


@dataclass(frozen=True)
class Standing:
    """Data of both states: the state name says everything."""


def _standing(core: AccountCore) -> Standing:
    return Standing()


def _build() -> MachineDefinition[Account, AccountCore]:
    builder = TypeMachineBuilder(Account, AccountCore)
    new = builder.state("new")
    active = builder.state("active", entering("active", _standing))
    disabled = builder.state("disabled", entering("disabled", _standing))

    new.upon(Account.open).to(active).returns(None)

    active.upon(Account.disable).to(disabled).returns(None)
    active.upon(Account.enable).loop().returns(None)
    disabled.upon(Account.enable).to(active).returns(None)
    disabled.upon(Account.disable).loop().returns(None)

    for gated in (Account.log_in, Account.request_recovery, Account.reset_password):
        active.upon(gated).loop().returns(Verdict.ACCEPTED)
        disabled.upon(gated).loop().returns(Verdict.REJECTED)

    return MachineDefinition(
        "account", builder.build(), {"active": active, "disabled": disabled}, Account
    )


ACCOUNT = _build()
